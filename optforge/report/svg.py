"""Accuracy-vs-latency scatter as an inline SVG string, Pareto front highlighted. No torch, no I/O.

Every piece of text that comes from a recipe or a result goes through markupsafe.escape, so the SVG
can be inlined into the HTML as Markup.
"""

from __future__ import annotations

from typing import Optional

from markupsafe import Markup, escape

from optforge.report import fmt
from optforge.report.chart import LEFT, TOP, W, Axes

H = 420
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
    else:
        span = max(xs) - min(xs) or max(xs) * 0.2 or 1.0
        x_lo, x_hi = max(min(xs) - 0.15 * span, 0.0), max(xs) + 0.15 * span
    yspan = max(ys) - min(ys) or 2.0
    y_lo, y_hi = min(ys) - 0.15 * yspan, min(max(ys) + 0.15 * yspan, 100.0 + 0.02 * yspan)
    axes = Axes(H, (x_lo, x_hi, log), (y_lo, y_hi, False))
    pw, px, py = axes.pw, axes.px, axes.py

    xlabel = f"{scope} p50 latency at batch {escape(batch)} (ms{', log scale' if log else ''})"
    out = axes.frame(f"accuracy versus latency at batch {escape(batch)}", xlabel, "accuracy (%)",
                     y_tick=lambda t: f"{t:g}")

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
