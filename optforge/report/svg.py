"""Accuracy-vs-latency scatter as an inline SVG string, Pareto front highlighted. No torch, no I/O.

Every piece of text that comes from a recipe or a result goes through markupsafe.escape, so the SVG
can be inlined into the HTML as Markup.
"""

from __future__ import annotations

import math
from typing import Optional

from markupsafe import Markup, escape

from optforge.report import fmt

W, H = 760, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 170, 20, 52
CHAR_W, LINE_H = 6.6, 13  # label size estimate at 11px for collision avoidance

COLORS = {"ready": "#1a7f37", "baseline": "#0969da", "other": "#bf8700", "front": "#8250df"}


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the points no other point beats (latency lower-or-equal and accuracy higher-or-equal,
    one strictly). Points: (name, latency, accuracy)."""
    front = []
    for name, x, y in points:
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for n2, x2, y2 in points if n2 != name)
        if not dominated:
            front.append(name)
    return front


def _nice_step(span: float, target: int = 5) -> float:
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _linear_ticks(lo: float, hi: float) -> list[float]:
    step = _nice_step(hi - lo)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    ticks = []
    for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if lo <= v <= hi:
                ticks.append(v)
    return ticks


def _tick_label(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def accuracy_latency_svg(rows: list[dict], batch: str) -> Optional[Markup]:
    """Chart of built rows at one batch size: x = end-to-end p50 (model p50 when end-to-end was not
    measured), y = accuracy. None when fewer than one point can be drawn."""
    pts, scope = [], "end-to-end"
    use_e2e = all(r["e2e_latency_ms"].get(batch) for r in rows if r["status"] == "ok" and r["latency_ms"].get(batch))
    if not use_e2e:
        scope = "model"
    for r in rows:
        block = (r["e2e_latency_ms"] if use_e2e else r["latency_ms"]).get(batch)
        if r["status"] == "ok" and block and block.get("p50") and r["accuracy"] is not None:
            pts.append((r["name"], float(block["p50"]), r["accuracy"] * 100, r))
    if not pts:
        return None
    front = set(pareto_front([(n, x, y) for n, x, y, _ in pts]))

    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    log = max(xs) / min(xs) > 10
    if log:
        x_lo, x_hi = min(xs) / 1.3, max(xs) * 1.3
        fx = lambda v: (math.log10(v) - math.log10(x_lo)) / (math.log10(x_hi) - math.log10(x_lo))  # noqa: E731
        xticks = _log_ticks(x_lo, x_hi)
    else:
        span = max(xs) - min(xs) or max(xs) * 0.2 or 1.0
        x_lo, x_hi = max(min(xs) - 0.15 * span, 0.0), max(xs) + 0.15 * span
        fx = lambda v: (v - x_lo) / (x_hi - x_lo)  # noqa: E731
        xticks = _linear_ticks(x_lo, x_hi)
    yspan = max(ys) - min(ys) or 2.0
    y_lo, y_hi = min(ys) - 0.15 * yspan, min(max(ys) + 0.15 * yspan, 100.0 + 0.02 * yspan)
    fy = lambda v: (v - y_lo) / (y_hi - y_lo)  # noqa: E731
    yticks = _linear_ticks(y_lo, y_hi)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    px = lambda v: LEFT + fx(v) * pw  # noqa: E731
    py = lambda v: TOP + (1 - fy(v)) * ph  # noqa: E731

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
           f'role="img" aria-label="accuracy versus latency at batch {escape(batch)}" class="chart">',
           f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#d0d7de"/>']
    for t in xticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + ph}" stroke="#eaeef2"/>'
                   f'<text x="{x:.1f}" y="{TOP + ph + 16}" text-anchor="middle" class="tick">{_tick_label(t)}</text>')
    for t in yticks:
        y = py(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{LEFT + pw}" y2="{y:.1f}" stroke="#eaeef2"/>'
                   f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{t:g}</text>')
    xlabel = f"{scope} p50 latency at batch {escape(batch)} (ms{', log scale' if log else ''})"
    out.append(f'<text x="{LEFT + pw / 2:.1f}" y="{H - 12}" text-anchor="middle" class="axis">{xlabel}</text>')
    out.append(f'<text transform="translate(16 {TOP + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
               f'class="axis">accuracy (%)</text>')

    fpts = sorted(((x, y) for n, x, y, _ in pts if n in front))
    if len(fpts) > 1:
        d = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(fpts))
        out.append(f'<path d="{d}" fill="none" stroke="{COLORS["front"]}" stroke-width="2" '
                   f'stroke-dasharray="6 4" opacity="0.8"/>')

    lx, ly = LEFT + pw + 14, TOP + 8
    # labels avoid every marker and the legend, not only each other
    placed: list[tuple[float, float, float, float]] = [(lx - 4, ly - 10, W, ly + 4 * 18 + 30)]
    placed += [(px(x) - 9, py(y) - 9, px(x) + 9, py(y) + 9) for _, x, y, _ in pts]
    for name, x, y, r in sorted(pts, key=lambda p: (p[1], -p[2], p[0])):
        cx, cy = px(x), py(y)
        kind = "baseline" if r["is_baseline"] else "ready" if r["verdict"] == "ready" else "other"
        color = COLORS[kind]
        on_front = name in front
        tip = escape(f"{name}: {fmt.ms(x)} ms, {y:.2f}% ({r['verdict']})")
        out.append(f'<g><title>{tip}</title>')
        if on_front:
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="{COLORS["front"]}" '
                       f'stroke-width="2"/>')
        out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{color}" stroke="#fff" stroke-width="1"/>')
        label = name if len(name) <= 28 else name[:27] + "…"
        lw = CHAR_W * len(label)
        box = None
        for dx, dy, anchor in ((12, 4, "start"), (-12, 4, "end"), (12, -10, "start"), (12, 17, "start"),
                               (-12, -10, "end"), (-12, 17, "end"), (8, -16, "start"), (8, 24, "start"),
                               (-8, -16, "end"), (-8, 24, "end"), (12, -28, "start"), (12, 36, "start")):
            x0 = cx + dx if anchor == "start" else cx + dx - lw
            cand = (x0, cy + dy - LINE_H + 3, x0 + lw, cy + dy + 3)
            if not any(_overlap(cand, p) for p in placed) and x0 >= 0 and x0 + lw <= W:
                box = (dx, dy, anchor, cand)
                break
        if box is None:
            box = (12, 4, "start", (cx + 12, cy - 6, cx + 12 + lw, cy + 7))
        placed.append(box[3])
        weight = ' font-weight="600"' if on_front else ""
        out.append(f'<text x="{cx + box[0]:.1f}" y="{cy + box[1]:.1f}" text-anchor="{box[2]}" '
                   f'class="label"{weight}>{escape(label)}</text></g>')

    legend = [(COLORS["baseline"], "baseline"), (COLORS["ready"], "ready"), (COLORS["other"], "not ready")]
    for i, (c, text) in enumerate(legend):
        out.append(f'<circle cx="{lx + 5}" cy="{ly + i * 18}" r="5" fill="{c}"/>'
                   f'<text x="{lx + 16}" y="{ly + i * 18 + 4}" class="tick">{text}</text>')
    yf = ly + len(legend) * 18
    out.append(f'<circle cx="{lx + 5}" cy="{yf}" r="8" fill="none" stroke="{COLORS["front"]}" stroke-width="2"/>'
               f'<text x="{lx + 16}" y="{yf + 4}" class="tick">Pareto front</text>')
    out.append(f'<text x="{lx}" y="{yf + 26}" class="tick">up-left is better</text>')
    out.append("</svg>")
    return Markup("".join(out))


def _overlap(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])
