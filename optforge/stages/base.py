"""The contract between the engine and a stage kind.

A stage is a pure function of its parameters and its input artifacts: `run(ctx) -> metrics`. It writes
only into `ctx.out` (an empty temporary directory the engine renames into the cache when `run`
returns). Everything the engine needs to know is declared on the `StageKind`: kind, code version,
parameter model, whether it is hardware-bound, which library versions enter its key.

Stage *modules* (optforge/stages/<kind>.py) import torch inside `run` only, so that importing the
registry stays cheap (validate / plan / no-op build never import torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel


@dataclass(frozen=True)
class RowStep:
    """How a stage kind joins a configuration (a report row) in the stage graph: rows run their kinds'
    steps in `order`; a `measure=False` step makes the row's next artifact from the one before it
    (quantize, compile), a `measure=True` step reads the row's final artifact (evaluate, benchmark).
    `applies(recipe, config)` says whether the row runs this step, `params(recipe, config)` gives the
    stage's parameters (JSON), and `needs_data` wires the data stage in as the `data` input.
    `compares` (a measure step): every row but the baseline's also gets the baseline row's final
    artifact as its `baseline` input, and `baseline_config` / `baseline_precision` in its parameters
    (the benchmark measures both in one run). optforge.graph builds every row from these; the report
    labels such a stage by its kind alone."""

    order: int
    measure: bool
    applies: Callable[[Any, Any], bool]
    params: Callable[[Any, Any], dict]
    needs_data: bool = False
    compares: bool = False
    # the stage-name prefix in the graph (`<stage>:<config>`); None: the kind. The causal-lm kinds
    # (lm_quantize, ...) name their stages as the classifier kinds do (quantize:<config>, ...)
    stage: Optional[str] = None


@dataclass(frozen=True)
class StageKind:
    kind: str
    version: str  # bump when the stage's outputs change for the same inputs
    params_model: type[BaseModel]
    run: Callable[["StageContext"], dict]
    hardware_bound: bool = False  # device fingerprint enters the key (compile, benchmark...)
    # Its metrics are timings (benchmark, serve_benchmark, lm_benchmark): a distributed build runs it with
    # the machine to itself, never beside another stage (optforge.stage_job.machine_share)
    measures_time: bool = False
    uses_torch: bool = True  # torch/transformers/torchao versions enter the key
    libraries: tuple[str, ...] = ()  # other libraries whose installed versions enter the key (onnxruntime...)
    # Runs even when some inputs failed or were skipped, and is handed only the inputs that succeeded
    # (serve_benchmark with `config: best` depends on every row; one failed row must not cancel it).
    tolerates_failed_inputs: bool = False
    row: Optional[RowStep] = None  # set for the kinds a configuration (report row) runs
    # Its artifact is code that runs when it is loaded (AOTInductor shared libraries, pickled Inductor
    # cache artifacts): the lock file, outside the cache, records each such entry's digest, and an entry
    # whose digest differs is rebuilt, never loaded (optforge.plan: "output does not match the digest").
    holds_code: bool = False
    # the recipe task whose graphs use this kind (optforge.recipe.Task); optforge.graph picks kinds by it
    task: str = "classification"


@dataclass
class StageContext:
    name: str  # e.g. "evaluate:baseline"
    kind: str
    params: BaseModel  # validated parameters of this stage
    inputs: dict[str, Path]  # role -> upstream artifact directory (read-only)
    input_metrics: dict[str, dict]  # role -> upstream manifest "metrics"
    out: Path  # empty directory; everything the stage produces goes here
    device: str  # "cpu" | "cuda"
    data_files: dict[str, Path] = field(default_factory=dict)  # role -> data file (fingerprinted)
    # progress(iterable=None, total=None, desc=str, unit=str) -> tqdm-like (optforge.progress.stage_progress)
    progress: Optional[Callable[..., Any]] = None
    log: Callable[[str], None] = print

    def bar(self, iterable=None, total=None, desc: str = "", unit: str = "step"):
        """Progress of a long loop: a tqdm bar on a terminal, a line every interval in a log (CI, nohup,
        a pipe; optforge.progress), nothing when the engine was asked for no progress. `unit` names what
        `update(n)` counts ("step", "example")."""
        if self.progress is None:
            return iterable if iterable is not None else _NullBar()
        return self.progress(iterable=iterable, total=total, desc=desc, unit=unit)


class _NullBar:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
