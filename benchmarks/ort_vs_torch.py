"""ONNX Runtime vs PyTorch on the same model, on this CPU, in one process.

    python benchmarks/ort_vs_torch.py ARTIFACT_DIR            [--runs 50] [--threads N] [--json out.json]
    python benchmarks/ort_vs_torch.py --recipe recipes/sst2.yaml --config pruned-ort [--runs 50] ...

ARTIFACT_DIR is a float model artifact (a teacher/student/distill/prune cache entry); with --recipe and
--config, the float model that row starts from (its model stage), which must be built already. Four
variants are made from it by the build's own stages, into a temporary folder: PyTorch eager fp32, PyTorch
dynamic int8 (the quantize stage, torch-int8-dynamic), ONNX Runtime fp32 and ONNX Runtime dynamic int8
(the onnxruntime stage), and each is loaded through `load_runnable` at the same thread count (ONNX
Runtime's session takes torch's). Timed: `Runnable.forward` on pre-tokenized sentences at batch 1 and 32
(real lengths, dynamic padding), round-robin over the variants so drift on a shared machine hits each
alike. Printed: median ms, p10-p90, and the ratios ORT fp32 / torch fp32 and ORT int8 / torch int8 (below
1: ONNX Runtime is faster), plus each variant's agreement with the fp32 model on the sentences.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = [  # (name, stage kind or None for the float model itself, stage params)
    ("torch fp32", None, None),
    ("torch int8-dynamic", "quantize", {"method": "torch-int8-dynamic"}),
    ("ort fp32", "onnxruntime", {"precision": "fp32"}),
    ("ort int8-dynamic", "onnxruntime", {"precision": "fp32", "quantization": "int8-dynamic"}),
]
RATIOS = [("ort fp32", "torch fp32"), ("ort int8-dynamic", "torch int8-dynamic")]


def float_artifact(args) -> Path:
    """The float model artifact to benchmark: ARTIFACT_DIR, or the model stage of --config in --recipe."""
    from optforge.errors import OptforgeError
    from optforge.modeling import read_meta
    from optforge.recipe import model_stage_name
    from optforge.session import open_session

    if args.artifact is not None:
        path = Path(args.artifact)
    else:
        session = open_session(args.recipe, "cpu")
        rows = {c.name: c for c in session.recipe.configs}
        if args.config not in rows:
            raise OptforgeError(f"no config {args.config!r} in {args.recipe} on cpu (configs: {', '.join(rows)})")
        stage = model_stage_name(session.recipe, rows[args.config].model)
        plan = {p.name: p for p in session.plan()}[stage]
        if plan.entry.status != "ok":
            raise OptforgeError(f"{stage} ({args.config!r}'s model) is not built: run optforge build {args.recipe}")
        path = session.cache.entry_dir(plan.key)
    if read_meta(path).get("format") != "float":
        raise OptforgeError(f"{path} is not a float model artifact (format {read_meta(path).get('format')!r})")
    return path


def make_variant(kind: str, params: dict, src: Path, out: Path) -> Path:
    """Run the build's own stage `kind` on `src` into `out` (as the engine would, on CPU)."""
    from optforge.stages.base import StageContext
    from optforge.stages.registry import get_kind

    k = get_kind(kind)
    out.mkdir(parents=True)
    ctx = StageContext(name=f"{kind}:bench", kind=kind, params=k.params_model.model_validate(params),
                       inputs={"model": src}, input_metrics={}, out=out, device="cpu", log=lambda s: None)
    k.run(ctx)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="?", help="a float model artifact directory")
    ap.add_argument("--recipe", type=Path, help="a built recipe (with --config)")
    ap.add_argument("--config", help="the row whose float model to use (with --recipe)")
    ap.add_argument("--runs", type=int, default=50, help="timed runs per (variant, batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if (args.artifact is None) == (args.recipe is None) or (args.recipe is None) != (args.config is None):
        ap.error("give ARTIFACT_DIR, or --recipe and --config")

    import torch

    from optforge import training
    from optforge.artifacts import load_runnable
    from optforge.errors import OptforgeError
    from optforge.stages.quantize import CALIBRATION_TEXTS as SENTENCES

    try:
        src = float_artifact(args)
    except OptforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runnables = {}
    with tempfile.TemporaryDirectory(prefix="ort-vs-torch-") as tmp:
        paths = {name: src if kind is None else make_variant(kind, params, src, Path(tmp) / name.replace(" ", "-"))
                 for name, kind, params in VARIANTS}
        # after the stages (they set torch's threads for themselves), before loading: ONNX Runtime's
        # session takes torch's thread count when it is created
        if args.threads:
            torch.set_num_threads(args.threads)
        else:
            training.configure_threads()
        for name, path in paths.items():
            runnables[name] = load_runnable(path, "cpu", verify=False)
        reference = runnables["torch fp32"]
        inputs = {"b1": reference.collate(reference.tokenize([SENTENCES[4]])),
                  "b32": reference.collate(reference.tokenize((SENTENCES * 2)[:32]))}
        rows = {name: {} for name in runnables}
        check = inputs["b32"]
        expected = reference.forward(check).argmax(-1)
        for name, r in runnables.items():
            rows[name]["agreement"] = (r.forward(check).argmax(-1) == expected).float().mean().item()
        for label, batch in inputs.items():
            times = {name: [] for name in runnables}
            for r in runnables.values():  # warm-up
                for _ in range(3):
                    r.forward(batch)
            for _ in range(args.runs):  # round-robin: drift on a shared machine hits every variant alike
                for name, r in runnables.items():
                    start = time.perf_counter()
                    r.forward(batch)
                    times[name].append((time.perf_counter() - start) * 1e3)
            for name, ts in times.items():
                q = statistics.quantiles(ts, n=10)
                rows[name][f"{label}_ms"], rows[name][f"{label}_p10_p90"] = statistics.median(ts), [q[0], q[-1]]

    print(f"{src} on {torch.get_num_threads()} threads; batch 1 = {inputs['b1']['input_ids'].shape[1]} tokens, "
          f"batch 32 padded to {inputs['b32']['input_ids'].shape[1]}; median of {args.runs} interleaved runs")
    print(f"{'variant':20s} {'b1 ms':>8s} {'p10-p90':>15s} {'b32 ms':>9s} {'p10-p90':>17s} {'agree':>6s}")
    for name, r in rows.items():
        print(f"{name:20s} {r['b1_ms']:8.3f} {r['b1_p10_p90'][0]:7.3f}-{r['b1_p10_p90'][1]:<7.3f} "
              f"{r['b32_ms']:9.2f} {r['b32_p10_p90'][0]:8.2f}-{r['b32_p10_p90'][1]:<8.2f} {r['agreement']:6.3f}")
    ratios = {}
    for ort, torch_name in RATIOS:
        ratios[f"{ort} / {torch_name}"] = {label: rows[ort][f"{label}_ms"] / rows[torch_name][f"{label}_ms"]
                                          for label in inputs}
        print(f"{ort} / {torch_name}: batch 1 {ratios[f'{ort} / {torch_name}']['b1']:.3g}x, "
              f"batch 32 {ratios[f'{ort} / {torch_name}']['b32']:.3g}x the time")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(src), "threads": torch.get_num_threads(),
                                         "runs": args.runs, "rows": rows, "ratios": ratios}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
