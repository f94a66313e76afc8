"""Do two builds of one recipe agree? For every row, batch size and scope both results.json have, whether
run B's paired speedup lies inside run A's confidence interval (and the other way round), how far apart
the two are against A's half-width, and whether both picked the same best ready row.

    python benchmarks/compare_speedups.py A/results.json B/results.json

Used for the reproducibility check of two cold builds in two fresh clones (README "Where the time goes").
No torch; reads only the two files.
"""

from __future__ import annotations

import json
import sys

SCOPES = ("e2e", "model", "pretokenized")


def rows(path: str) -> tuple[dict, dict]:
    doc = json.load(open(path))
    return {c["name"]: c for c in doc["configs"]}, doc


def compare(a: dict, b: dict) -> list[dict]:
    out = []
    for name, ra in a.items():
        rb = b.get(name)
        if rb is None or not ra.get("paired") or not rb.get("paired"):
            continue
        for batch, scopes in ra["paired"].items():
            for scope in SCOPES:
                pa, pb = scopes.get(scope), rb["paired"].get(batch, {}).get(scope)
                if not pa or not pb or pa.get("speedup") is None or pb.get("speedup") is None:
                    continue
                entry = {"row": name, "batch": batch, "scope": scope, "a": pa, "b": pb,
                         "gap": abs(pb["speedup"] - pa["speedup"]) / pa["speedup"]}
                if pa.get("speedup_ci_low") is not None and pb.get("speedup_ci_low") is not None:
                    entry["b_in_a"] = pa["speedup_ci_low"] <= pb["speedup"] <= pa["speedup_ci_high"]
                    entry["a_in_b"] = pb["speedup_ci_low"] <= pa["speedup"] <= pb["speedup_ci_high"]
                    entry["half_width_a"] = (pa["speedup_ci_high"] - pa["speedup_ci_low"]) / 2 / pa["speedup"]
                out.append(entry)
    return out


def _ci(p: dict) -> str:
    if p.get("speedup_ci_low") is None:
        return f"{p['speedup']:.2f} (no interval)"
    return f"{p['speedup']:.2f} ({p['speedup_ci_low']:.2f}-{p['speedup_ci_high']:.2f})"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    (a, doc_a), (b, doc_b) = rows(argv[0]), rows(argv[1])
    entries = compare(a, b)
    print("| row | batch | scope | A | B | gap | A's half-width | B in A | A in B |")
    print("|---|--:|---|--:|--:|--:|--:|---|---|")
    for e in entries:
        hw = f"{e['half_width_a']:.1%}" if "half_width_a" in e else "n/a"
        yes = {True: "yes", False: "**no**", None: "n/a"}
        print(f"| {e['row']} | {e['batch']} | {e['scope']} | {_ci(e['a'])} | {_ci(e['b'])} | {e['gap']:.1%} | {hw} | "
              f"{yes[e.get('b_in_a')]} | {yes[e.get('a_in_b')]} |")
    judged = [e for e in entries if "b_in_a" in e]
    print(f"\n{sum(e['b_in_a'] for e in judged)} of {len(judged)} of B's speedups lie inside A's interval, "
          f"{sum(e['a_in_b'] for e in judged)} of A's inside B's ({len(entries) - len(judged)} without an interval)")
    best_a, best_b = (doc_a.get("best") or {}), (doc_b.get("best") or {})
    print(f"best ready row: A {best_a.get('name') if isinstance(best_a, dict) else best_a}, "
          f"B {best_b.get('name') if isinstance(best_b, dict) else best_b}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
