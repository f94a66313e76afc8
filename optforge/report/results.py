"""Stage results -> the results document (results.json) with one row per configuration and its verdict.

Pure: plain dicts in, plain dicts out; no torch, no jinja, no I/O. The renderers and the comparison
read only this document, so what the report says and what results.json says cannot drift apart.

Verdict rules (gates from `recipe.gates`; a value exactly at a threshold passes):
  failed: <stage>: <reason>          a stage on the configuration's path failed (nothing else checked)
  skipped: ... / missing: ...        it was not built
  accuracy drop X > G                baseline accuracy - this accuracy, in points, above max_accuracy_drop
  slower than baseline (S at b)      end-to-end p50 speedup < 1 at some batch size (worst one named)
  speedup S < G at batch b           1 <= speedup < min_speedup at the worst batch size
  unstable timing (IQR X% of median > G% at batch b, scope)
                                     the largest spread ((p75 - p25) / p50) over batch sizes and scopes
                                     above max_spread; metrics without a spread are not gated
  unstable timing (cv X% > G% at batch b, scope)
                                     the largest cv over batch sizes and scopes above max_cv (only
                                     when max_cv is set)
Several reasons are joined with "; ". No reason -> "ready". The baseline row's verdict is "baseline"
(plus "; unstable timing ..." when its own timing is unstable, since every speedup divides by it).
Comparisons use values rounded to 6 decimals, so float noise (0.9 - 0.89 = 0.0100000000000000009)
does not fail a gate that the printed numbers pass.
"""

from __future__ import annotations

from typing import Any, Optional

from optforge.errors import one_line
from optforge.report.serving import serving_from_results

SCHEMA_VERSION = 1
ROUND_CMP = 6  # decimals for gate comparisons


def _r(x: Optional[float], nd: int) -> Optional[float]:
    if x is None:
        return None
    v = round(float(x), nd)
    return 0.0 if v == 0 else v  # no "-0.0" in the JSON


def _status(results: dict, name: str) -> dict:
    return results.get(name) or {"status": "missing", "metrics": {}, "reason": None, "key": None}


def stage_label(name: str, config: str, graph=None) -> str:
    """A row's own stage by its kind (`quantize:int8` -> `quantize`: the row already names the config);
    any other stage whole (`prune:p50`)."""
    node = graph.by_name.get(name) if graph is not None else None
    kind, _, rest = name.partition(":")
    own = node.config == config if node is not None else rest == config
    return kind if own else name


def config_status(graph, results: dict, config: str) -> tuple[str, Optional[str]]:
    """("ok" | "failed" | "skipped" | "missing", reason) of the path that produces a config's row."""
    wanted = [f"evaluate:{config}", f"benchmark:{config}"]
    if graph is not None:
        path = set()
        for w in wanted:
            if w in graph.by_name:
                path |= graph.upstream(w)
        order = [n for n in graph.names() if n in path] or wanted
    else:
        order = wanted
    for name in order:  # topological: the first failure is the cause, later ones are consequences
        st = _status(results, name)
        if st.get("status") == "failed":
            return "failed", f"{stage_label(name, config, graph)}: {one_line(st.get('reason'), limit=None) or 'failed'}"
    states = {w: _status(results, w) for w in wanted}
    if all(s.get("status") == "ok" for s in states.values()):
        return "ok", None
    for w, s in states.items():
        if s.get("status") == "skipped":
            return "skipped", one_line(s.get("reason"), limit=None) or f"{w} was skipped"
    missing = [w for w, s in states.items() if s.get("status") != "ok"]
    return "missing", f"not built: {', '.join(missing)}"


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


def _batches(recipe, bm: dict) -> list[str]:
    keys = {str(b) for b in recipe.benchmark.batch_sizes} | set((bm or {}).get("batches", {}))
    return sorted(keys, key=int)


def build_rows(recipe, graph, results: dict) -> list[dict]:
    quant = {q.name: q for q in recipe.quantize}
    prunes = {p.name: p for p in recipe.prune}
    rows = []
    for c in recipe.configs:
        status, reason = config_status(graph, results, c.name)
        ev = _status(results, f"evaluate:{c.name}")
        bm = _status(results, f"benchmark:{c.name}")
        evm = (ev.get("metrics") or {}) if ev.get("status") == "ok" else {}
        bmm = (bm.get("metrics") or {}) if bm.get("status") == "ok" else {}
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
        }
        for b in _batches(recipe, bmm):
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
        rows.append(row)
    return rows


def _latency(row: dict, b: str, scope: str) -> Optional[float]:
    block = row["e2e_latency_ms" if scope == "e2e" else "latency_ms"].get(b)
    return block["p50"] if block else None


def add_comparisons(rows: list[dict], baseline: str) -> None:
    """accuracy_delta (points), speedup (end-to-end p50, baseline / this), model_speedup, speedup_min."""
    base = next((r for r in rows if r["name"] == baseline), None)
    for row in rows:
        row["is_baseline"] = row["name"] == baseline
        acc, bacc = row["accuracy"], base and base["accuracy"]
        row["accuracy_delta"] = _r((acc - bacc) * 100, 4) if acc is not None and bacc is not None else None
        row["speedup"], row["model_speedup"] = {}, {}
        row["speedup_scope"] = "e2e"
        if base is None:
            row["speedup_min"] = None
            continue
        use_e2e = bool(row["e2e_latency_ms"]) and bool(base["e2e_latency_ms"])
        row["speedup_scope"] = "e2e" if use_e2e else "model"
        for b in row["latency_ms"]:
            sm = _ratio(_latency(base, b, "model"), _latency(row, b, "model"))
            se = _ratio(_latency(base, b, "e2e"), _latency(row, b, "e2e")) if use_e2e else sm
            if sm is not None:
                row["model_speedup"][b] = sm
            if se is not None:
                row["speedup"][b] = se
        row["speedup_min"] = min(row["speedup"].values()) if row["speedup"] else None


def _ratio(base: Optional[float], this: Optional[float]) -> Optional[float]:
    if base is None or this is None or base <= 0 or this <= 0:
        return None
    return _r(base / this, 4)


def _fmt_pair(value: float, gate: float, decimals: int, scale: float = 1.0) -> tuple[str, str]:
    """Format value and gate with the fewest decimals (>= `decimals`) that show them different."""
    for d in range(decimals, 7):
        a, g = f"{value * scale:.{d}f}", f"{gate * scale:.{d}f}"
        if a != g:
            return a, g
    return f"{value * scale}", f"{gate * scale}"


def gate_reasons(row: dict, base: Optional[dict], gates) -> list[str]:
    """Why a built configuration is not ready (empty list: ready). See the module docstring."""
    reasons = []
    if base is None or base["status"] != "ok":
        reasons.append("no baseline to compare against (baseline not built)")
    elif not row["is_baseline"]:
        if row["accuracy_delta"] is not None:
            drop = _r(-row["accuracy_delta"], ROUND_CMP)
            if drop > gates.max_accuracy_drop:
                a, g = _fmt_pair(drop, gates.max_accuracy_drop, 1)
                reasons.append(f"accuracy drop {a} > {g}")
        if row["speedup"]:
            worst_b = min(row["speedup"], key=lambda b: (row["speedup"][b], int(b)))
            s = _r(row["speedup"][worst_b], ROUND_CMP)
            if s < 1.0 and s < gates.min_speedup:
                reasons.append(f"slower than baseline ({s:.2f}x at batch {worst_b})")
            elif s < gates.min_speedup:
                a, g = _fmt_pair(s, gates.min_speedup, 1)
                reasons.append(f"speedup {a}x < {g}x at batch {worst_b}")
    for key, (v, b, scope), gate in unstable_timing(row, gates.max_spread, gates.max_cv):
        a, g = _fmt_pair(v, gate, 0, scale=100)
        what = f"IQR {a}% of median" if key == "spread" else f"cv {a}%"
        reasons.append(f"unstable timing ({what} > {g}% at batch {b}, {scope})")
    return reasons


def unstable_timing(row: dict, max_spread: Optional[float],
                    max_cv: Optional[float]) -> list[tuple[str, tuple[float, str, str], float]]:
    """[("spread" | "cv", (value, batch, scope), gate)] for each stability gate the row fails: its worst
    spread above `max_spread`, its worst cv above `max_cv`. A gate of None and a measure the metrics
    lack (older cached benchmarks have no spread) are not checked."""
    out = []
    for key, gate, worst in (("spread", max_spread, worst_spread(row)), ("cv", max_cv, worst_cv(row))):
        if gate is not None and worst is not None and _r(worst[0], ROUND_CMP) > gate:
            out.append((key, worst, gate))
    return out


def _worst(row: dict, key: str) -> Optional[tuple[float, str, str]]:
    worst = None
    for b, scopes in (row.get(key) or {}).items():
        for scope, v in scopes.items():
            if v is not None and (worst is None or v > worst[0]):
                worst = (v, b, scope)
    return worst


def worst_cv(row: dict) -> Optional[tuple[float, str, str]]:
    """(cv, batch, scope) of the least stable measurement of a row by cv; the first one on ties."""
    return _worst(row, "cv")


def worst_spread(row: dict) -> Optional[tuple[float, str, str]]:
    """(spread, batch, scope) of the least stable measurement of a row by IQR / median; the first one
    on ties; None when no measurement has a spread."""
    return _worst(row, "spread")


def add_verdicts(rows: list[dict], baseline: str, gates) -> None:
    base = next((r for r in rows if r["name"] == baseline), None)
    for row in rows:
        if row["status"] != "ok":
            row["reasons"] = [f"{row['status']}: {row['reason']}" if row["status"] != "missing"
                              else row["reason"]]
            row["verdict"] = row["reasons"][0]
            continue
        row["reasons"] = gate_reasons(row, base, gates)
        if row["is_baseline"]:
            row["verdict"] = "; ".join(["baseline"] + row["reasons"])
        else:
            row["verdict"] = "; ".join(row["reasons"]) or "ready"


def pick_best(rows: list[dict]) -> Optional[str]:
    """The ready configuration with the highest minimum speedup over batch sizes; ties -> higher
    accuracy; still tied -> earlier in the recipe."""
    best, best_key = None, None
    for i, row in enumerate(rows):
        if row["verdict"] != "ready":
            continue
        key = (row["speedup_min"] if row["speedup_min"] is not None else float("-inf"),
               row["accuracy"] if row["accuracy"] is not None else float("-inf"), -i)
        if best_key is None or key > best_key:
            best, best_key = row["name"], key
    return best


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
    rows = build_rows(recipe, graph, results)
    add_comparisons(rows, baseline)
    add_verdicts(rows, baseline, recipe.gates)
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
                      "threads": threads},
        "configs": rows,
        "serving": serving_from_results(results),
    }
