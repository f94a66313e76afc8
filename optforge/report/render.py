"""Results document -> report.md, report.html, results.json. Jinja only (no torch).

report.md and results.json are byte-identical for the same inputs (stable order, fixed float
formatting, no timestamps); the build date appears only in report.html.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
from pathlib import Path
from typing import Optional

from optforge.methods.quantize import QUANT_METHODS
from optforge.report import fmt
from optforge.report.compare import compare as compare_docs
from optforge.report.compare import load_previous
from optforge.report.lm import assemble_lm
from optforge.report.lm import view as lm_view
from optforge.report.notes import build_notes
from optforge.report.results import assemble
from optforge.report.serving import serving_view
from optforge.report.svg import accuracy_latency_svg
from optforge.report.templates import search_path

HEADLINE_VERSIONS = ("torch", "transformers", "torchao")


# --------------------------------------------------------------------------- escaping


def md_escape(text) -> str:
    """Text for a Markdown table cell or paragraph: one line, no cell breaks (`|` -> `\\|`) and no raw
    HTML: `<` becomes `&lt;` (also inside `code spans`; names are validated, so this only bites on
    hostile input) and `&` before something entity-like becomes `&amp;`. `>` stays readable
    ("cv 12% > 10%"): without a `<` it cannot open a tag."""
    s = " ".join(str("" if text is None else text).splitlines())
    s = re.sub(r"&(?=#?[A-Za-z0-9]+;)", "&amp;", s).replace("<", "&lt;")
    return s.replace("|", "\\|")


def html_codespans(text):
    """Escape, then turn `name` into <code>name</code> (the escaping happens first, so it is safe)."""
    from markupsafe import Markup, escape

    escaped = str(escape("" if text is None else text))
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped))


# --------------------------------------------------------------------------- view model


def _pipelined(p: Optional[dict]) -> str:
    """'samples/s (gain x)' of the pipelined stream, or n/a."""
    if not p:
        return fmt.NA
    return f"{fmt.rate(p['throughput'])} ({fmt.times(p['gain'])})"


def _verdict_class(row: dict) -> str:
    if row["is_baseline"] and row["status"] == "ok":
        return "baseline"
    if row["verdict"] == "ready":
        return "ready"
    if row["status"] in ("failed", "skipped", "missing"):
        return "failed"
    return "notready"


def _what(row: dict) -> str:
    parts = [row["model_description"], row["precision"]]
    if row.get("runtime") == "onnxruntime":  # results.json written before `runtime` has none: torch
        method = QUANT_METHODS.get(row["quantization"] or "")
        parts.append("ONNX Runtime" + (f" {method.onnxruntime}" if method is not None else ""))
    elif row["quantization"]:
        parts.append(row["quantization"])
    if row["compiled"]:
        parts.append(f"compiled ({row['compile_mode']})")
    return ", ".join(parts)


def _pair(block: Optional[dict]) -> str:
    return f"{fmt.ms(block['p50'])} / {fmt.ms(block['p99'])}" if block else fmt.NA


CROSS_STAGE = "†"  # marks a speedup that is a ratio of p50s from two separate stages (no interval)


def _speed(r: dict, b: str, key: str) -> Optional[str]:
    """One speedup cell: `5.98× (5.71–6.20)` (paired), `2.00x†` (cross-stage), None when unknown."""
    sp = r[key].get(b)
    if sp is None:
        return None
    if r.get("speedup_method") == "paired":
        ci = (r.get(f"{key}_ci") or {}).get(b) or {}
        return fmt.speedup(sp, ci.get("low"), ci.get("high"))
    return fmt.times(sp) + (CROSS_STAGE if r.get("speedup_method") == "cross-stage" else "")


def _run(r: dict, b: str) -> str:
    """`12 rounds, width, 3.1 s` of a paired measurement (n/a without one)."""
    run = (r.get("paired_run") or {}).get(b)
    if not run:
        return fmt.NA
    slow = ", too slow" if run.get("too_slow") else ""
    return f"{run['rounds']} rounds, {run['stopped']}{slow}, {_s(run.get('elapsed_s'))} s"


def _best_speed(best: dict) -> str:
    scope = "end-to-end" if best["speedup_scope"] == "e2e" else "model-only"
    if best.get("speedup_method") == "paired":
        parts = [f"{_speed(best, b, 'speedup')} at batch {b}" for b in sorted(best["speedup"], key=int)]
        return f"{scope} speedup {', '.join(parts)}"
    return f"{scope} speedup ≥ {fmt.times(best['speedup_min'])} at every batch size"


def build_view(doc: dict, notes: list[str], changes: Optional[dict]) -> dict:
    batches = doc["benchmark"]["batch_sizes"]
    big = batches[-1]
    rows = []
    for r in doc["configs"]:
        per_batch = []
        for b in batches:
            sp, ms_ = _speed(r, b, "speedup"), _speed(r, b, "model_speedup")
            speed = fmt.NA if sp is None and ms_ is None else f"{sp or fmt.NA} / {ms_ or fmt.NA}"
            base_row = r["is_baseline"] and r["status"] == "ok"
            per_batch.append({"batch": b, "e2e": _pair(r["e2e_latency_ms"].get(b)),
                              "model": _pair(r["latency_ms"].get(b)),
                              "speedup": "baseline" if base_row else speed,
                              "sp_e2e": "baseline" if base_row else (sp or fmt.NA),
                              "sp_model": None if base_row else ms_})
        thr = r["throughput"].get(big) or {}
        peak = r["pct_peak"].get(big) or {}
        rows.append({
            "name": r["name"], "is_baseline": r["is_baseline"], "is_best": r["name"] == doc["best"],
            "what": _what(r), "size": fmt.size(r["size_mb"]), "params": fmt.params(r["params"], r["nonzero_params"]),
            "params_total": fmt.count(r["params"]),
            "nonzero": (fmt.count(r["nonzero_params"]) if r["params"] and r["nonzero_params"] is not None
                        and r["nonzero_params"] < 0.99 * r["params"] else None),
            "accuracy": fmt.acc(r["accuracy"]),
            "delta": "baseline" if r["is_baseline"] else fmt.points(r["accuracy_delta"]),
            "per_batch": per_batch,
            "throughput": fmt.rate(thr.get("e2e") if thr.get("e2e") is not None else thr.get("model")),
            "pct_peak": fmt.pct(peak.get("model")),
            "verdict": r["verdict"], "verdict_class": _verdict_class(r), "status": r["status"],
        })
    detail = []
    for r in doc["configs"]:
        for b in batches:
            m, e = r["latency_ms"].get(b), r["e2e_latency_ms"].get(b)
            if not m and not e:
                continue
            thr, peak = r["throughput"].get(b, {}), r["pct_peak"].get(b, {})
            base = (r.get("baseline_p50_ms") or {}).get(b) or {}
            detail.append({
                "name": r["name"], "batch": b, "seq": r["seq_len"].get(b) or fmt.NA,
                "e2e": [fmt.ms(e and e["p50"]), fmt.ms(e and e["p90"]), fmt.ms(e and e["p99"])],
                "model": [fmt.ms(m and m["p50"]), fmt.ms(m and m["p90"]), fmt.ms(m and m["p99"])],
                "spread": _scopes_pct(r.get("spread", {}).get(b)),
                "cv": _scopes_pct(r["cv"].get(b)),
                "throughput": f"{fmt.rate(thr.get('e2e'))} / {fmt.rate(thr.get('model'))}",
                "pct_peak": fmt.pct(peak.get("model")),
                "pretok": fmt.ms((r["pretokenized_ms"].get(b) or {}).get("p50")),
                "pipelined": _pipelined(r["pipelined"].get(b)),
                "baseline": f"{fmt.ms(base.get('e2e'))} / {fmt.ms(base.get('model'))}" if base else fmt.NA,
                "run": _run(r, b),
            })
    resources = [{"name": r["name"], "size": fmt.size(r["size_mb"]), "params": fmt.params(r["params"], r["nonzero_params"]),
                  "mem": fmt.size(r["peak_mem_mb"]), "load": _s(r["load_s"]), "warmup": _s(r["warmup_s"]),
                  "flops": fmt.count(int(r["flops_per_sample"])) if r["flops_per_sample"] else fmt.NA,
                  "f1": fmt.acc(r["macro_f1"]), "n": r["eval_n"] if r["eval_n"] is not None else fmt.NA}
                 for r in doc["configs"] if r["status"] == "ok" or r["params"] is not None]
    best = next((r for r in doc["configs"] if r["name"] == doc["best"]), None)
    versions = doc["versions"]
    head = [f"{k} {versions[k]}" for k in HEADLINE_VERSIONS if k in versions]
    rest = [f"{k} {v}" for k, v in versions.items() if k not in HEADLINE_VERSIONS]
    methods = {r.get("speedup_method") for r in doc["configs"]}
    return {
        "doc": doc,
        "batches": batches,
        "big_batch": big,
        "rows": rows,
        "detail": detail,
        "resources": resources,
        "notes": notes,
        "best": best and {"name": best["name"], "speed": _best_speed(best),
                          "accuracy": fmt.acc(best["accuracy"]), "delta": fmt.points(best["accuracy_delta"]),
                          "what": _what(best)},
        "speedup_hint": _speedup_hint(doc, "paired" in methods, "cross-stage" in methods),
        "versions_line": ", ".join(head + rest) or fmt.NA,
        "gates_line": _gates_line(doc["gates"], doc["benchmark"]),
        "changes": _changes_view(changes) if changes else None,
        "serving": serving_view(doc.get("serving")),
    }


def _speedup_hint(doc: dict, paired: bool, cross: bool) -> str:
    """What the speedup column means, for the methods the rows used."""
    conf = doc["benchmark"].get("confidence")
    parts = []
    if paired or not cross:
        parts.append("speedup = the baseline's median / this row's, both measured interleaved in this row's "
                     "benchmark stage, with its " + (f"{conf * 100:g}% " if conf else "")
                     + "confidence interval (end-to-end / model-only)")
    if cross:
        parts.append(f"{CROSS_STAGE} cross-stage: baseline p50 / this p50, each from its own stage (metrics from "
                     "before the paired benchmark; no interval)")
    return "; ".join(parts)


def _gates_line(gates: dict, bench: Optional[dict] = None) -> str:
    bench = bench or {}
    line = f"accuracy drop ≤ {gates['max_accuracy_drop']:g} pts, "
    if bench.get("ci_width") is not None:
        line += (f"speedup ≥ {gates['min_speedup']:g}x at every batch size on the low end of its "
                 f"{bench['confidence'] * 100:g}% interval, which must be within ±{bench['ci_width'] * 100:g}% "
                 f"(end to end where both rows have it, else model)")
    else:
        line += f"end-to-end p50 speedup ≥ {gates['min_speedup']:g}x at every batch size"
    if gates.get("max_spread") is not None:
        line += f", IQR ≤ {gates['max_spread'] * 100:g}% of the median"
    if gates.get("max_cv") is not None:
        line += f", cv ≤ {gates['max_cv'] * 100:g}%"
    return line


def _pct(frac: Optional[float]) -> Optional[float]:
    return None if frac is None else frac * 100


def _scopes_pct(block: Optional[dict]) -> str:
    """`e2e / model` of a {"model", "e2e"} block of fractions, in percent (n/a where missing)."""
    block = block or {}
    return f"{fmt.pct(_pct(block.get('e2e')))} / {fmt.pct(_pct(block.get('model')))}"


def _s(x: Optional[float]) -> str:
    return fmt.NA if x is None else f"{x:.2f}"


def _changes_view(ch: dict) -> dict:
    rows = []
    for r in ch["rows"]:
        lat = ", ".join(f"{x['ratio']:.2f}x @{b}" + ("" if x["scope"] == "e2e" else " (model)")
                        for b, x in r["latency_ratio"].items()) or fmt.NA
        verdict = (r["new_verdict"] or fmt.NA) if r["old_verdict"] == r["new_verdict"] else \
            f"{r['old_verdict'] or fmt.NA} → {r['new_verdict'] or fmt.NA}"
        rows.append({"name": r["name"], "acc": fmt.points(r["accuracy_delta"]), "latency": lat, "verdict": verdict,
                     "regressions": "; ".join(r["regressions"]) or "none", "regressed": bool(r["regressions"])})
    return {"source": ch["source"], "how": ch["how"], "rows": rows, "added": ch["added"], "removed": ch["removed"],
            "regressed": ch["regressed"]}


# --------------------------------------------------------------------------- rendering


def _environments():
    import jinja2

    loader = jinja2.FileSystemLoader([str(d) for d in search_path()])
    md = jinja2.Environment(loader=loader, autoescape=False, keep_trailing_newline=True,
                            trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    md.filters["md"] = md_escape
    html = jinja2.Environment(loader=loader, autoescape=True, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    html.filters["code"] = html_codespans
    return md, html


def render_reports(recipe, recipe_path, graph, results: dict, env: dict, out_dir, compare=None, *,
                   now: Optional[_dt.datetime] = None) -> list[Path]:
    """Write out_dir/report.md, report.html and results.json; return their paths.

    `results`: stage name -> {"status": "ok"|"failed"|"skipped"|"missing", "metrics", "reason", "key"};
    `env`: {"recipe_hash", "device": {"kind", "name", ...}, "versions", "data_fingerprint"};
    `graph`: the recipe's stage graph (used to find the stage that made a row fail; None rebuilds it);
    `compare`: a previous report.md (its sibling results.json is preferred) or results.json.
    """
    if graph is None:
        from optforge.graph import build_graph

        graph = build_graph(recipe)
    if recipe.is_lm:
        if compare is not None:
            from optforge.errors import OptforgeError

            raise OptforgeError("--compare reads classifier reports only; a causal-lm report cannot be compared yet")
        return write_lm_reports(assemble_lm(recipe, graph, results, env, recipe_path), out_dir, now=now)
    doc = assemble(recipe, graph, results, env, recipe_path)
    prunes = {p.name: {"method": p.method, "model": p.model, "amount": p.amount} for p in recipe.prune}
    return write_reports(doc, prunes, out_dir, compare, now=now)


def write_reports(doc: dict, prunes: dict, out_dir, compare=None, *,
                  now: Optional[_dt.datetime] = None) -> list[Path]:
    """Write out_dir/report.md, report.html and results.json of a results document -- the one
    `render_reports` assembles, or a results.json read back (the same document gives the same
    files); `prunes`: prune name -> {"method", "model", "amount"} of the recipe, for the notes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = build_notes(doc, prunes)
    changes = None
    if compare is not None:
        previous, how = load_previous(Path(compare))
        changes = compare_docs(doc, previous) | {"source": str(compare), "how": how}
    view = build_view(doc, notes, changes)
    md_env, html_env = _environments()
    first = view["batches"][0] if view["batches"] else None
    chart = accuracy_latency_svg(doc["configs"], first) if first else None
    date = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")

    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html", "json": out_dir / "results.json"}
    _write(paths["md"], md_env.get_template("report.md.j2").render(**view))
    _write(paths["html"], html_env.get_template("report.html.j2").render(**view, chart=chart, chart_batch=first,
                                                                         build_date=date))
    _write(paths["json"], results_json(doc))
    return [paths["md"], paths["html"], paths["json"]]


def write_lm_reports(doc: dict, out_dir, *, now: Optional[_dt.datetime] = None) -> list[Path]:
    """report.md, report.html and results.json of a causal-lm results document (report.lm)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_env, html_env = _environments()
    v = lm_view(doc)
    date = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    paths = {"md": out_dir / "report.md", "html": out_dir / "report.html", "json": out_dir / "results.json"}
    _write(paths["md"], md_env.get_template("lm_report.md.j2").render(**v))
    _write(paths["html"], html_env.get_template("lm_report.html.j2").render(**v, build_date=date))
    _write(paths["json"], results_json(doc))
    return [paths["md"], paths["html"], paths["json"]]


def results_json(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _write(path: Path, text: str) -> None:
    """Atomic replace through a temporary name of this process's own: two builds that end together (a
    `--wait` build right behind the one it waited for) each render the report without taking the other's
    temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
