"""Stage keys and the fresh/stale verdict with its reasons. Pure: plain data in, plain data out.

A stage is *fresh* when the cache holds a trusted entry under its key (a recorded failure counts: a
rebuild does not retry it, `--force` does). Otherwise it is *stale*, and the reasons say what changed,
found by diffing the key material against the lock file's record of the last build of that stage,
cheapest first (DVC order): code version, params, inputs, data, library versions, device, output.

An entry the cache vouches for is still distrusted when the lock file recorded another digest for
that key (entries that hold code: optforge.cache.entry_digest, `recorded_elsewise`), unless another
recipe's lock file records this one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

from optforge.cache_entry import EntryState
from optforge.device import fingerprint_summary
from optforge.fingerprint import sha256_json


@dataclass(frozen=True)
class KindInfo:
    """What the planner needs from a StageKind (so plans can be tested without stage modules)."""

    version: str
    hardware_bound: bool = False
    uses_torch: bool = True
    tolerates_failed_inputs: bool = False  # runs on the inputs that succeeded (never enters the key)
    libraries: tuple[tuple[str, Optional[str]], ...] = ()  # (library, installed version) of StageKind.libraries


@dataclass
class StagePlan:
    name: str
    kind: str
    key: str
    status: str  # fresh | stale
    reasons: list[str]
    record: dict  # the key material plus input stage names: what the lock file stores for this stage
    entry: EntryState = EntryState("missing")
    blocked: Optional[str] = None  # a stale stage below a recorded failure: why it will be skipped

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "status": self.status, "reasons": self.reasons,
                "key": self.key}


def key_material(kind: str, info: KindInfo, params: dict, input_keys: Mapping[str, str],
                 data: Mapping[str, str], versions: Mapping[str, Optional[str]],
                 device: Optional[dict]) -> dict:
    """Everything a stage's output depends on. `params` are already validated with defaults filled in.
    Names of stages and of the recipe are deliberately absent: equal work gets an equal key."""
    material = {"kind": kind, "version": info.version, "params": params,
                "inputs": dict(input_keys), "data": dict(data)}
    if info.uses_torch:
        material["versions"] = dict(versions)
    if info.libraries:
        material["versions"] = material.get("versions", {}) | dict(info.libraries)
    if info.hardware_bound:
        material["device"] = device
    return material


def stage_key(material: dict) -> str:
    return sha256_json(material)


# --------------------------------------------------------------------------- reasons


def _fmt(value) -> str:
    if value is _UNSET:
        return "(unset)"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


_UNSET = object()


def _flatten(d, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay whole values (they read best that way)."""
    out = {}
    if isinstance(d, dict) and (d or not prefix):  # an empty nested dict is a value of its own
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def param_changes(stage: str, old: dict, new: dict) -> list[str]:
    """["distill.temperature 4.0 -> 2.0", ...] sorted by parameter path."""
    a, b = _flatten(old or {}), _flatten(new or {})
    out = []
    for path in sorted(set(a) | set(b)):
        va, vb = a.get(path, _UNSET), b.get(path, _UNSET)
        if va != vb or type(va) is not type(vb):
            name = f"{stage}.{path}" if path else stage
            out.append(f"{name} {_fmt(va)} -> {_fmt(vb)}")
    return out


UPSTREAM_SHOWN = 3  # a stage with many inputs (serve_benchmark reads every row) names this many, then "N more"


def change_reasons(name: str, new: dict, old: Optional[dict], data_paths: Mapping[str, str] | None = None) -> list[str]:
    """Why a stage whose key moved is stale: what differs between its lock record and its new record."""
    if not old:
        return ["new stage"]
    reasons = []
    if "kind" in old and old["kind"] != new["kind"]:
        reasons.append(f"kind {old['kind']} -> {new['kind']}")
    elif "version" in old and old["version"] != new["version"]:
        reasons.append(f"{new['kind']} code version {old.get('version')} -> {new['version']}")
    reasons += param_changes(name, old.get("params", {}), new["params"])
    old_in, old_src = old.get("inputs", {}), old.get("sources", {})
    changed: list[str] = []  # upstream stages whose keys moved, each named once
    for role, key in new["inputs"].items():
        src = new["sources"].get(role, role)
        if role not in old_in:
            reasons.append(f"new input {role} ({src})")
        elif old_src.get(role, src) != src:
            reasons.append(f"input {role} now from {src} (was {old_src.get(role)})")
        elif old_in.get(role) != key and src not in changed:
            changed.append(src)
    if changed:
        more = len(changed) - UPSTREAM_SHOWN
        names = ", ".join(changed[:UPSTREAM_SHOWN]) + (f" and {more} more" if more > 0 else "")
        reasons.append(f"upstream {names} changed")
    for role in sorted(set(old_in) - set(new["inputs"])):
        reasons.append(f"input {role} removed")
    for role, digest in new["data"].items():
        if old.get("data", {}).get(role) != digest:
            reasons.append(f"data file {role} changed ({(data_paths or {}).get(role, role)})")
    for lib, version in new.get("versions", {}).items():
        was = old.get("versions", {}).get(lib)
        if "versions" in old and was != version:
            reasons.append(f"{lib} {was} -> {version}")
    if "device" in new and "device" in old and old["device"] != new["device"]:
        reasons.append(f"device changed: {fingerprint_summary(old['device'])} -> {fingerprint_summary(new['device'])}")
    return reasons or ["key changed"]  # e.g. a lock file written by an older optforge


def plan_stages(graph, kinds: Mapping[str, KindInfo], params: Mapping[str, dict],
                data: Mapping[str, Mapping[str, str]], versions: Mapping[str, Optional[str]],
                device: Optional[dict], lock: Mapping[str, dict],
                entry: Callable[[str], EntryState], force: frozenset = frozenset(),
                data_paths: Mapping[str, Mapping[str, str]] | None = None, lock_name: str = "the lock file",
                vouched: Callable[[str, str], bool] = lambda key, digest: False) -> list[StagePlan]:
    """Keys and verdicts for every node of `graph`, in its (topological) order.

    params[name]: the node's validated params; data[name]: role -> sha256 of its data files;
    lock[name]: the lock file's record of the stage's last build; entry(key): the cache's view of it;
    vouched(key, digest): whether another lock file records that digest for that key.
    """
    keys: dict[str, str] = {}
    out: list[StagePlan] = []
    for node in graph.nodes:
        info = kinds[node.kind]
        material = key_material(node.kind, info, params[node.name], {r: keys[s] for r, s in node.inputs.items()},
                                data.get(node.name, {}), versions, device)
        key = keys[node.name] = stage_key(material)
        # no file paths in the record: they differ between machines, the lock file should not
        record = material | {"key": key, "sources": dict(node.inputs)}
        state = entry(key)
        old = lock.get(node.name)
        reasons: list[str] = []
        if node.name in force:
            status, reasons = "stale", ["forced"]
            if state.status == "failed":
                reasons.append(f"previous run failed: {state.reason}")
        elif state.status in ("ok", "failed") and not recorded_elsewise(old, key, state, vouched):
            status = "fresh"
            if state.status == "failed":
                reasons = [f"previous run failed: {state.reason} (recorded; --force {node.name} retries)"]
        else:
            status = "stale"
            if state.status in ("ok", "failed"):
                reasons.append(f"output does not match the digest recorded in {lock_name}")
            elif old and old.get("key") == key:
                if old.get("error"):
                    reasons.append(f"previous run failed: {old['error']}")
                elif state.status == "corrupted":
                    reasons.append(f"output corrupted: {state.reason}")
                else:
                    reasons.append("output missing")
            else:
                reasons = change_reasons(node.name, record, old, (data_paths or {}).get(node.name))
        out.append(StagePlan(node.name, node.kind, key, status, reasons, record, state))
    _mark_blocked(graph, out, kinds)
    return out


def recorded_elsewise(old: Optional[dict], key: str, state: EntryState, vouched: Callable[[str, str], bool]) -> bool:
    """Whether the lock record `old` holds another digest for this very key than the entry has, and no
    other lock file vouches for the entry's (a recipe sharing the stage rebuilt it). Nothing recorded (a
    new stage, an older lock file): trusted, and recorded by the build."""
    recorded = (old or {}).get("digest") if (old or {}).get("key") == key else None
    return bool(recorded) and recorded != state.digest and not vouched(key, state.digest)


def _mark_blocked(graph, plans: list[StagePlan], kinds: Mapping[str, KindInfo]) -> None:
    """A stale stage below a recorded failure cannot run: say so in the plan."""
    failed = {p.name for p in plans if p.entry.status == "failed" and p.status == "fresh"}
    stale = [p.name for p in plans if p.status == "stale"]
    blocked = skipped_below(graph, failed, stale, kinds)
    for p in plans:
        if p.name in blocked:
            p.blocked = blocked[p.name]
            p.reasons.append(f"{blocked[p.name]} (will be skipped)")


def skipped_below(graph, failed: Iterable[str], candidates: Iterable[str],
                  kinds: Mapping[str, KindInfo]) -> dict[str, str]:
    """The one rule for "skip what depends on a failure", used by the plan, the executor and the report.

    Of `candidates` (stage names in graph order), those with an input in `failed` (stages that failed or
    were skipped) -> the reason, which names that input ("upstream distill failed"; the first such input
    in input order). A skipped stage counts as failed for the candidates below it. A kind that
    `tolerates_failed_inputs` is never skipped: it runs on the inputs that succeeded. `kinds` maps a
    kind to anything with that attribute (a KindInfo or a StageKind).
    """
    failed = set(failed)
    out: dict[str, str] = {}
    for name in candidates:
        node = graph[name]
        if kinds[node.kind].tolerates_failed_inputs:
            continue
        bad = next((dep for dep in node.inputs.values() if dep in failed), None)
        if bad is not None:
            out[name] = f"upstream {bad} failed"
            failed.add(name)
    return out


def select(graph, until: Optional[str]) -> set[str]:
    """Stage names a build covers: everything, or `until` and what it depends on."""
    if until is None:
        return set(graph.names())
    graph.require(until)
    return graph.upstream(until)
