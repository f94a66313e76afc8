"""Keys and fresh/stale reasons on plain data: no files, no cache, no stages."""

from __future__ import annotations

import pytest

from optforge.cache_entry import EntryState
from optforge.graph import Graph, Node, toposort
from optforge.plan import (KindInfo, key_material, param_changes, plan_stages, select, skipped_below,
                           stage_key)

KINDS = {"src": KindInfo("1", uses_torch=False), "train": KindInfo("1"), "bench": KindInfo("1", hardware_bound=True)}
CPU = {"kind": "cpu", "name": "Xeon", "isa": ["avx2"], "cores": 2}
VERSIONS = {"torch": "2.13.0", "transformers": "5.23.0", "torchao": "0.18.0"}


def graph() -> Graph:
    return Graph(toposort([
        Node("data", "src", {}, {}, {"train": "train.tsv"}),
        Node("teacher", "train", {}, {"data": "data"}),
        Node("distill", "train", {}, {"teacher": "teacher", "data": "data"}),
        Node("bench:a", "bench", {}, {"model": "distill"}),
        Node("bench:b", "bench", {}, {"model": "distill"}),
        Node("bench:t", "bench", {}, {"model": "teacher"}),
    ]))


class World:
    """A fake cache + lock file: `plan()` like `optforge plan`, `build()` like a successful build."""

    def __init__(self):
        self.params = {"data": {"seed": 0}, "teacher": {"lr": 0.001, "opt": {"wd": 0.01}},
                       "distill": {"temperature": 4.0}, "bench:a": {"batch": [1, 8]},
                       "bench:b": {"batch": [1, 8]}, "bench:t": {"batch": [1, 8]}}
        self.data = {"data": {"train": "sha-train-1"}}
        self.versions, self.device = dict(VERSIONS), dict(CPU)
        self.entries: dict[str, EntryState] = {}
        self.lock: dict = {}
        self.kinds = dict(KINDS)

    def plan(self, force=(), **kw):
        return plan_stages(graph(), self.kinds, self.params, self.data, self.versions, self.device, self.lock,
                           lambda k: self.entries.get(k, EntryState("missing")), frozenset(force), **kw)

    def build(self):
        ran = []
        for p in self.plan():
            if p.status == "stale" and self.entries.get(p.key, EntryState("missing")).status != "ok":
                ran.append(p.name)
                self.entries[p.key] = EntryState("ok")
            self.lock[p.name] = p.record
        return ran

    def verdicts(self):
        return {p.name: (p.status, p.reasons) for p in self.plan()}


@pytest.fixture
def world():
    w = World()
    assert w.build() == ["data", "teacher", "distill", "bench:a", "bench:t"]  # bench:b = bench:a
    return w


def test_key_is_canonical_and_covers_everything():
    info = KindInfo("1", hardware_bound=True)
    base = key_material("k", info, {"a": 1, "b": {"c": 2}}, {"m": "x"}, {"f": "s"}, VERSIONS, CPU)
    same = key_material("k", info, {"b": {"c": 2}, "a": 1}, {"m": "x"}, {"f": "s"}, dict(VERSIONS), dict(CPU))
    assert stage_key(base) == stage_key(same)
    variants = [
        key_material("k2", info, {"a": 1, "b": {"c": 2}}, {"m": "x"}, {"f": "s"}, VERSIONS, CPU),
        key_material("k", KindInfo("2", True), {"a": 1, "b": {"c": 2}}, {"m": "x"}, {"f": "s"}, VERSIONS, CPU),
        key_material("k", info, {"a": 1.0, "b": {"c": 2}}, {"m": "x"}, {"f": "s"}, VERSIONS, CPU),
        key_material("k", info, {"a": 1, "b": {"c": 2}}, {"m": "y"}, {"f": "s"}, VERSIONS, CPU),
        key_material("k", info, {"a": 1, "b": {"c": 2}}, {"m": "x"}, {"f": "t"}, VERSIONS, CPU),
        key_material("k", info, {"a": 1, "b": {"c": 2}}, {"m": "x"}, {"f": "s"}, VERSIONS | {"torch": "2.12.0"}, CPU),
        key_material("k", info, {"a": 1, "b": {"c": 2}}, {"m": "x"}, {"f": "s"}, VERSIONS, CPU | {"cores": 4}),
    ]
    assert len({stage_key(base)} | {stage_key(v) for v in variants}) == 8


def test_device_and_versions_only_where_declared():
    plain, no_torch = KindInfo("1"), KindInfo("1", uses_torch=False)
    k = lambda info, dev, ver: stage_key(key_material("k", info, {}, {}, {}, ver, dev))  # noqa: E731
    assert k(plain, CPU, VERSIONS) == k(plain, {"kind": "cuda", "name": "H100"}, VERSIONS)
    assert k(no_torch, CPU, VERSIONS) == k(no_torch, CPU, VERSIONS | {"torch": "9"})


def test_a_kinds_own_libraries_enter_its_key_and_reasons(world):
    """StageKind.libraries (onnxruntime's stage: onnxruntime, onnx) key that kind only, with or without torch."""
    ort = lambda v: KindInfo("1", hardware_bound=True, libraries=(("onnxruntime", v),))  # noqa: E731
    k = lambda info: stage_key(key_material("k", info, {}, {}, {}, VERSIONS, CPU))  # noqa: E731
    assert k(ort("1.32.0")) != k(ort("1.33.0")) and k(ort("1.32.0")) != k(KindInfo("1", hardware_bound=True))
    no_torch = KindInfo("1", uses_torch=False, libraries=(("onnx", "1.23.2"),))
    assert key_material("k", no_torch, {}, {}, {}, VERSIONS, CPU)["versions"] == {"onnx": "1.23.2"}
    world.kinds["bench"] = ort("1.32.0")
    world.build()
    world.kinds["bench"] = ort("1.33.0")
    v = world.verdicts()
    assert v["bench:t"] == ("stale", ["onnxruntime 1.32.0 -> 1.33.0"]) and v["teacher"][0] == "fresh"


def test_first_plan_says_new_stage():
    assert {p.reasons[0] for p in World().plan()} == {"new stage"}


def test_fully_built_is_fresh_with_no_reasons(world):
    assert all(v == ("fresh", []) for v in world.verdicts().values())


def test_param_change_names_old_and_new_value_and_upstream(world):
    world.params["distill"] = {"temperature": 2.0}
    v = world.verdicts()
    assert v["distill"] == ("stale", ["distill.temperature 4.0 -> 2.0"])
    assert v["bench:a"] == ("stale", ["upstream distill changed"])
    assert v["teacher"][0] == v["bench:t"][0] == "fresh"
    assert world.build() == ["distill", "bench:a"]  # bench:b has bench:a's key: computed once


def test_nested_added_and_removed_params(world):
    world.params["teacher"] = {"lr": 0.001, "opt": {"wd": 0.1, "beta": 0.9}}
    assert world.verdicts()["teacher"][1] == ["teacher.opt.beta (unset) -> 0.9", "teacher.opt.wd 0.01 -> 0.1"]
    assert param_changes("s", {"x": [1, 8], "m": "a"}, {"x": [1, 16]}) == ["s.m a -> (unset)", "s.x [1, 8] -> [1, 16]"]


def test_reverting_an_edit_finds_the_old_entry(world):
    world.params["distill"] = {"temperature": 2.0}
    world.build()
    world.params["distill"] = {"temperature": 4.0}
    assert world.verdicts()["distill"] == ("fresh", [])  # content-addressed: nothing to rebuild


def test_output_missing_and_corrupted(world):
    keys = {p.name: p.key for p in world.plan()}
    del world.entries[keys["teacher"]]
    world.entries[keys["bench:t"]] = EntryState("corrupted", "weights.bin sha256 mismatch")
    v = world.verdicts()
    assert v["teacher"] == ("stale", ["output missing"])
    assert v["bench:t"] == ("stale", ["output corrupted: weights.bin sha256 mismatch"])
    assert v["distill"][0] == "fresh"  # its key did not move, its entry is intact


def test_data_versions_and_device_changes(world):
    world.data["data"] = {"train": "sha-train-2"}
    world.versions["torch"] = "2.14.0"
    world.device = CPU | {"name": "EPYC"}
    v = world.verdicts()
    assert v["data"][1] == ["data file train changed (train)"]
    assert v["teacher"][1] == ["upstream data changed", "torch 2.13.0 -> 2.14.0"]
    assert "device changed: cpu: Xeon, 2 cores -> cpu: EPYC, 2 cores" in v["bench:t"][1]


def test_code_version_bump(world):
    world.kinds["bench"] = KindInfo("2", hardware_bound=True)
    assert world.verdicts()["bench:t"][1] == ["bench code version 1 -> 2"]


def test_forced_stage_is_stale_and_only_it(world):
    v = {p.name: (p.status, p.reasons) for p in world.plan(force={"teacher"})}
    assert v["teacher"] == ("stale", ["forced"])
    assert v["distill"][0] == "fresh"


def test_recorded_failure_is_fresh_and_blocks_dependents(world):
    world.params["distill"] = {"temperature": 3.0}
    keys = {p.name: p.key for p in world.plan()}
    world.entries[keys["distill"]] = EntryState("failed", "unsupported")
    v = world.verdicts()
    assert v["distill"] == ("fresh", ["previous run failed: unsupported (recorded; --force distill retries)"])
    assert v["bench:a"] == ("stale", ["upstream distill changed", "upstream distill failed (will be skipped)"])
    forced = {p.name: p for p in world.plan(force={"distill"})}["distill"]
    assert forced.reasons == ["forced", "previous run failed: unsupported"]


def test_a_tolerant_kind_below_a_recorded_failure_is_not_marked_skipped(world):
    world.params["distill"] = {"temperature": 3.0}
    keys = {p.name: p.key for p in world.plan()}
    world.entries[keys["distill"]] = EntryState("failed", "unsupported")
    world.kinds["bench"] = KindInfo("1", hardware_bound=True, tolerates_failed_inputs=True)
    plans = {p.name: p for p in world.plan()}
    assert (plans["bench:a"].status, plans["bench:a"].reasons) == ("stale", ["upstream distill changed"])
    assert plans["bench:a"].key == keys["bench:a"]  # tolerance is no part of the key


def test_skipped_below_names_the_input_that_failed_and_spares_tolerant_kinds():
    g = Graph(toposort([
        Node("data", "src", {}),
        Node("teacher", "train", {}, {"data": "data"}),
        Node("distill", "train", {}, {"teacher": "teacher", "data": "data"}),
        Node("bench:a", "bench", {}, {"model": "distill"}),
        Node("serve", "serve", {}, {"row": "bench:a", "data": "data"}),
    ]))
    kinds = KINDS | {"serve": KindInfo("1", tolerates_failed_inputs=True)}
    # a skipped stage blocks those below it, and the reason names the direct input
    assert skipped_below(g, {"teacher"}, g.names(), kinds) == {"distill": "upstream teacher failed",
                                                               "bench:a": "upstream distill failed"}
    # only candidates are skipped, and only they pass a skip on
    assert skipped_below(g, {"teacher"}, ["bench:a"], kinds) == {}
    # the first failed input in input order is the one named
    assert skipped_below(g, {"data", "teacher"}, ["distill"], kinds) == {"distill": "upstream teacher failed"}


def test_crash_recorded_in_lock_is_reported(world):
    world.params["teacher"] = {"lr": 0.5, "opt": {"wd": 0.01}}
    p = {p.name: p for p in world.plan()}["teacher"]
    world.lock["teacher"] = p.record | {"error": "RuntimeError: boom"}
    assert world.verdicts()["teacher"] == ("stale", ["previous run failed: RuntimeError: boom"])


def test_an_entry_whose_digest_differs_from_the_recorded_one_is_stale(world):
    """Code-bearing entries: the lock file (outside the cache) records the digest of what was loaded; a
    consistently tampered entry (files and manifest rewritten) has another digest and is not trusted."""
    keys = {p.name: p.key for p in world.plan()}
    world.lock["distill"] = world.lock["distill"] | {"digest": "d1"}
    world.entries[keys["distill"]] = EntryState("ok", digest="d1")
    assert world.verdicts()["distill"] == ("fresh", [])
    world.entries[keys["distill"]] = EntryState("ok", digest="d2")
    plans = {p.name: p for p in world.plan(lock_name="recipes/x.lock")}
    assert (plans["distill"].status, plans["distill"].reasons) == \
        ("stale", ["output does not match the digest recorded in recipes/x.lock"])
    assert plans["bench:a"].status == "fresh"  # keys did not move: only the distrusted entry is rebuilt
    # another recipe's lock file that records this digest for this key vouches for it (it rebuilt the
    # shared stage): trusted, so two recipes sharing a stage never rebuild it in turn
    vouched = {p.name: p for p in world.plan(vouched=lambda key, d: (key, d) == (keys["distill"], "d2"))}
    assert vouched["distill"].status == "fresh"
    # nothing recorded for this key (a new stage, an older lock file): trusted, recorded at the next build
    world.lock["distill"] = world.lock["distill"] | {"digest": None}
    assert world.verdicts()["distill"] == ("fresh", [])


def test_rewired_input_is_named():
    w = World()
    w.build()
    g = graph()
    g.nodes[3] = Node("bench:a", "bench", {}, {"model": "data"})
    plans = plan_stages(Graph(g.nodes), w.kinds, w.params, w.data, w.versions, w.device, w.lock,
                        lambda k: w.entries.get(k, EntryState("missing")))
    assert {p.name: p for p in plans}["bench:a"].reasons == ["input model now from data (was distill)"]


def test_old_lock_record_without_details_still_explains():
    w = World()
    w.build()
    w.lock["teacher"] = {"key": "0" * 64}
    w.params["teacher"] = {"lr": 0.5}
    assert w.verdicts()["teacher"][1][0] == "teacher.lr (unset) -> 0.5"


def test_select_until():
    g = graph()
    assert select(g, None) == set(g.names())
    assert select(g, "distill") == {"data", "teacher", "distill"}


def test_a_stage_with_many_changed_inputs_names_each_upstream_once_and_counts_the_rest():
    from optforge.plan import UPSTREAM_SHOWN, change_reasons

    names = [f"row{i}" for i in range(UPSTREAM_SHOWN + 2)]
    old = {"kind": "k", "version": "1", "params": {}, "data": {},
           "inputs": {"model": "a", **{f"in:{n}": "a" for n in names}, "gone": "a"},
           "sources": {"model": "row0", **{f"in:{n}": n for n in names}, "gone": "x"}}
    new = {"kind": "k", "version": "1", "params": {}, "data": {},
           "inputs": {"model": "b", **{f"in:{n}": "b" for n in names}, "logits": "c"},
           "sources": {"model": "row0", **{f"in:{n}": n for n in names}, "logits": "teacher_logits"}}
    assert change_reasons("s", new, old) == [
        "new input logits (teacher_logits)",
        f"upstream {', '.join(names[:UPSTREAM_SHOWN])} and {len(names) - UPSTREAM_SHOWN} more changed",
        "input gone removed"]
