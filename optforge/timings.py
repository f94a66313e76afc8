"""How long each stage took on this machine, so that `plan` can say how long a build will take.

After each stage it runs (built, or a recorded StageFailure) the executor records its wall time in
`<cache>/timings.json`:

    {"format": 1, "machines": {"cpu: Xeon, 2 cores": {"recipes": {"sst2": {
        "teacher": {"kind": "teacher", "s": 526.2, "at": 1718000000.0}, ...}}}}}

A machine is named by its device fingerprint's summary (`optforge.device.fingerprint_summary`: the CPU
or GPU model, its cores or driver), so a time measured elsewhere, or on this host's GPU for a CPU build,
is never used: training time depends on the machine even where the stage's key does not. The file holds
names (machine, recipe, stage, kind), seconds and when: no path, nothing secret.

`plan` expects a stale stage to take what the same stage of the same recipe took at its last run here;
else what the last run of a stage of its kind took here ("last distill run"); else nothing. It is a
guide, never a reason to fail: a missing, unreadable or malformed file (or entry) is no estimate, and a
timing that cannot be written is dropped. Writes are read-modify-write under `locks/.timings` and an
atomic replace, so concurrent builds lose nothing and a reader never sees half a file. Bounded: the
newest `MAX_RUNS` runs per machine, the `MAX_MACHINES` machines heard from last.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

from optforge.device import fingerprint_summary
from optforge.fingerprint import read_json, write_json_atomic
from optforge.progress import fmt_duration

TIMINGS = "timings.json"
FORMAT = 1
MAX_MACHINES = 16
MAX_RUNS = 512  # per machine

# machine -> recipe -> stage -> Run
Runs = dict[str, dict[str, dict[str, "Run"]]]


@dataclass(frozen=True)
class Run:
    kind: str
    seconds: float
    at: float  # time.time() when it was recorded: which run is the last one


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str  # "stage": this stage's last run here | "kind": the last run here of a stage of its kind
    kind: str

    def label(self) -> str:
        text = f"~{fmt_duration(self.seconds)}"
        return text if self.source == "stage" else f"{text} (last {self.kind} run)"


def machine_name(device_fp: Optional[dict]) -> str:
    """The name timings are kept under: the summary of the build's device fingerprint."""
    return fingerprint_summary(device_fp)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _run(entry) -> Optional[Run]:
    if not isinstance(entry, dict):
        return None
    kind, seconds, at = entry.get("kind"), entry.get("s"), entry.get("at")
    if not (isinstance(kind, str) and _number(seconds) and seconds >= 0 and _number(at)):
        return None
    return Run(kind, float(seconds), float(at))


def _parse(data) -> Runs:
    """The well-formed runs of a timings file's content; anything else is dropped."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("machines"), dict):
        return {}
    runs: Runs = {}
    for machine, held in data["machines"].items():
        recipes = held.get("recipes") if isinstance(held, dict) else None
        for recipe, stages in (recipes.items() if isinstance(recipes, dict) else ()):
            for stage, entry in (stages.items() if isinstance(stages, dict) else ()):
                run = _run(entry)
                if run is not None:
                    runs.setdefault(machine, {}).setdefault(recipe, {})[stage] = run
    return runs


def load(root: Path | str) -> Runs:
    """The runs recorded in the cache at `root` ({} when there are none or the file is unreadable)."""
    return _parse(read_json(Path(root) / TIMINGS))


def _bounded(runs: Runs) -> Runs:
    """The newest MAX_RUNS runs of each of the MAX_MACHINES machines with the newest runs."""
    def newest(recipes) -> float:
        return max(r.at for stages in recipes.values() for r in stages.values())

    out: Runs = {}
    for machine in sorted(runs, key=lambda m: newest(runs[m]), reverse=True)[:MAX_MACHINES]:
        flat = sorted(((run, recipe, stage) for recipe, stages in runs[machine].items()
                       for stage, run in stages.items()), key=lambda t: t[0].at, reverse=True)
        for run, recipe, stage in flat[:MAX_RUNS]:
            out.setdefault(machine, {}).setdefault(recipe, {})[stage] = run
    return out


def _dump(runs: Runs) -> dict:
    return {"format": FORMAT, "machines": {
        machine: {"recipes": {recipe: {stage: {"kind": r.kind, "s": r.seconds, "at": r.at}
                                       for stage, r in stages.items()}
                              for recipe, stages in recipes.items()}}
        for machine, recipes in runs.items()}}


def record(cache, machine: str, recipe: str, stage: str, kind: str, seconds: float,
           now: Optional[float] = None) -> None:
    """Keep `seconds` as the last run of `stage` of `recipe` on `machine` in `cache` (an
    optforge.cache.Cache). Never raises for the file: a timing only guides `plan`."""
    run = Run(kind, round(float(seconds), 3), time.time() if now is None else float(now))
    try:
        with cache.exclusive(".timings"):
            runs = load(cache.root)
            runs.setdefault(machine, {}).setdefault(recipe, {})[stage] = run
            write_json_atomic(cache.root / TIMINGS, _dump(_bounded(runs)), indent=1)
    except OSError:
        pass


def estimate(runs: Runs, machine: str, recipe: str, stage: str, kind: str) -> Optional[Estimate]:
    """This stage's last run on `machine`, else the last run there of a stage of the same kind."""
    here = runs.get(machine, {})
    same = here.get(recipe, {}).get(stage)
    if same is not None and same.kind == kind:
        return Estimate(same.seconds, "stage", kind)
    alike = [r for stages in here.values() for r in stages.values() if r.kind == kind]
    if not alike:
        return None
    return Estimate(max(alike, key=lambda r: r.at).seconds, "kind", kind)


def _to_run(plans: Iterable) -> list:
    """The stages a build would run: stale, and not below a recorded failure."""
    return [p for p in plans if p.status == "stale" and not p.blocked]


def plan_estimates(root: Path | str, machine: str, recipe: str, plans: Iterable) -> dict[str, Estimate]:
    """stage name -> Estimate, for each stage of `plans` (optforge.plan.StagePlan) a build would run and
    that has one."""
    runs = load(root)
    out = {}
    for p in _to_run(plans):
        found = estimate(runs, machine, recipe, p.name, p.kind)
        if found is not None:
            out[p.name] = found
    return out


def expected(plans: Iterable, estimates: Mapping[str, Estimate]) -> dict:
    """{"seconds": the sum of the estimates, "stale": stages a build would run, "no_estimate": of which
    without an estimate} (what `plan --json` says)."""
    to_run = _to_run(plans)
    return {"seconds": sum(estimates[p.name].seconds for p in to_run if p.name in estimates),
            "stale": len(to_run), "no_estimate": sum(p.name not in estimates for p in to_run)}


def total_line(plans: Iterable, estimates: Mapping[str, Estimate]) -> Optional[str]:
    """`plan`'s last line: "~14m30s expected for 21 stale stages (3 never run here: no estimate)";
    None when nothing would run."""
    e = expected(plans, estimates)
    n = e["stale"]
    if not n:
        return None
    stages = f"{n} stale stage{'s' if n != 1 else ''}"
    if e["no_estimate"] == n:
        return f"no time estimate: none of the {stages} has run on this machine"
    unknown = f" ({e['no_estimate']} never run here: no estimate)" if e["no_estimate"] else ""
    return f"~{fmt_duration(e['seconds'])} expected for {stages}{unknown}"
