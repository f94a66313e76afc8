"""What `optforge export RECIPE --format F --out DIR` runs (the command itself is in optforge/cli.py).

  1. the row: `--config NAME|best` resolved as `optforge serve` resolves it (serve/launch.py,
     serve/choose.py: best is the report's best ready row); the row must be built, measurements included
     (the model card reports them); its artifact's cache entry and the data entry are verified (sha256)
  2. the format: `check` must accept the row, else "not exportable as F: why; available for this row: ..."
  3. `write` into a staging directory beside DIR (optforge.export.publish)
  4. the round trip on the whole eval split (optforge.export.roundtrip), within the tolerance the
     compile stage allows (methods.compile.allowed_difference); a failure publishes nothing
  5. README.md (the model card) and MANIFEST (optforge.export.card), then the rename into DIR
Pure until step 3: no torch is imported before the row and the destination are known to be usable.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from optforge import __version__
from optforge.export import ExportError, available, format_module, not_exportable, refusal
from optforge.export.card import CARD, MANIFEST, render_card, write_manifest
from optforge.export.publish import check_destination, publish, staging_dir

PROGRESS_EVERY = 10  # batches between progress lines when stderr is not a terminal


@dataclass
class Exported:
    config: str
    fmt: str
    out: Path
    round_trip: dict
    why: Optional[str]  # why this row, for --config best

    def summary(self) -> str:
        rt = self.round_trip
        return (f"exported {self.config!r} as {self.fmt} to {self.out}: round trip on {rt['examples']} eval "
                f"examples: argmax identical {rt['argmax_identical']}/{rt['examples']}, max |logit diff| "
                f"{rt['max_abs_diff']:.3g} (allowed {rt['allowed']:.3g})")


def export_row(recipe_path, config: str, fmt: str, out, force: bool = False, device: str = "auto",
               err: Callable[[str], None] = print, tty: bool = False) -> Exported:
    """Export `config` of the built recipe at `recipe_path` as `fmt` into `out` (see the module docstring).
    `err` receives progress lines (`tty`: one line rewritten in place)."""
    from optforge.cache import verify_entry
    from optforge.session import open_session, stage_results

    module = format_module(fmt)
    out = Path(out)
    check_destination(out, force)
    display = str(recipe_path)
    session = open_session(recipe_path, device, display=display)
    plans = session.plan()
    session.save_hashes()
    row_name, artifact, precision, why = _resolve(session, plans, config, display)
    results = stage_results(session, plans)
    row, doc = _row(session, results, row_name, display)
    key = artifact.name
    stage = verify_entry(artifact).get("stage") or "?"
    data_dir = session.cache.entry_dir(next(p.key for p in plans if p.name == "data"))
    verify_entry(data_dir)

    from optforge.modeling import read_meta

    meta = read_meta(artifact)
    row_meta = dict(meta, precision=precision, saved_precision=meta.get("precision"))
    if meta.get("format") != "float":  # quantized and compiled artifacts compute as they were made
        row_meta.update(precision=meta.get("precision"))
    reason = refusal(module, row_meta, artifact)
    if reason is not None:
        raise ExportError(not_exportable(fmt, reason, [f for f in available(row_meta, artifact) if f != fmt]))

    staged = staging_dir(out)
    try:
        kwargs = {"precision": row_meta["precision"]} if row_meta["precision"] != row_meta["saved_precision"] else {}
        written = module.write(artifact, staged, **kwargs)
        for ours in (CARD, MANIFEST):
            if (staged / ours).exists():
                raise ExportError(f"export format {fmt!r} wrote its own {ours}, which the exporter writes")
        written["loader"] = written["loader"].replace(staged.name, out.name)  # the name it will have
        rt = _round_trip(module, staged, artifact, session.device, row_meta, data_dir, err, tty)
        context = card_context(session, doc, row, fmt, (key, stage), meta, row_meta, written, rt, display)
        (staged / CARD).write_text(render_card(context), encoding="utf-8")
        write_manifest(staged)
        publish(staged, out, force)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already when published
    return Exported(row_name, fmt, out, rt, why)


def _resolve(session, plans, config: str, display: str):
    from optforge.serve.launch import resolve_artifact

    return resolve_artifact(session, plans, config, display, action="export")


def _row(session, results: dict, name: str, display: str) -> tuple[dict, dict]:
    """(the row of `name` in the report's results document, the document); ExportError when the row's
    measurements are not all built (the model card reports them)."""
    from optforge.report.results import assemble

    doc = assemble(session.recipe, session.graph, results, session.env(), session.recipe_path)
    row = next(r for r in doc["configs"] if r["name"] == name)
    if row["status"] == "missing":
        raise ExportError(f"config {name!r} is not built ({row['reason']}); run optforge build {display} first "
                          "(the export's model card reports the row's measurements)")
    if row["status"] != "ok":
        raise ExportError(f"config {name!r} did not build ({row['status']}: {row['reason']}); nothing to export")
    bm = results.get(f"benchmark:{name}", {}).get("metrics") or {}
    row["measured_on"] = _device_line(bm.get("device"))
    return row, doc


def _device_line(device: Optional[dict]) -> str:
    from optforge.report.results import device_line

    return device_line({}, [device]) if device else "unknown device"


def _round_trip(module, staged: Path, artifact: Path, device: str, row_meta: dict, data_dir: Path,
                err: Callable[[str], None], tty: bool) -> dict:
    from optforge import training
    from optforge.artifacts import load_runnable
    from optforge.methods.compile import allowed_difference
    from optforge.export.roundtrip import compare, compare_tokens
    from optforge.stages.data import EVAL_FILE, read_examples

    texts, _ = read_examples(data_dir / EVAL_FILE)
    training.configure_threads()
    runnable = load_runnable(artifact, device, row_meta["precision"], verify=False)  # verified just before
    exported = module.load_logits(staged)
    batch = min(32, int(row_meta.get("max_batch") or 32))  # an AOTI package takes at most its max_batch

    def progress(done: int, total: int) -> None:
        line = f"round trip: {done}/{total} batches"
        if tty:
            err(f"\r{line}" + ("\n" if done == total else ""))
        elif done % PROGRESS_EVERY == 0 or done == total:
            err(line + "\n")

    err(f"round trip: {len(texts)} eval examples, the cached artifact ({runnable.description} on {device}) "
        f"against the exported {module.NAME}\n")
    rt = compare(runnable, exported, texts, batch, progress)
    inner = row_meta.get("inner_format", row_meta.get("format"))
    rt["allowed"] = allowed_difference("float" if inner in ("aoti", "compiled") else inner,
                                       row_meta["precision"], rt["logit_scale"], None)
    rt["precision"] = row_meta["precision"]
    rt["reference"] = f"{runnable.description} on {device}, loaded by optforge"
    problems = []
    tokenizer_dir = getattr(module, "TOKENIZER", None)
    rt["tokens"] = compare_tokens(runnable, staged / tokenizer_dir, texts) if tokenizer_dir else None
    if rt["tokens"] is not None and rt["tokens"]["identical"] != len(texts):
        m = rt["tokens"]["first_mismatch"]
        problems.append(f"the exported tokenizer gives other token ids for {len(texts) - rt['tokens']['identical']} "
                        f"of {len(texts)} texts (first: {m['text'][:60]!r}: {len(m['exported'])} ids, optforge "
                        f"{len(m['cached'])})")
    if not rt["finite"]:
        problems.append("the exported model gives non-finite logits")
    if rt["argmax_identical"] != rt["examples"]:
        m = rt["first_mismatch"]
        problems.append(f"{rt['examples'] - rt['argmax_identical']} of {rt['examples']} predictions differ "
                        f"(first: {m['text'][:60]!r}: exported {m['exported']} vs cached {m['cached']})")
    if rt["max_abs_diff"] > rt["allowed"]:
        problems.append(f"max |logit diff| {rt['max_abs_diff']:.3g} > {rt['allowed']:.3g} allowed")
    if problems:
        raise ExportError(f"round trip failed: the exported {module.NAME} model disagrees with the cached "
                          f"artifact on the eval split: {'; '.join(problems)}; nothing was exported")
    return rt


def card_context(session, doc: dict, row: dict, fmt: str, entry: tuple[str, str], meta: dict, row_meta: dict,
                 written: dict, rt: dict, display: str) -> dict:
    """Everything the model card template (card.md.j2) reads; `entry`: (cache key, stage) of the artifact."""
    batches = sorted(row["latency_ms"], key=int)
    latency = [{"batch": b, "model_p50": row["latency_ms"][b]["p50"],
                "e2e_p50": (row["e2e_latency_ms"].get(b) or {}).get("p50"),
                "speedup": row["speedup"].get(b), "model_speedup": row["model_speedup"].get(b),
                "ci": (row.get("speedup_ci") or {}).get(b)} for b in batches]
    cast = row_meta["precision"] != row_meta["saved_precision"]
    return {
        "recipe_name": session.name, "recipe_path": display, "recipe_hash": doc["recipe_hash"],
        "config": row["name"], "fmt": fmt, "optforge_version": __version__,
        "model_description": row["model_description"], "precision": row_meta["precision"],
        "quantization": row.get("quantization"), "compile_mode": row.get("compile_mode"),
        "key": entry[0], "stage": entry[1], "artifact_format": meta.get("format"),
        "baseline": doc["baseline"], "is_baseline": row["is_baseline"],
        "accuracy": row["accuracy"], "accuracy_delta": row["accuracy_delta"], "eval_n": row["eval_n"],
        "verdict": row["verdict"], "speedup_scope": row["speedup_scope"], "latency": latency,
        "speedup_method": row.get("speedup_method"),
        "measured_on": row["measured_on"], "threads": row.get("threads"), "size_mb": row.get("size_mb"),
        "versions": doc["versions"], "labels": list(meta.get("label_names") or []),
        "max_length": meta.get("max_length"),
        "loader": written["loader"], "details": written.get("details") or {},
        "cast": cast, "saved_precision": row_meta["saved_precision"],
        "rt": rt,
    }

