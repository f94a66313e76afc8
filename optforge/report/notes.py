""""What the numbers mean": short honest notes generated from the results document. Pure.

Each note is one string; `names` in backticks are rendered as code (and escaped) by the templates.
A note is only written when the data supports it.
"""

from __future__ import annotations

from typing import Optional

from optforge.report import fmt
from optforge.report.verdict import unstable_timing

GLUE_DOMINATES = 0.5  # end-to-end time outside the model forward, as a fraction


def _p50(row: dict, b: str, scope: str) -> Optional[float]:
    block = row["e2e_latency_ms" if scope == "e2e" else "latency_ms"].get(b)
    return block["p50"] if block else None


def _twin(rows: list[dict], row: dict, **changes) -> Optional[dict]:
    """The built row that differs from `row` only in the given fields."""
    keys = ("model", "precision", "quantization", "compiled", "runtime")
    want = {k: row.get(k) for k in keys} | changes
    for r in rows:
        if r is not row and r["status"] == "ok" and all(r.get(k) == v for k, v in want.items()):
            return r
    return None


def _split(row: dict, b: str) -> Optional[str]:
    """'batch b: forward M of E ms, X% outside the model (tokenizer T%)' for one row and batch size."""
    m, e = _p50(row, b, "model"), _p50(row, b, "e2e")
    if m is None or not e:
        return None
    text = f"batch {b}: forward {fmt.ms(m)} of {fmt.ms(e)} ms, {fmt.pct(max(e - m, 0) / e * 100)} outside the model"
    pre = (row["pretokenized_ms"].get(b) or {}).get("p50")
    if pre is not None:
        text += f" (tokenization {fmt.pct(max(e - pre, 0) / e * 100)})"
    return text


def glue_notes(doc: dict, ok: list[dict]) -> list[str]:
    out = []
    batches = doc["benchmark"]["batch_sizes"]
    base = next((r for r in ok if r["is_baseline"]), ok[0] if ok else None)
    if base is None or not base["e2e_latency_ms"]:
        return out
    fastest = min((r for r in ok if _p50(r, batches[-1], "model") is not None),
                  key=lambda r: _p50(r, batches[-1], "model"), default=None)
    for row in [base] + ([fastest] if fastest is not None and fastest is not base else []):
        parts = [_split(row, b) for b in batches]
        parts = [p for p in parts if p]
        if parts:
            lead = ("End-to-end latency = tokenization + host/device copies + forward + softmax and Python glue. "
                    if row is base else "")
            out.append(f"{lead}For `{row['name']}`: " + "; ".join(parts) + ".")
    gains = [(r["pipelined"][b]["gain"], r, b) for r in ok for b in batches
             if r["pipelined"].get(b)]
    if gains:
        g, r, b = max(gains, key=lambda x: x[0])
        out.append(f"Overlapping the next batch's tokenization with this batch's forward (`predict_pipelined`) "
                   f"gives up to {fmt.times(g)} the samples/s of one batch at a time (`{r['name']}` at batch {b}: "
                   f"{fmt.rate(r['pipelined'][b]['throughput'])} vs "
                   f"{fmt.rate(r['pipelined'][b]['sequential_throughput'])} samples/s).")
    heavy = []
    for r in ok:
        for b in batches:
            m, e = _p50(r, b, "model"), _p50(r, b, "e2e")
            if m is not None and e and (e - m) / e >= GLUE_DOMINATES:
                heavy.append(f"`{r['name']}` at batch {b} ({fmt.pct((e - m) / e * 100)})")
    if heavy:
        out.append("Tokenization and glue dominate end-to-end time for " + ", ".join(heavy)
                   + ": a faster model moves these numbers little; the model-only speedup shows what the "
                     "optimization itself bought.")
    return out


def bf16_cpu_notes(doc: dict, ok: list[dict]) -> list[str]:
    dev = doc.get("device_info") or {}
    if dev.get("kind") != "cpu":
        return []
    amx = "amx_bf16" in (dev.get("flags") or [])
    out = []
    for r in ok:
        if r["precision"] != "bf16":
            continue
        twin = _twin(ok, r, precision="fp32")
        if twin is None:
            continue
        ratios = [(b, _p50(r, b, "model") / _p50(twin, b, "model")) for b in r["latency_ms"]
                  if _p50(twin, b, "model") and _p50(r, b, "model")]
        slower = [(b, x) for b, x in ratios if x > 1.0]
        if slower:
            where = ", ".join(f"{x:.2f}x at batch {b}" for b, x in slower)
            why = ("this CPU has AMX, yet bf16 did not pay off at these shapes" if amx else
                   "this CPU has no AMX tile units: bf16 GEMMs and the casts around the element-wise ops "
                   "cost more than the halved weight traffic saves")
            out.append(f"bf16 is slower than fp32 on this CPU: the model p50 of `{r['name']}` is {where} that "
                       f"of its fp32 twin `{twin['name']}` ({why}).")
    return out


def sparsity_notes(doc: dict, ok: list[dict], prunes: dict) -> list[str]:
    out = []
    for r in ok:
        p = prunes.get(r["model"])
        if not p or p["method"] != "unstructured":
            continue
        parent = _twin(ok, r, model=p["model"])
        if parent is None:
            continue
        ratios = [_p50(r, b, "model") / _p50(parent, b, "model") for b in r["latency_ms"]
                  if _p50(parent, b, "model") and _p50(r, b, "model")]
        if not ratios:
            continue
        lo, hi = min(ratios), max(ratios)
        span = f"{lo:.2f}x" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f}x"
        zeros = f" ({p['amount'] * 100:.0f}% of Linear weights zeroed" if p.get("amount") else " ("
        if r["params"] and r["nonzero_params"] is not None:
            zeros += ("; " if p.get("amount") else "") + \
                f"{fmt.pct(100 * (1 - r['nonzero_params'] / r['params']))} of all parameters are zero"
        zeros = zeros + ")" if zeros != " (" else ""
        if hi > 0.9:
            out.append(f"Unstructured sparsity did not speed up dense kernels: `{r['name']}`{zeros} runs at "
                       f"{span} the model latency of its dense parent `{parent['name']}`. Zeros are still "
                       f"multiplied; only structured pruning (fewer heads/channels) or sparse kernels buy time.")
        else:
            out.append(f"`{r['name']}`{zeros} runs at {span} the model latency of its dense parent "
                       f"`{parent['name']}`.")
    return out


def stability_notes(doc: dict, ok: list[dict]) -> list[str]:
    """The rows whose timing fails a stability gate (the same test as the verdicts'), by measure."""
    gates = doc["gates"]
    shaky: dict[str, list[str]] = {"spread": [], "cv": []}
    for r in ok:
        for key, (v, b, scope), _ in unstable_timing(r, gates.get("max_spread"), gates.get("max_cv")):
            shaky[key].append(f"`{r['name']}` ({fmt.pct(v * 100)} at batch {b}, {scope})")
    parts = []
    if shaky["spread"]:
        parts.append(f"IQR above {fmt.pct(gates['max_spread'] * 100)} of the median for " + ", ".join(shaky["spread"]))
    if shaky["cv"]:
        parts.append(f"cv above the {fmt.pct(gates['max_cv'] * 100)} gate for " + ", ".join(shaky["cv"]))
    if not parts:
        return []
    threads = doc["benchmark"].get("threads")
    return ["Unstable timing: " + "; ".join(parts)
            + ". Rerun on a quiet machine" + (f" (timed with {threads} threads)" if threads else "")
            + " before trusting these speedups."]


def peak_notes(doc: dict, ok: list[dict]) -> list[str]:
    peaks = sorted({(r.get("compute_precision") or r["precision"], r["peak_flops"], r["peak_source"])
                    for r in ok if r.get("peak_flops")}, key=lambda p: (p[1], p[0]))
    if not peaks:
        known = any(v is not None for r in ok for sc in r["pct_peak"].values() for v in sc.values())
        return ["% of peak: n/a (no known peak for this device and precision)."] if ok and not known else []
    listed = "; ".join(f"{prec} {fmt.flops_rate(flops)} ({src})" for prec, flops, src in peaks)
    return ["% of peak = achieved FLOP/s of the model forward (FLOPs of the padded batch / p50) over the "
            f"peak for the row's compute precision: {listed}. Nobody reaches a peak (a large bf16 matmul on "
            "an H100 measures ~80% of its 989 TFLOP/s spec); small batches of short sentences are bound by "
            "kernel launches and memory, not FLOPs."]


def input_notes(doc: dict, ok: list[dict]) -> list[str]:
    bench = doc["benchmark"]
    lens = {}
    for r in ok:
        for b, n in r["seq_len"].items():
            if n is not None:
                lens.setdefault(b, set()).add(n)
    how = (f"padded to {bench['fixed_length']} tokens" if bench.get("fixed_length")
           else "padded to the longest in the batch")
    if lens:
        how += " (" + ", ".join(f"batch {b}: {'/'.join(str(x) for x in sorted(v))} tokens"
                                for b, v in sorted(lens.items(), key=lambda kv: int(kv[0]))) + ")"
    out = [f"Inputs: real eval sentences, one seeded sample per batch size, {how}. Latencies are per batch; "
           f"p50/p99 over time-boxed runs after warm-up."]
    tok = sorted({r["tokenizer_threads"] for r in ok if r.get("tokenizer_threads")})
    if tok:
        out[0] += (f" End to end, the Rust tokenizer ran on {'/'.join(str(t) for t in tok)} thread"
                   f"{'s' if tok != [1] else ''} (its pool is sized once per process, from RAYON_NUM_THREADS "
                   f"when set, else the CPU count: set it before `optforge build` to pin it).")
    return out


def speedup_notes(doc: dict, ok: list[dict]) -> list[str]:
    """How the speedups were measured (paired, or the cross-stage fallback), and the rows whose
    interval stayed too wide."""
    bench = doc["benchmark"]
    out = []
    paired = [r for r in ok if r.get("speedup_method") == "paired"]
    cross = [r for r in ok if r.get("speedup_method") == "cross-stage"]
    if paired:
        run = next(iter(paired[0]["paired_run"].values()), {})
        conf, width = run.get("confidence") or bench.get("confidence"), run.get("ci_width") or bench.get("ci_width")
        box = f" or `max_seconds` ({bench['max_seconds']:g} s per batch size) ran out" if bench.get("max_seconds") else \
            " or the time box ran out"
        out.append("Speedups are measured in each row's own benchmark stage together with the baseline's model, "
                   "interleaved: rounds of short blocks of calls of every scope and both models (scopes rotated, "
                   "the two models in ABBA order, so a drift or a neighbour hits both alike), until the interval "
                   f"was within ±{width * 100:g}% at every scope{box}. Speedup = median of the baseline's calls "
                   f"/ median of this row's; the {conf * 100:g}% interval is a bootstrap over rounds, "
                   "seeded from the stage's parameters. The baseline row's own latencies come from its own stage.")
    if cross:
        names = ", ".join(f"`{r['name']}`" for r in cross)
        out.append(f"{names}: cross-stage speedups (marked †): these benchmark metrics predate the paired "
                   "measurement, so the speedup is the baseline's p50 over this row's, each measured in its own "
                   "stage minutes apart, with no interval; a neighbour or a clock change in between goes "
                   "straight into the ratio. Rebuilding the benchmark stages gives same-run intervals.")
    wide = [f"`{r['name']}` ({reason[len('inconclusive ('):-1]})"
            for r in ok for reason in r.get("reasons") or [] if reason.startswith("inconclusive (")]
    if wide:
        out.append("Inconclusive: " + ", ".join(wide) + ": the speedup's interval stayed wider than the "
                   "benchmark's `ci_width` (or too few rounds fitted) within `max_seconds`. A busy machine "
                   "widens it; rerun on a quiet one or give the benchmark more time before trusting these rows.")
    return out


def scope_order_notes(doc: dict, ok: list[dict]) -> list[str]:
    """Model <= pre-tokenized <= end to end, checked per row and batch size on the interval of each ratio
    of consecutive scopes (paired.scope_order): how many checks hold within it, which are broken."""
    checks = [(r, b, o) for r in ok for b, pairs in (r.get("scope_order") or {}).items() for o in pairs]
    judged = [(r, b, o) for r, b, o in checks if o["holds"] is not None]
    if not judged:
        return []
    names = {"model": "model", "pretokenized": "pre-tokenized", "e2e": "end to end"}
    broken = [f"`{r['name']}` at batch {b}: {names[o['outer']]} {o['ratio']:.2f}× the {names[o['inner']]} "
              f"median ({o['ci_low']:.2f}–{o['ci_high']:.2f})" for r, b, o in judged if not o["holds"]]
    text = (f"Scope order (model ≤ pre-tokenized ≤ end to end, each scope containing the one before): "
            f"{len(judged) - len(broken)} of {len(judged)} checks hold within the interval of the ratio of the "
            "two medians (a bootstrap over the same rounds); a point estimate out of order inside its interval "
            "is noise of few calls")
    if broken:
        text += "; broken beyond it: " + "; ".join(broken)
    unjudged = len(checks) - len(judged)
    if unjudged:
        text += f"; {unjudged} not judged (too few rounds for an interval)"
    return [text + "."]


def failure_notes(doc: dict) -> list[str]:
    out = []
    for r in doc["configs"]:
        if r["status"] == "failed":
            out.append(f"Failed: `{r['name']}`: {r['reason']}.")
        elif r["status"] in ("skipped", "missing"):
            out.append(f"Not built: `{r['name']}` ({r['reason']}).")
    return out


def build_notes(doc: dict, prunes: dict) -> list[str]:
    ok = [r for r in doc["configs"] if r["status"] == "ok"]
    notes = []
    notes += input_notes(doc, ok)
    notes += speedup_notes(doc, ok)
    notes += scope_order_notes(doc, ok)
    notes += glue_notes(doc, ok)
    notes += bf16_cpu_notes(doc, ok)
    notes += sparsity_notes(doc, ok, prunes)
    notes += stability_notes(doc, ok)
    notes += peak_notes(doc, ok)
    notes += failure_notes(doc)
    return notes
