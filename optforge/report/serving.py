"""The report's "Serving" section: serve_benchmark metrics -> results.json's `serving` object, table
rows for the templates, and an inline-SVG latency-vs-load chart. Pure: no torch, no I/O.

Every piece of text that reaches the SVG goes through markupsafe.escape; Markdown cells go through the
templates' `md` filter.
"""

from __future__ import annotations

from typing import Optional

from markupsafe import Markup, escape

from optforge.report import fmt
from optforge.report.chart import LEFT, TOP, Axes, tick_label

MODES = ("batching_off", "batching_on")
MODE_LABEL = {"batching_off": "batching off", "batching_on": "batching on"}
COLORS = {"batching_off": "#bf3989", "batching_on": "#0969da", "slo": "#cf222e"}
PHASES = ("queue", "tokenize", "forward", "postprocess", "serialize", "outside_server")


def serving_from_results(results: dict) -> Optional[dict]:
    """results.json's `serving`: the serve_benchmark stage's `serving` metrics plus "status": "ok";
    {"status": failed|skipped|missing, "reason"} when it did not run; None when the recipe has none."""
    st = results.get("serve_benchmark")
    if st is None:
        return None
    serving = (st.get("metrics") or {}).get("serving")
    if st.get("status") == "ok" and isinstance(serving, dict):
        return {**serving, "status": "ok"}
    status = st.get("status") if st.get("status") in ("failed", "skipped") else "missing"
    return {"status": status, "reason": " ".join(str(st.get("reason") or "not built").split())}


def _mode_order(run: dict) -> tuple:
    mode = run.get("mode") or ("batching_off" if run.get("max_batch") == 1 else "batching_on")
    return (MODES.index(mode) if mode in MODES else len(MODES), run.get("offered_rps") or 0.0)


def _rate(x: Optional[float]) -> str:
    return fmt.NA if x is None else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def serving_view(serving: Optional[dict]) -> Optional[dict]:
    """What _serving.md.j2 / _serving.html.j2 read as `serving` (None: no section)."""
    if not serving:
        return None
    if serving.get("status", "ok") != "ok":
        return {"status": serving["status"], "reason": serving.get("reason") or "not built", "rows": [],
                "summary": [], "notes": [], "chart": None}
    slo = serving["slo_p99_ms"]
    rows = []
    for r in sorted(serving.get("runs", []), key=_mode_order):
        mode = r.get("mode") or ("batching_off" if r["max_batch"] == 1 else "batching_on")
        bd = r.get("breakdown_ms") or {}
        failed = r.get("sent", 0) - r.get("ok", 0)
        rows.append({
            "mode": MODE_LABEL.get(mode, mode), "max_batch": r["max_batch"],
            "offered": _rate(r["offered_rps"]), "arrived": _rate(r.get("arrival_rps")),
            "achieved": _rate(r["achieved_rps"]),
            "p50": fmt.ms(r.get("p50_ms")), "p99": fmt.ms(r.get("p99_ms")),
            "meets": "yes" if r.get("meets_slo") else "no",
            "answered": f"{r.get('ok', 0)}/{r.get('sent', 0)}" + (f" ({failed} failed)" if failed else ""),
            "batch": f"{r['mean_batch_size']:.1f}" if r.get("mean_batch_size") is not None else fmt.NA,
            "phases": [fmt.ms(bd.get(p)) for p in PHASES],
        })
    max_rps = serving.get("max_rps_under_slo") or {}
    max_batch = {m: next((r["max_batch"] for r in serving.get("runs", []) if r.get("mode") == m), None)
                 for m in MODES}
    summary = [{"mode": MODE_LABEL[m], "max_batch": max_batch[m] if max_batch[m] is not None else fmt.NA,
                "max_rps": _rate(max_rps.get(m)) if max_rps.get(m) else "none (p99 over the SLO at every rate)"}
               for m in MODES if m in max_rps]
    choice = serving.get("choice") or {}
    server = serving.get("server") or {}
    return {
        "status": "ok",
        "config": serving["config"],
        "why": choice.get("why") or "",
        "slo": f"{slo:g}",
        "duration": f"{serving.get('duration_s', 0):g}",
        "max_requests": serving.get("max_requests"),
        "max_wait": f"{serving.get('max_wait_ms', 0):g}",
        "threads": server.get("torch_threads"),
        "model": server.get("model") or "",
        "summary": summary,
        "rows": rows,
        "phase_names": ["queue", "tokenize", "forward", "post", "serialize", "outside server"],
        "notes": list(serving.get("notes") or []),
        "chart": latency_load_svg(serving),
    }


# --------------------------------------------------------------------------- SVG

H = 380


def latency_load_svg(serving: dict) -> Optional[Markup]:
    """p99 (solid) and p50 (dashed) latency against offered load, one line per mode, the SLO as a red
    line; hollow markers where the SLO was missed. None when no run answered anything."""
    series = {m: sorted((r for r in serving.get("runs", []) if r.get("mode") == m and r.get("p99_ms")),
                        key=lambda r: r["offered_rps"]) for m in MODES}
    pts = [r for rs in series.values() for r in rs]
    if not pts:
        return None
    slo = float(serving["slo_p99_ms"])
    xs = [r["offered_rps"] for r in pts]
    ys = [r["p99_ms"] for r in pts] + [r["p50_ms"] for r in pts if r.get("p50_ms")] + [slo]
    x_log = max(xs) / min(xs) > 10
    y_log = max(ys) / max(min(ys), 1e-6) > 20
    if x_log:
        x_lo, x_hi = min(xs) / 1.3, max(xs) * 1.3
    else:
        span = max(xs) - min(xs) or max(xs) * 0.5
        x_lo, x_hi = max(min(xs) - 0.1 * span, 0.0), max(xs) + 0.1 * span
    if y_log:
        y_lo, y_hi = max(min(ys), 1e-3) / 1.5, max(ys) * 1.5
    else:
        y_lo, y_hi = 0.0, max(ys) * 1.15
    axes = Axes(H, (x_lo, x_hi, x_log), (y_lo, y_hi, y_log))
    pw, px, py = axes.pw, axes.px, axes.py

    out = axes.frame(f"latency versus offered load for {escape(serving.get('config', ''))}",
                     f"offered load (requests/s{', log scale' if x_log else ''})",
                     f"latency (ms{', log scale' if y_log else ''})")
    ys_ = py(slo)
    out.append(f'<line x1="{LEFT}" y1="{ys_:.1f}" x2="{LEFT + pw}" y2="{ys_:.1f}" stroke="{COLORS["slo"]}" '
               f'stroke-width="1.5"/><text x="{LEFT + pw - 4}" y="{ys_ - 5:.1f}" text-anchor="end" class="tick" '
               f'style="fill:{COLORS["slo"]}">SLO p99 {escape(tick_label(slo))} ms</text>')
    for mode, runs in series.items():
        if not runs:
            continue
        color = COLORS[mode]
        for key, dash in (("p99_ms", ""), ("p50_ms", ' stroke-dasharray="5 4"')):
            line = [(px(r["offered_rps"]), py(r[key])) for r in runs if r.get(key)]
            if len(line) > 1:
                d = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(line))
                out.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for r in runs:
            cx, cy = px(r["offered_rps"]), py(r["p99_ms"])
            fill = color if r.get("meets_slo") else "#fff"
            tip = escape(f"{MODE_LABEL[mode]} (max batch {r['max_batch']}): {r['offered_rps']:g} req/s offered, "
                         f"{r['achieved_rps']:g} achieved, p50 {fmt.ms(r.get('p50_ms'))} ms, "
                         f"p99 {fmt.ms(r['p99_ms'])} ms" + ("" if r.get("meets_slo") else ", SLO missed"))
            out.append(f'<g><title>{tip}</title><circle cx="{cx:.1f}" cy="{cy:.1f}" r="4.5" fill="{fill}" '
                       f'stroke="{color}" stroke-width="2"/></g>')
    lx, ly = LEFT + pw + 14, TOP + 8
    legend = [(COLORS[m], MODE_LABEL[m]) for m in MODES if series[m]]
    for i, (c, text) in enumerate(legend):
        out.append(f'<line x1="{lx}" y1="{ly + i * 18}" x2="{lx + 18}" y2="{ly + i * 18}" stroke="{c}" '
                   f'stroke-width="2"/><text x="{lx + 24}" y="{ly + i * 18 + 4}" class="tick">{text}</text>')
    y0 = ly + len(legend) * 18 + 6
    out.append(f'<text x="{lx}" y="{y0 + 4}" class="tick">solid: p99, dashed: p50</text>'
               f'<text x="{lx}" y="{y0 + 22}" class="tick">hollow: SLO missed</text>')
    out.append("</svg>")
    return Markup("".join(out))
