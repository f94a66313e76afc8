"""The results document of a causal-lm recipe, and its verdicts. Pure: plain dicts, no torch, no I/O.

One row per configuration: perplexity and its increase over the baseline, prefill latency and time to first
token per prompt length, decode tokens/s per batch size, each with the paired speedup (and interval) the
row's benchmark measured against the baseline, peak memory, size, and how many modules its quantize stage
quantized and kept float (so a quantization that did nothing shows).

Verdict (the classifier rules, `verdict.paired_speed_reasons`, with perplexity for accuracy):
  failed / skipped / missing         as for classifiers (the first failed stage on the row's path)
  perplexity +X% > G%                the increase over the baseline's perplexity above
                                     gates.max_perplexity_increase (default recipe.LM_MAX_PPL_INCREASE)
  slower than baseline / inconclusive / speedup S (lo-hi) < G× at batch b
                                     on the decode tokens/s speedup, at every decode batch size
No reason: "ready". Prefill and time-to-first-token speedups are reported, not gated.
"""

from __future__ import annotations

from typing import Any, Optional

from optforge.recipe import LM_MAX_PPL_INCREASE
from optforge.report import fmt
from optforge.report.results import SCHEMA_VERSION, _status, config_status, describe_model, device_line, paired_scope
from optforge.report.verdict import ROUND_CMP, paired_speed_reasons, rounded

TASK = "causal-lm"


def _ok(results: dict, name: str) -> dict:
    st = _status(results, name)
    return (st.get("metrics") or {}) if st.get("status") == "ok" else {}


def _paired(entry: dict, name: str) -> Optional[dict]:
    c = (entry.get("paired") or {}).get(name)
    return paired_scope(c) if c else None


def lm_row(recipe, graph, results: dict, c) -> dict[str, Any]:
    status, reason = config_status(graph, results, c.name)
    ev, bm = _ok(results, f"evaluate:{c.name}"), _ok(results, f"benchmark:{c.name}")
    qm = _ok(results, f"quantize:{c.name}")
    q = next((x for x in recipe.quantize if x.name == c.quantize), None)
    row: dict[str, Any] = {
        "name": c.name, "model": c.model, "model_description": describe_model(recipe, c.model),
        "precision": c.precision, "quantization": q.method if q else None, "quantize_entry": c.quantize,
        "group_size": getattr(q, "group_size", None) if q else None,
        "compiled": c.compile != "none", "compile_mode": c.compile, "status": status, "reason": reason,
        "perplexity": rounded(ev.get("perplexity"), 4), "tokens_scored": ev.get("tokens_scored"),
        "modules_quantized": qm.get("modules_quantized"), "modules_skipped": qm.get("modules_skipped"),
        "conv1d_converted": qm.get("conv1d_converted"),
        "size_mb": rounded(bm.get("size_mb"), 3), "peak_mem_mb": rounded(bm.get("peak_mem_mb"), 1),
        "params": bm.get("params"), "nonzero_params": bm.get("nonzero_params"),
        "load_s": rounded(bm.get("load_s"), 3), "warmup_s": rounded(bm.get("warmup_s"), 3),
        "compared_with": (bm.get("baseline") or {}).get("config"),
        "prefill_ms": {}, "ttft_ms": {}, "prefill_speedup": {}, "ttft_speedup": {},
        "decode_tokens_per_s": {}, "decode_ms": {}, "decode_speedup": {}, "paired_run": {},
    }
    for length, entry in (bm.get("prompts") or {}).items():
        for key, name in (("prefill", "prefill"), ("ttft", "ttft")):
            if entry.get(name):
                row[f"{key}_ms"][length] = rounded(entry[name]["p50"], 4)
            pair = _paired(entry, name)
            if pair:
                row[f"{key}_speedup"][length] = pair
    for b, entry in (bm.get("decode") or {}).items():
        if entry.get("decode"):
            row["decode_ms"][b] = rounded(entry["decode"]["p50"], 4)
        row["decode_tokens_per_s"][b] = rounded(entry.get("tokens_per_s"), 2)
        pair = _paired(entry, "decode")
        if pair and entry.get("paired_run"):
            row["decode_speedup"][b] = pair
            run = entry["paired_run"]
            row["paired_run"][b] = {k: run.get(k) for k in ("rounds", "stopped", "too_slow", "ci_width",
                                                            "confidence", "min_rounds")}
    return row


def judge_lm(row: dict, base: Optional[dict], gates) -> dict:
    """`ppl_increase_pct` (vs the baseline), `is_baseline`, `reasons`, `verdict` (module docstring)."""
    is_base = base is not None and row["name"] == base["name"]
    ppl, bppl = row["perplexity"], base and base["perplexity"]
    increase = rounded((ppl / bppl - 1) * 100, 4) if ppl is not None and bppl else None
    out = {"is_baseline": is_base, "ppl_increase_pct": increase}
    if row["status"] != "ok":
        reasons = [f"{row['status']}: {row['reason']}" if row["status"] != "missing" else row["reason"]]
        return out | {"reasons": reasons, "verdict": reasons[0]}
    if is_base:
        return out | {"reasons": [], "verdict": "baseline"}
    reasons = []
    gate = gates.max_perplexity_increase if gates.max_perplexity_increase is not None else LM_MAX_PPL_INCREASE
    if increase is not None and rounded(increase, ROUND_CMP) > gate:
        reasons.append(f"perplexity +{increase:.2f}% > {gate:g}%")
    if row["paired_run"]:
        view = {"speedup_scope": "decode", "paired_run": row["paired_run"],
                "paired": {b: {"decode": c} for b, c in row["decode_speedup"].items()}}
        reasons += paired_speed_reasons(view, gates.min_speedup)
    elif base is not None:
        reasons.append("not compared with the baseline (no paired decode measurement)")
    return out | {"reasons": reasons, "verdict": "; ".join(reasons) or "ready"}


def assemble_lm(recipe, graph, results: dict, env: dict, recipe_path: Optional[str] = None) -> dict:
    rows = [lm_row(recipe, graph, results, c) for c in recipe.configs]
    base = next((r for r in rows if r["name"] == recipe.baseline_config), None)
    for r in rows:
        r.update(judge_lm(r, base, recipe.gates))
    ready = [r for r in rows if r["verdict"] == "ready"]
    # best: the ready row whose lowest decode-speedup interval end is highest (then lower perplexity)
    best = max(ready, key=lambda r: (min((c["speedup_ci_low"] or 0.0) for c in r["decode_speedup"].values()),
                                     -(r["perplexity"] or 0.0)), default=None)
    notes = lm_notes(rows, base)
    devices = [m["device"] for c in recipe.configs if (m := _ok(results, f"benchmark:{c.name}")).get("device")]
    bm = next((m for c in recipe.configs if (m := _ok(results, f"benchmark:{c.name}"))), {})
    proto = recipe.perplexity_protocol()
    return {
        "schema_version": SCHEMA_VERSION, "task": TASK, "recipe": recipe.name,
        "recipe_path": str(recipe_path) if recipe_path is not None else None,
        "recipe_hash": env.get("recipe_hash"), "device": device_line(env, devices),
        "versions": dict(sorted((env.get("versions") or {}).items())),
        "data_fingerprint": env.get("data_fingerprint"), "baseline": recipe.baseline_config,
        "best": best["name"] if best else None,
        "gates": {"max_perplexity_increase": (recipe.gates.max_perplexity_increase
                                              if recipe.gates.max_perplexity_increase is not None
                                              else LM_MAX_PPL_INCREASE),
                  "min_speedup": recipe.gates.min_speedup},
        "perplexity": {"context_length": proto.context_length, "stride": proto.stride},
        "benchmark": {"prompt_lengths": sorted((bm.get("prompts") or {}), key=int),
                      "batch_sizes": [str(b) for b in recipe.benchmark.batch_sizes],
                      "new_tokens": bm.get("new_tokens"), "decode_prompt_length": bm.get("decode_prompt_length"),
                      "threads": bm.get("threads"), "max_seconds": recipe.benchmark.max_seconds,
                      "ci_width": recipe.benchmark.ci_width, "confidence": recipe.benchmark.confidence},
        "configs": rows,
        "notes": notes,
    }


def lm_notes(rows: list[dict], base: Optional[dict]) -> list[str]:
    """What a reader of the causal-LM table could misread, said once per fact."""
    notes = []
    for r in rows:
        if r["modules_skipped"]:
            notes.append(f"`{r['name']}`: {r['modules_skipped']} module(s) kept float: shapes its method's kernels "
                         f"do not take (e.g. an LM head whose vocabulary is not a multiple of 16 for CPU int4)")
    grown = [r["name"] for r in rows if r["modules_quantized"] and base and base["size_mb"] and r["size_mb"]
             and r["size_mb"] > base["size_mb"]]
    if grown:
        notes.append(f"{', '.join(f'`{n}`' for n in grown)}: larger on disk than the baseline: the LM head shares "
                     f"its weights with the input embeddings in the float model; quantized, it becomes its own "
                     f"tensor while the embeddings stay float")
    if any(r["compiled"] for r in rows):
        notes.append("compiled rows: perplexity is computed with the same weights run eagerly; compilation "
                     "happens at load and on each new shape (the benchmark's warm-up, not its timings)")
    return notes


def view(doc: dict) -> dict:
    """The template's view of a causal-lm results document: every cell already formatted."""
    lengths, batches = doc["benchmark"]["prompt_lengths"], doc["benchmark"]["batch_sizes"]

    def speed(c: Optional[dict]) -> str:
        if not c or c.get("speedup") is None:
            return fmt.NA
        return fmt.speedup(c["speedup"], c.get("speedup_ci_low"), c.get("speedup_ci_high"))

    rows = []
    for r in doc["configs"]:
        what = [r["model_description"], r["precision"]]
        if r["quantization"]:
            what.append(r["quantization"] + (f" (group {r['group_size']})" if r.get("group_size") else ""))
        if r["compiled"]:
            what.append(f"compiled ({r['compile_mode']}, static KV cache)")
        quantized = (fmt.NA if r["modules_quantized"] is None
                     else f"{r['modules_quantized']} / {r['modules_skipped']} float")
        rows.append({
            "name": r["name"], "what": ", ".join(what), "verdict": r["verdict"],
            "ppl": fmt.NA if r["perplexity"] is None else f"{r['perplexity']:.3f}",
            "ppl_delta": fmt.NA if r["ppl_increase_pct"] is None else f"{r['ppl_increase_pct']:+.2f}%",
            "prefill": {L: (fmt.ms(r["prefill_ms"].get(L)) if r["prefill_ms"].get(L) is not None else fmt.NA)
                        for L in lengths},
            "ttft": {L: (fmt.ms(r["ttft_ms"].get(L)) if r["ttft_ms"].get(L) is not None else fmt.NA) for L in lengths},
            "prefill_speedup": {L: speed(r["prefill_speedup"].get(L)) for L in lengths},
            "tps": {b: (f"{r['decode_tokens_per_s'][b]:.1f}" if r["decode_tokens_per_s"].get(b) else fmt.NA)
                    for b in batches},
            "decode_speedup": {b: speed(r["decode_speedup"].get(b)) for b in batches},
            "mem": fmt.NA if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.1f}",
            "size": fmt.NA if r["size_mb"] is None else f"{r['size_mb']:.2f}",
            "quantized": quantized, "ready": r["verdict"] == "ready",
        })
    return {"doc": doc, "rows": rows, "lengths": lengths, "batches": batches}
