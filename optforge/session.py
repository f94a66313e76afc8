"""Everything `plan`, `build` and `report` share: the recipe, its graph, the cache, the environment that
enters keys, the plan itself, the per-stage results the report reads, and rendering the report.

The edges that do I/O live here so that `plan.py` stays pure. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ValidationError

from optforge import __version__
from optforge.cache import Cache
from optforge.device import device_fingerprint, resolve_device
from optforge.errors import DataError, OptforgeError
from optforge.fingerprint import library_versions, read_json, sha256_json, write_json_atomic
from optforge.graph import Graph
from optforge.lockfile import lock_path, read_lock
from optforge.plan import KindInfo, StagePlan, plan_stages, skipped_below
from optforge.recipe import KEY_COMPAT, Recipe
from optforge.recipe_io import load_and_check, remote_code_notice
from optforge.stages.base import StageKind
from optforge.stages.registry import get_kind


@dataclass
class Session:
    name: str  # the recipe's name (lock and report folder names)
    graph: Graph
    cache: Cache
    device: str  # "cpu" | "cuda"
    device_fp: dict
    versions: dict
    kinds: dict[str, StageKind]
    params: dict[str, BaseModel]  # stage name -> validated params (what StageContext gets)
    data_sha: dict[str, dict[str, str]]  # stage name -> role -> sha256 of its data files
    lock_file: Path
    lock: dict = field(default_factory=dict)  # stage name -> record of its last build
    recipe: Optional[Recipe] = None  # the recipe as `device` sees it; absent for hand-built graphs (engine tests)
    recipe_path: Optional[Path] = None

    def plan(self, force=()) -> list[StagePlan]:
        for f in force:
            self.graph.require(f)
        infos = {k: KindInfo(v.version, v.hardware_bound, v.uses_torch, v.tolerates_failed_inputs,
                             tuple(library_versions(v.libraries).items()) if v.libraries else ())
                 for k, v in self.kinds.items()}
        # what enters keys: without the fields that say how a stage runs (recipe.without_unkeyed)
        params = {n: p.model_dump(mode="json", context=KEY_COMPAT) for n, p in self.params.items()}
        data_paths = {n.name: dict(n.data_files) for n in self.graph.nodes if n.data_files}
        return plan_stages(self.graph, infos, params, self.data_sha, self.versions, self.device_fp,
                           self.lock, self.cache.state, frozenset(force), data_paths, str(self.lock_file),
                           self.vouched)

    def vouched(self, key: str, digest: str) -> bool:
        """Whether another registered lock file records `digest` for `key` (a recipe sharing this stage
        rebuilt it). Only lock files outside the cache count: a restored or shared cache can bring its
        own recipes.json, not files beside the recipes."""
        root = self.cache.root.resolve()
        for path in map(Path, self.cache.registered()):
            if path == self.lock_file.absolute() or path.resolve().is_relative_to(root):
                continue
            stages = (read_lock(path) or {}).get("stages", {})
            if any(isinstance(r, dict) and (r.get("key"), r.get("digest")) == (key, digest) for r in stages.values()):
                return True
        return False

    def reload_lock(self) -> None:
        self.lock = (read_lock(self.lock_file) or {}).get("stages", {})

    def env(self) -> dict:
        """What the report prints about where and with what the results were made."""
        # the device's view, less the keys that only select it or say where results are kept (`cache`): a
        # recipe that uses none of them hashes as it did before they existed
        selectors = {"overrides": True, "cache": True, "configs": {"__all__": {"devices"}}}
        recipe = (self.recipe.model_dump(mode="json", exclude=selectors, context=KEY_COMPAT) if self.recipe
                  else [n.params for n in self.graph.nodes])
        # local files: their content hashes; a hub dataset: what names it
        data = self.data_sha.get("data") or (self.graph["data"].params if "data" in self.graph.by_name
                                             else self.data_sha)
        # the libraries stage kinds of this graph declare (onnxruntime rows: onnxruntime, onnx)
        extra = tuple(sorted({lib for k in self.kinds.values() for lib in k.libraries}))
        return {"recipe_hash": sha256_json(recipe),
                "device": self.device_fp,
                "versions": {**self.versions, **library_versions(extra), "optforge": __version__},
                "data_fingerprint": sha256_json(data)}

    def save_hashes(self) -> None:
        try:
            self.cache.hashes.save()
        except OSError:
            pass  # only a memo


def make_session(name: str, graph: Graph, cache: Cache, device: str, lock_file: Path,
                 recipe: Optional[Recipe] = None, recipe_path: Optional[Path] = None) -> Session:
    """A session over any graph; `device` is already resolved ("cpu" | "cuda")."""
    kinds = {n.kind: get_kind(n.kind) for n in graph.nodes}
    params = {}
    for n in graph.nodes:
        try:
            params[n.name] = kinds[n.kind].params_model.model_validate(n.params)
        except ValidationError as e:  # the graph and the stage kind disagree: our bug, said plainly
            raise OptforgeError(f"stage {n.name!r}: its parameters do not fit kind {n.kind!r}'s "
                                f"params_model: {e}") from None
    data_sha = {}
    for n in graph.nodes:
        if n.data_files:
            try:
                data_sha[n.name] = {role: cache.hashes.sha256(p) for role, p in n.data_files.items()}
            except OSError as e:
                raise DataError(f"stage {n.name!r}: cannot read data file: {e}") from None
    session = Session(name, graph, cache, device, device_fingerprint(device, cache.root), library_versions(),
                      kinds, params, data_sha, lock_file, recipe=recipe, recipe_path=recipe_path)
    session.reload_lock()
    session.save_hashes()
    return session


def open_session(recipe: Path | str, device: str = "auto", cache: Cache | None = None,
                 display: str | None = None, trust_remote_code: Optional[bool] = None) -> Session:
    """`trust_remote_code=False` (the CLI's build without --trust-remote-code): a recipe whose teacher
    runs its model's own code is refused with the located notice; None: not checked here."""
    device = resolve_device(device)  # first: the device picks the recipe's rows and overrides
    loaded, graph = load_and_check(recipe, display, device)
    if trust_remote_code is False and (notice := remote_code_notice(loaded)) is not None:
        raise notice
    return make_session(loaded.recipe.name, graph, cache or Cache(), device, lock_path(loaded.path, device),
                        loaded.view(device), loaded.path)


# --------------------------------------------------------------------------- results and reports


def stage_results(session: Session, plans: list[StagePlan], outcomes: dict | None = None) -> dict:
    """stage name -> {"status": ok|failed|skipped|missing, "metrics", "reason", "key"} for the report.
    `outcomes` (from a build) override what the cache says."""
    outcomes = outcomes or {}
    results = {}
    for p in plans:
        if p.name in outcomes:
            results[p.name] = outcomes[p.name]
        elif p.status == "fresh" and p.entry.status in ("ok", "failed"):
            results[p.name] = {"status": p.entry.status, "metrics": p.entry.metrics,
                               "reason": p.entry.reason, "key": p.key}
        else:
            results[p.name] = {"status": "missing", "metrics": {}, "reason": "not built", "key": p.key}
    failed = [n for n, r in results.items() if r["status"] in ("failed", "skipped")]
    missing = [n for n, r in results.items() if r["status"] == "missing"]
    for name, reason in skipped_below(session.graph, failed, missing, session.kinds).items():
        results[name] = {"status": "skipped", "metrics": {}, "key": results[name]["key"], "reason": reason}
    return results


def report_dir(session: Session) -> Path:
    """reports/<recipe>/ for CPU builds; reports/<recipe>/cuda/ for GPU builds, so one recipe built on
    both keeps both reports side by side (the measured stages differ per device)."""
    base = Path("reports") / session.name
    return base / "cuda" if session.device == "cuda" else base


def _renderer_stamp() -> list:
    """(file, size, mtime) of the renderer's code and of every template it can read (the packaged ones
    and the working directory's overrides, `report.templates.search_path`): a changed one re-renders."""
    from importlib.util import find_spec

    from optforge.report.templates import search_path

    spec = find_spec("optforge.report")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    files = {f for root in roots + search_path() if root.is_dir() for f in root.rglob("*")
             if f.suffix in (".py", ".j2", ".html", ".css", ".md") and f.is_file()}
    stamp = []
    for f in sorted(files):
        st = f.stat()
        stamp.append([str(f), st.st_size, st.st_mtime_ns])
    return stamp


def render(session: Session, results: dict, compare: Optional[Path] = None,
           only_if_changed: bool = False) -> list[Path]:
    """Call the report renderer. With `only_if_changed`, skip it when results, environment and the
    renderer itself are what they were at the last render and its files are still there."""
    if session.recipe is None:  # a hand-built graph (engine tests): no recipe, so no report
        return []
    out_dir = report_dir(session)
    memo_path = session.cache.root / "rendered" / f"{session.name}.json"
    digest = sha256_json({"results": results, "env": session.env(), "out": str(out_dir.absolute()),
                          "compare": str(compare) if compare else None, "renderer": _renderer_stamp(),
                          "recipe": str(session.recipe_path.absolute())})
    if only_if_changed:
        memo = read_json(memo_path, {}) or {}
        files = memo.get("files")
        if memo.get("digest") == digest and files is not None and all(os.path.exists(p) for p in files):
            return [Path(p) for p in files]
    from optforge.report import render_reports

    files = render_reports(recipe=session.recipe, recipe_path=session.recipe_path, graph=session.graph,
                           results=results, env=session.env(), out_dir=out_dir, compare=compare)
    files = [Path(f) for f in files or []]
    write_json_atomic(memo_path, {"digest": digest, "files": [str(f.absolute()) for f in files]})
    return files
