"""One recipe, two devices: rows with `devices`, per-device `overrides`, per-device lock files, and the
training stages shared between a CPU and a CUDA build. No GPU needed: the CUDA side is planned (and
built with the fake stages) under a faked device probe."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import fake_stages
from optforge.cache import Cache
from optforge.cli import main
from optforge.errors import RecipeError
from optforge.graph import build_graph
from optforge.lockfile import lock_path, read_lock
from optforge.recipe import Recipe
from optforge.recipe_io import load_and_check, load_recipe
from optforge.run import build
from optforge.session import open_session

# the toy recipe with a CPU-only row, a CUDA-only row and overrides for both devices
RECIPE = fake_stages.TOY_RECIPE.replace(
    "  - {name: compiled, model: student, compile: default}\n",
    "  - {name: compiled, model: student, compile: default, devices: [cpu]}\n"
    "  - {name: gpu-bf16, model: student, precision: bf16, compile: reduce-overhead, devices: [cuda]}\n") + """\
serve_benchmark: {config: best, rates: [10]}
overrides:
  cpu:
    serve_benchmark: false
  cuda:
    benchmark: {batch_sizes: [1, 64]}
    gates: {min_speedup: 2.0}
    baseline: gpu-bf16
"""
TRAINING = ["data", "teacher", "student", "distill", "prune:pruned", "prune:sparse"]


def write(tmp_path, text: str = RECIPE):
    return fake_stages.write_toy(tmp_path / "recipes", text)


def line_of(text: str, snippet: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if snippet in line)


@pytest.fixture
def fake_gpu(monkeypatch):
    """`--device cuda` resolves, both device probes are fixed, and no stage asks torch for a GPU."""
    import optforge.device
    import optforge.session
    import optforge.stage_job

    monkeypatch.setattr(optforge.device, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(optforge.session, "device_fingerprint", lambda device, root: {"kind": device, "name": "test"})
    monkeypatch.setattr(optforge.stage_job, "check_device", lambda device: None)


def test_rows_are_filtered_per_device(tmp_path):
    recipe = load_recipe(write(tmp_path)).recipe
    cpu, cuda = recipe.for_device("cpu"), recipe.for_device("cuda")
    assert [c.name for c in cpu.configs] == ["baseline", "student", "pruned", "sparse", "pruned-dyn8", "compiled"]
    assert [c.name for c in cuda.configs] == ["baseline", "student", "pruned", "sparse", "pruned-dyn8", "gpu-bf16"]
    assert cpu.overrides is None and all(c.devices is None for c in cuda.configs)
    names = build_graph(cuda, tmp_path / "recipes").names()
    assert "evaluate:gpu-bf16" in names and "compile:compiled" not in names
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        recipe.for_device("tpu")


def test_overrides_merge_key_by_key(tmp_path):
    recipe = load_recipe(write(tmp_path)).recipe
    cpu, cuda = recipe.for_device("cpu"), recipe.for_device("cuda")
    assert cpu.benchmark == recipe.benchmark and cpu.gates == recipe.gates
    assert cuda.benchmark.batch_sizes == [1, 64] and cuda.benchmark.min_runs == 5  # the rest from the top level
    assert cuda.gates.min_speedup == 2.0 and cuda.gates.max_accuracy_drop == 1.0
    assert cpu.serve_benchmark is None and cuda.serve_benchmark == recipe.serve_benchmark
    assert (cpu.baseline_config, cuda.baseline_config) == ("baseline", "gpu-bf16")
    # serving turned on for one device only: merged over the defaults
    only_gpu = Recipe.model_validate(recipe.model_dump() | {
        "serve_benchmark": None, "overrides": {"cuda": {"serve_benchmark": {"max_batch": 8}}}})
    assert only_gpu.for_device("cpu").serve_benchmark is None
    assert only_gpu.for_device("cuda").serve_benchmark.max_batch == 8
    assert only_gpu.for_device("cuda").serve_benchmark.config == "best"


def test_stability_gates_merge_and_max_cv_can_be_unset_per_device(tmp_path):
    recipe = load_recipe(write(tmp_path)).recipe
    assert (recipe.gates.max_spread, recipe.gates.max_cv) == (None, None)  # both optional, off by default
    r = Recipe.model_validate(recipe.model_dump() | {
        "gates": {"max_cv": 0.1, "max_spread": 0.10},
        "overrides": {"cuda": {"gates": {"max_spread": 0.2, "max_cv": None}}}})
    cpu, cuda = r.for_device("cpu").gates, r.for_device("cuda").gates
    assert (cpu.max_spread, cpu.max_cv) == (0.10, 0.1) and (cuda.max_spread, cuda.max_cv) == (0.2, None)


def test_a_recipe_without_devices_is_the_same_everywhere(tmp_path):
    recipe = load_recipe(write(tmp_path, fake_stages.TOY_RECIPE)).recipe
    assert recipe.for_device("cpu") == recipe == recipe.for_device("cuda")
    assert build_graph(recipe.for_device("cuda"), tmp_path) == build_graph(recipe, tmp_path)


def edit(old: str, new: str) -> str:
    assert old in RECIPE
    return RECIPE.replace(old, new)


# (id, recipe text, the snippet on the line to blame, key path, expected text)
CASES = [
    ("override-value", edit("batch_sizes: [1, 64]", "batch_sizes: [1, 1]"), "batch_sizes: [1, 1]",
     "overrides.cuda.benchmark.batch_sizes", "batch sizes must be unique"),
    ("override-odd-min-rounds", edit("batch_sizes: [1, 64]", "batch_sizes: [1, 64], min_rounds: 3"),
     "min_rounds: 3", "overrides.cuda.benchmark.min_rounds", "min_rounds must be even"),
    ("override-unknown-key", edit("batch_sizes: [1, 64]", "batch_size: [1, 64]"), "batch_size: [1, 64]",
     "overrides.cuda.benchmark.batch_size", "did you mean 'batch_sizes'"),
    ("override-serve-spelling", edit("serve_benchmark: false", "serve_benchmark: nope"), "serve_benchmark: nope",
     "overrides.cpu.serve_benchmark", "or false to turn the serving benchmark off"),
    ("override-unknown-device", edit("  cpu:\n", "  gpu:\n"), "  gpu:", "overrides.gpu", "valid keys: cpu, cuda"),
    ("baseline-missing-on-a-device", edit("    baseline: gpu-bf16\n", "") + "baseline: compiled\n",
     "baseline: compiled", "baseline", "config 'compiled' does not run on cuda"),
    ("override-baseline-missing-there", edit("baseline: gpu-bf16", "baseline: compiled"), "baseline: compiled",
     "overrides.cuda.baseline", "name one that does with overrides.cuda.baseline"),
    ("serve-config-missing-on-a-device", edit("serve_benchmark: false", "gates: {}")
     .replace("{config: best,", "{config: compiled,"), "serve_benchmark: {config: compiled",
     "serve_benchmark.config", "does not run on cuda"),
    ("no-row-on-a-device", "name: toy\ndata: {dataset: toydata}\nteacher: {config: {}, tokenizer: t}\n"
     "configs:\n  - {name: a, devices: [cpu]}\n", "configs:", "configs", "no configuration runs on cuda"),
    ("devices-typo", edit("devices: [cuda]", "devices: [cdua]"), "devices: [cdua]", "configs[6].devices[0]",
     "did you mean 'cuda'"),
    ("devices-twice", edit("devices: [cuda]", "devices: [cuda, cuda]"), "devices: [cuda, cuda]",
     "configs[6].devices", "devices must be unique"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_device_errors_are_located(tmp_path, case):
    _, text, snippet, keypath, message = case
    path = write(tmp_path, text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    first = result.stderr.splitlines()[0]
    m = re.match(rf"^{re.escape(str(path))}:(\d+):\d+: error: (.*)$", first)
    assert m, first
    assert int(m.group(1)) == line_of(text, snippet), first
    assert m.group(2).startswith(keypath + ":") and message in first, first


def test_validate_and_dag_report_both_devices(tmp_path):
    path = write(tmp_path)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    # the toy's 20 stages; cpu: serving off; cuda: - the compiled row (3 stages) + gpu-bf16 (3) + serving
    assert result.stdout == f"ok: {path} (toy: 21 stages on cpu, 22 on cuda)\n"
    dag = CliRunner().invoke(main, ["dag", str(path), "--device", "cuda"])
    assert dag.exit_code == 0 and '"evaluate:gpu-bf16"' in dag.stdout and "compile:compiled" not in dag.stdout
    assert "gpu-bf16" not in CliRunner().invoke(main, ["dag", str(path)]).stdout  # default: cpu


def test_lock_file_per_device(tmp_path, monkeypatch, fake_gpu):
    path = write(tmp_path)
    assert lock_path(path) == path.with_suffix(".lock") == lock_path(path, "cpu")
    assert lock_path(path, "cuda") == tmp_path / "recipes" / "toy.cuda.lock"
    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    assert open_session(path, "cpu").lock_file == lock_path(path)
    assert open_session(path, "cuda").lock_file == lock_path(path, "cuda")
    _, graph = load_and_check(path, device="cuda")
    assert "serve_benchmark" in graph.names()


def test_cpu_and_cuda_builds_share_the_training_stages(tmp_path, monkeypatch, fake_kinds, fake_gpu):
    monkeypatch.setenv("OPTFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path)
    plans = {d: {p.name: p.key for p in open_session(path, d).plan()} for d in ("cpu", "cuda")}
    assert all(plans["cpu"][s] == plans["cuda"][s] for s in TRAINING)
    assert plans["cpu"]["evaluate:baseline"] != plans["cuda"]["evaluate:baseline"]  # measured per device

    quiet = dict(echo=lambda s: None, log=lambda s: None, progress=False, render_report=False)
    assert build(path, device="cpu", **quiet).exit_code == 0
    gpu = build(path, device="cuda", **quiet)
    assert gpu.exit_code == 0 and set(TRAINING) <= set(gpu.cached)
    assert not set(TRAINING) & set(gpu.ran)
    locks = {d: read_lock(lock_path(path, d))["stages"] for d in ("cpu", "cuda")}
    assert "evaluate:gpu-bf16" in locks["cuda"] and "evaluate:gpu-bf16" not in locks["cpu"]
    assert all(locks["cpu"][s]["key"] == locks["cuda"][s]["key"] for s in TRAINING)
    assert Cache().registered() == sorted(str(lock_path(path, d)) for d in ("cpu", "cuda"))

    runner = CliRunner()
    n = len(list(Cache().keys()))
    assert runner.invoke(main, ["gc"]).stdout.splitlines()[-1] == f"gc: 0 removed, {n} kept"  # both locks keep
    cleaned = runner.invoke(main, ["clean", str(path)])
    assert cleaned.exit_code == 0, cleaned.output
    assert cleaned.stdout.startswith(f"clean: forgot {lock_path(path)}, {lock_path(path, 'cuda')};")
    assert not lock_path(path).exists() and not lock_path(path, "cuda").exists() and Cache().registered() == []
    assert runner.invoke(main, ["clean", str(path)]).stdout.startswith("clean: nothing recorded")


def test_a_bad_override_names_its_key_path_from_python_too():
    data = {"name": "x", "data": {"dataset": "d"}, "teacher": {"config": {}, "tokenizer": "t"},
            "configs": [{"name": "a"}], "overrides": {"cuda": {"gates": {"max_cv": -1}}}}
    with pytest.raises(RecipeError) as info:
        Recipe.model_validate(data)
    assert info.value.path == ("overrides", "cuda", "gates", "max_cv")
    data["overrides"]["cuda"]["gates"] = {"max_spread": 0}
    with pytest.raises(RecipeError) as info:
        Recipe.model_validate(data)
    assert info.value.path == ("overrides", "cuda", "gates", "max_spread")
