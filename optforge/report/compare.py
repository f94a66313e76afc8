"""Compare this build's results with a previous report.

`load_previous(path)`: given `old/results.json`, read it; given `old/report.md`, read the
`results.json` beside it when there is one (exact numbers), else parse the Markdown
production-readiness table (accuracy and end-to-end p50 as printed, so ratios are less precise).

`compare(new, old)` is pure: per configuration present in both, accuracy delta (points) and latency
ratio new/old of the end-to-end p50 at each batch size (model p50 where a side has no end-to-end
numbers); regressions: accuracy down more than 0.2 points, latency up more than 10%.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from optforge.errors import OptforgeError

ACCURACY_REGRESSION_PTS = 0.2
LATENCY_REGRESSION = 1.10


def load_previous(path: Path) -> tuple[dict, str]:
    """(previous results document, how it was read)."""
    path = Path(path)
    if path.suffix == ".json":
        return _read_json(path), "results.json"
    sibling = path.with_name("results.json")
    if sibling.is_file():
        return _read_json(sibling), f"{sibling.name} beside it"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OptforgeError(f"cannot read the report to compare against: {path} ({e.strerror}); "
                            f"pass a report.md or results.json written by optforge") from e
    return parse_markdown(text, path), "the Markdown table (no results.json beside it)"


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise OptforgeError(f"cannot read {path} ({e.strerror}); pass a report.md or results.json "
                            f"written by optforge") from e
    except ValueError as e:
        raise OptforgeError(f"{path} is not valid JSON ({e}); pass a results.json written by optforge") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("configs"), list):
        raise OptforgeError(f"{path} has no \"configs\" list; is it an optforge results.json?")
    return doc


_BATCH_COL = re.compile(r"^e2e p50 / p99 \(ms\) @(\d+)$")
_MODEL_COL = re.compile(r"^model p50 / p99 \(ms\) @(\d+)$")
_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())
    return [p.strip().replace("\\|", "|") for p in parts[1:-1]]


def parse_markdown(text: str, path: Path) -> dict:
    """The rows of the production-readiness table of a report.md (see report/templates/report.md.j2)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        cells = _cells(line) if line.startswith("|") else []
        if cells and cells[0] == "Config" and "Accuracy (%)" in cells:
            header = cells
            break
    else:
        raise OptforgeError(f"{path}: no production-readiness table found; pass a report.md or results.json "
                            f"written by optforge")
    acc_col = header.index("Accuracy (%)")
    e2e_cols = {m.group(1): j for j, h in enumerate(header) if (m := _BATCH_COL.match(h))}
    model_cols = {m.group(1): j for j, h in enumerate(header) if (m := _MODEL_COL.match(h))}
    configs = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        if len(cells) != len(header):
            continue
        name = cells[0].replace("**", "").strip("`").replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
        acc = _num(cells[acc_col])
        configs.append({
            "name": name,
            "accuracy": acc / 100 if acc is not None else None,
            "e2e_latency_ms": {b: {"p50": v} for b, j in e2e_cols.items() if (v := _num(cells[j])) is not None},
            "latency_ms": {b: {"p50": v} for b, j in model_cols.items() if (v := _num(cells[j])) is not None},
            "verdict": cells[-1],
        })
    return {"configs": configs}


def _num(cell: str) -> Optional[float]:
    m = _NUM.search(cell)
    return float(m.group(0)) if m and "n/a" not in cell else None


def _p50(row: dict, b: str) -> tuple[Optional[float], str]:
    e = (row.get("e2e_latency_ms") or {}).get(b)
    if e and e.get("p50"):
        return e["p50"], "e2e"
    m = (row.get("latency_ms") or {}).get(b)
    return (m["p50"], "model") if m and m.get("p50") else (None, "")


def compare(new: dict, old: dict) -> dict:
    old_rows = {r["name"]: r for r in old.get("configs", [])}
    new_rows = {r["name"]: r for r in new.get("configs", [])}
    rows = []
    for r in new.get("configs", []):
        o = old_rows.get(r["name"])
        if o is None:
            continue
        acc_delta = None
        if r.get("accuracy") is not None and o.get("accuracy") is not None:
            acc_delta = round((r["accuracy"] - o["accuracy"]) * 100, 4)
        ratios = {}
        for b in sorted(set(r.get("latency_ms") or {}) | set(r.get("e2e_latency_ms") or {}), key=int):
            (n, ns), (p, ps) = _p50(r, b), _p50(o, b)
            if n and p:
                scope = ns if ns == ps else "model"
                if scope != ns:
                    n = (r.get("latency_ms") or {}).get(b, {}).get("p50")
                    p = (o.get("latency_ms") or {}).get(b, {}).get("p50")
                if n and p:
                    ratios[b] = {"ratio": round(n / p, 4), "scope": scope}
        regressions = []
        if acc_delta is not None and acc_delta < -ACCURACY_REGRESSION_PTS:
            regressions.append(f"accuracy {acc_delta:+.2f} pts")
        for b, x in ratios.items():
            if x["ratio"] > LATENCY_REGRESSION:
                regressions.append(f"latency {x['ratio']:.2f}x at batch {b}")
        rows.append({"name": r["name"], "accuracy_delta": acc_delta, "latency_ratio": ratios,
                     "old_verdict": o.get("verdict"), "new_verdict": r.get("verdict"),
                     "regressions": regressions})
    return {
        "rows": rows,
        "added": [n for n in new_rows if n not in old_rows],
        "removed": [n for n in old_rows if n not in new_rows],
        "regressed": [r["name"] for r in rows if r["regressions"]],
    }
