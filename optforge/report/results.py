"""Stage results -> the results document (results.json) with one row per configuration and its verdict.

Pure: plain dicts in, plain dicts out; no torch, no jinja, no I/O. The renderers and the comparison
read only this document, so what the report says and what results.json says cannot drift apart.

Verdicts and the best row are `optforge.report.verdict`'s rules, shared with `optforge serve` and the
serve_benchmark stage.
"""

from __future__ import annotations

from typing import Any, Optional

from optforge.errors import one_line
from optforge.report.serving import serving_from_results
from optforge.report.verdict import judge_rows, pick_best
from optforge.report.verdict import rounded as _r

SCHEMA_VERSION = 1


def _status(results: dict, name: str) -> dict:
    return results.get(name) or {"status": "missing", "metrics": {}, "reason": None, "key": None}


def stage_label(name: str, config: str, graph=None) -> str:
    """A row's own stage by its kind (`quantize:int8` -> `quantize`: the row already names the config);
    any other stage whole (`prune:p50`)."""
    node = graph.by_name.get(name) if graph is not None else None
    kind, _, rest = name.partition(":")
    own = node.config == config if node is not None else rest == config
    return kind if own else name


def row_path(graph, config: str) -> list[str]:
    """The stages that produce a config's row, in topological order: what its evaluate and benchmark
    stages depend on, except through the benchmark's `baseline` input (the baseline row's model, read
    to compare against: its failure is the baseline's, not this row's)."""
    wanted = [f"evaluate:{config}", f"benchmark:{config}"]
    if graph is None:
        return wanted
    path: set[str] = set()
    for w in wanted:
        node = graph.by_name.get(w)
        if node is None:
            continue
        path.add(w)
        for role, dep in node.inputs.items():
            if role != "baseline":
                path |= graph.upstream(dep)
    return [n for n in graph.names() if n in path] or wanted


def config_status(graph, results: dict, config: str) -> tuple[str, Optional[str]]:
    """("ok" | "failed" | "skipped" | "missing", reason) of the path that produces a config's row."""
    wanted = [f"evaluate:{config}", f"benchmark:{config}"]
    for name in row_path(graph, config):  # topological: the first failure is the cause, later ones are consequences
        st = _status(results, name)
        if st.get("status") == "failed":
            return "failed", f"{stage_label(name, config, graph)}: {one_line(st.get('reason'), limit=None) or 'failed'}"
    states = {w: _status(results, w) for w in wanted}
    if all(s.get("status") == "ok" for s in states.values()):
        return "ok", None
    for w, s in states.items():
        if s.get("status") == "skipped":
            return "skipped", _baseline_not_built(graph, results, w) or one_line(s.get("reason"), limit=None) \
                or f"{w} was skipped"
    missing = [w for w, s in states.items() if s.get("status") != "ok"]
    return "missing", f"not built: {', '.join(missing)}"


def _baseline_not_built(graph, results: dict, stage: str) -> Optional[str]:
    """Why `stage` (a benchmark) was skipped when its `baseline` input was not built: the row itself
    is fine but has nothing to be compared with; None otherwise."""
    node = graph.by_name.get(stage) if graph is not None else None
    if node is None or "baseline" not in node.inputs:
        return None
    dep = node.inputs["baseline"]
    if _status(results, dep).get("status") == "ok":
        return None
    upstream = graph.upstream(dep)
    cause = next((n for n in graph.names() if n in upstream and _status(results, n).get("status") == "failed"), dep)
    base = node.params.get("baseline_config") or "the baseline"
    return (f"not benchmarked: the baseline `{base}` was not built ({cause} failed), so there is nothing to "
            f"compare this row with")


def describe_model(recipe, model: str) -> str:
    if model == "student":
        return "student (distilled)" if recipe.distill is not None else "student"
    for p in recipe.prune:
        if p.name == model:
            if p.method == "unstructured":
                return f"{model} (unstructured prune {p.amount:.0%} of {p.model})"
            parts = [f"heads {p.heads:.0%}" if p.heads else "", f"ffn {p.ffn:.0%}" if p.ffn else ""]
            return f"{model} (structured prune of {p.model}: {', '.join(x for x in parts if x)})"
    return model


def build_rows(recipe, graph, results: dict) -> list[dict]:
    """One row per configuration of the recipe: what it is, whether it was built, what it measured."""
    quant = {q.name: q for q in recipe.quantize}
    prunes = {p.name: p for p in recipe.prune}
    rows = []
    for c in recipe.configs:
        status, reason = config_status(graph, results, c.name)
        ev = _status(results, f"evaluate:{c.name}")
        bm = _status(results, f"benchmark:{c.name}")
        q = quant.get(c.quantize) if c.quantize else None
        row: dict[str, Any] = {
            "name": c.name,
            "model": c.model,
            "model_description": describe_model(recipe, c.model),
            "sparsity": (prunes[c.model].method if c.model in prunes else None),
            "precision": c.precision,
            "quantization": q.method if q else None,
            "quantize_entry": c.quantize,
            "compiled": c.compile != "none",
            "compile_mode": c.compile,
            "runtime": c.runtime,
        }
        rows.append(row | measured_row(c.name, status, reason,
                                       (ev.get("metrics") or {}) if ev.get("status") == "ok" else {},
                                       (bm.get("metrics") or {}) if bm.get("status") == "ok" else {},
                                       recipe.benchmark.batch_sizes))
    return rows


def measured_row(name: str, status: str, reason: Optional[str], evaluate: dict, benchmark: dict,
                 batch_sizes) -> dict[str, Any]:
    """What a configuration's row says about its measurements: its build `status` and `reason`, the
    metrics of its evaluate stage and of its benchmark stage ({} when that stage did not run), per
    batch size (`batch_sizes` plus any the benchmark measured). Everything `verdict.judge` reads."""
    evm, bmm = evaluate, benchmark
    row: dict[str, Any] = {
        "name": name,
        "status": status,
        "reason": reason,
        "accuracy": _r(evm.get("accuracy"), 6),
        "macro_f1": _r(evm.get("macro_f1"), 6),
        "eval_n": evm.get("n"),
        "params": bmm.get("params"),
        "nonzero_params": bmm.get("nonzero_params"),
        "size_mb": _r(bmm.get("size_mb"), 3),
        "peak_mem_mb": _r(bmm.get("peak_mem_mb"), 1),
        "load_s": _r(bmm.get("load_s"), 3),
        "warmup_s": _r(bmm.get("warmup_s"), 3),
        "threads": bmm.get("threads"),
        "flops_per_sample": _r(bmm.get("flops_per_sample"), 0),
        "peak_source": bmm.get("peak_source"),
        "peak_flops": _r(bmm.get("peak_flops"), 0),
        "compute_precision": bmm.get("compute_precision"),
        "latency_ms": {}, "e2e_latency_ms": {}, "throughput": {}, "pct_peak": {}, "cv": {}, "spread": {},
        "seq_len": {}, "pretokenized_ms": {}, "pipelined": {},
        # the paired benchmark (docs/results-schema.md): absent for the baseline row and older metrics
        "compared_with": (bmm.get("baseline") or {}).get("config"),
        "paired": {}, "paired_run": {}, "baseline_p50_ms": {}, "scope_order": {},
        "tokenizer_threads": bmm.get("tokenizer_threads"),
    }
    batches = sorted({str(b) for b in batch_sizes} | set(bmm.get("batches") or {}), key=int)
    for b in batches:
        entry = (bmm.get("batches") or {}).get(b)
        if not entry:
            continue
        m, e = entry.get("model"), entry.get("e2e")
        if m:
            row["latency_ms"][b] = {"p50": _r(m["p50"], 4), "p90": _r(m.get("p90"), 4), "p99": _r(m["p99"], 4)}
        if e:
            row["e2e_latency_ms"][b] = {"p50": _r(e["p50"], 4), "p90": _r(e.get("p90"), 4), "p99": _r(e["p99"], 4)}
        row["throughput"][b] = {"model": _r(m and m.get("throughput"), 2), "e2e": _r(e and e.get("throughput"), 2)}
        row["pct_peak"][b] = {"model": _r(m and m.get("pct_peak"), 4), "e2e": _r(e and e.get("pct_peak"), 4)}
        for key in ("cv", "spread"):  # spread: None in metrics cached before it was recorded
            row[key][b] = {"model": _r(m and m.get(key), 6), "e2e": _r(e and e.get(key), 6)}
        row["seq_len"][b] = entry.get("seq_len")
        pre, pipe = entry.get("pretokenized"), entry.get("e2e_pipelined")
        if pre:
            row["pretokenized_ms"][b] = {"p50": _r(pre["p50"], 4), "p99": _r(pre["p99"], 4)}
        if pipe and pipe.get("gain"):
            row["pipelined"][b] = {"throughput": _r(pipe["throughput"], 2), "gain": _r(pipe["gain"], 4),
                                   "sequential_throughput": _r(pipe["sequential_throughput"], 2),
                                   "batches": pipe["batches"]}
        pairs, run, base = entry.get("paired"), entry.get("paired_run"), entry.get("baseline")
        if pairs is not None and run is not None:
            row["paired"][b] = {scope: paired_scope(c) for scope, c in pairs.items()}
            row["paired_run"][b] = {"rounds": run.get("rounds"), "stopped": run.get("stopped"),
                                    "too_slow": bool(run.get("too_slow")), "elapsed_s": _r(run.get("elapsed_s"), 3),
                                    "ci_width": run.get("ci_width"), "confidence": run.get("confidence"),
                                    "min_rounds": run.get("min_rounds")}
        if entry.get("scope_order"):
            row["scope_order"][b] = [{"inner": o["inner"], "outer": o["outer"], "ratio": _r(o.get("ratio"), 4),
                                      "ci_low": _r(o.get("ci_low"), 4), "ci_high": _r(o.get("ci_high"), 4),
                                      "holds": o.get("holds")} for o in entry["scope_order"]]
        if base:
            row["baseline_p50_ms"][b] = {scope: _r(base[scope]["p50"], 4) if base.get(scope) else None
                                         for scope in ("model", "e2e", "pretokenized")}
    return row


def paired_scope(c: dict) -> dict:
    """One scope of a paired measurement as results.json carries it."""
    return {"speedup": _r(c.get("speedup"), 4), "speedup_ci_low": _r(c.get("ci_low"), 4),
            "speedup_ci_high": _r(c.get("ci_high"), 4), "half_width": _r(c.get("half_width"), 6),
            "conclusive": bool(c.get("conclusive")), "blocks": c.get("blocks"),
            "calls": {"row": c.get("calls_row"), "base": c.get("calls_base")}}


def judged_rows(recipe, graph, results: dict) -> list[dict]:
    """`build_rows` with each row compared to the baseline and given its verdict (`verdict.judge`)."""
    rows = build_rows(recipe, graph, results)
    judge_rows(rows, recipe.baseline_config, recipe.gates)
    return rows


def device_line(env: dict, rows_bench: list[dict]) -> str:
    """`AMD EPYC (2 cores, 2 threads)` or `NVIDIA H100 80GB HBM3 (driver 550.54, CUDA 12.8)`."""
    dev = dict((rows_bench[0] if rows_bench else {}) or {})
    dev.update({k: v for k, v in (env.get("device") or {}).items() if v not in (None, "")})
    kind, name = dev.get("kind", "?"), dev.get("name") or "unknown device"
    extra = []
    if kind == "cuda":
        if dev.get("driver"):
            extra.append(f"driver {dev['driver']}")
        if dev.get("cuda"):
            extra.append(f"CUDA {dev['cuda']}")
        if dev.get("capability"):
            extra.append(f"sm {dev['capability']}")
    else:
        if dev.get("cores"):
            extra.append(f"{dev['cores']} cores")
        if dev.get("mhz"):
            extra.append(f"{float(dev['mhz']) / 1000:.2f} GHz")
        flags = dev.get("flags") or []
        isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
        if isa:
            extra.append(" ".join(isa))
    return f"{kind}: {name}" + (f" ({', '.join(extra)})" if extra else "")


def assemble(recipe, graph, results: dict, env: dict, recipe_path: Optional[str] = None) -> dict:
    """The results document (docs/results-schema.md). Deterministic for the same inputs."""
    baseline = recipe.baseline_config
    rows = judged_rows(recipe, graph, results)
    bench_devices = []
    threads = None
    for c in recipe.configs:
        st = _status(results, f"benchmark:{c.name}")
        if st.get("status") == "ok" and (st.get("metrics") or {}).get("device"):
            bench_devices.append(st["metrics"]["device"])
            threads = threads or st["metrics"].get("threads")
    device_info = dict(bench_devices[0]) if bench_devices else {}
    device_info.update({k: v for k, v in (env.get("device") or {}).items() if v not in (None, "")})
    if threads:
        device_info.setdefault("threads", threads)
    return {
        "schema_version": SCHEMA_VERSION,
        "recipe": recipe.name,
        "recipe_path": str(recipe_path) if recipe_path is not None else None,
        "recipe_hash": env.get("recipe_hash"),
        "device": device_line(env, bench_devices),
        "device_info": device_info,
        "versions": dict(sorted((env.get("versions") or {}).items())),
        "data_fingerprint": env.get("data_fingerprint"),
        "baseline": baseline,
        "best": pick_best(rows),
        "gates": {"max_accuracy_drop": recipe.gates.max_accuracy_drop, "min_speedup": recipe.gates.min_speedup,
                  "max_spread": recipe.gates.max_spread, "max_cv": recipe.gates.max_cv},
        "benchmark": {"batch_sizes": [str(b) for b in recipe.benchmark.batch_sizes],
                      "end_to_end": recipe.benchmark.end_to_end,
                      "fixed_length": recipe.benchmark.fixed_length,
                      "threads": threads,
                      "max_seconds": recipe.benchmark.max_seconds, "ci_width": recipe.benchmark.ci_width,
                      "confidence": recipe.benchmark.confidence, "min_rounds": recipe.benchmark.min_rounds},
        "configs": rows,
        "serving": serving_from_results(results),
    }
