"""compile: the artifact is real and reusable. An AOTI package loads and runs without any compilation
(Dynamo/Inductor counters unchanged) and matches eager at batch 1 and 32, short and long sequences; the
torch.compile fallback (PyTorch dynamic int8 cannot be exported) reloads in a fresh process with an empty
Inductor cache and gets every graph from the saved artifacts (no cache miss). The AOTI check uses the
student the session's tiny build compiled; the fallback test compiles once (~35 s on 2 CPU cores)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from optforge import modeling
from optforge.artifacts import load_runnable
from optforge.artifacts.runnable import flops_per_token
from optforge.artifacts.compiled import example_inputs
from tiny_models import save_tiny

SHAPES = [(1, 3), (1, 64), (32, 3), (32, 64), (5, 17)]


def _counters() -> dict:
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in copy.deepcopy(counters).items()}


def test_aoti_artifact_matches_eager_and_loads_without_compiling(built_tiny):
    # The session's tiny build already compiled its student (AOTI, the default mode): its artifact is
    # checked here rather than compiling another one (~30 s on 2 cores). That reduce-overhead compiles as
    # default on a CPU, and says so, is tests/test_methods.py's.
    from optforge.cache import Cache
    from optforge.lockfile import read_lock

    stages = read_lock(built_tiny.recipe.with_suffix(".lock"))["stages"]
    cache = Cache(built_tiny.cache)
    out, src = (cache.entry_dir(stages[s]["key"]) for s in ("compile:student-compiled", "distill"))
    metrics = cache.manifest(stages["compile:student-compiled"]["key"])["metrics"]
    assert metrics["path"] == "aoti" and metrics["compiled_mode"] == "default"
    assert (out / "model.pt2").is_file() and not (out / "eager").exists()
    assert json.loads((out / modeling.META).read_text())["format"] == "aoti"

    eager, tokenizer, _ = modeling.load_classifier(src)
    before = _counters()
    for _ in range(2):  # a second load reuses the package just the same
        runnable = load_runnable(out, "cpu")
        for b, s in SHAPES:
            input_ids, mask = example_inputs(tokenizer, "cpu", b, s)
            got = runnable.forward({"input_ids": input_ids, "attention_mask": mask})
            with torch.inference_mode():
                ref = eager(input_ids, mask)
            assert got.shape == (b, 2)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert _counters() == before  # nothing was traced, nothing was compiled, nothing was looked up

    total = sum(p.numel() for p in eager.parameters())
    assert runnable.param_count()[0] == total
    assert runnable.flops_per_token(32) == flops_per_token(eager, 32)
    one = runnable.predict(["a great film"])[0]  # the end-to-end path agrees with the forward it wraps
    assert one["label"] == int(runnable.forward(runnable.encode(["a great film"])).argmax(-1))


FRESH_PROCESS_CHECK = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from optforge.artifacts import load_runnable
from optforge.artifacts.compiled import example_inputs
from optforge.artifacts.quantized import load_module as load_quantized_module

runnable = load_runnable(sys.argv[1], "cpu")  # hot-loads the artifacts and replays the warm-up shapes
graphs_after_load = counters["stats"]["unique_graphs"]
eager, tokenizer, _ = load_quantized_module(sys.argv[2], "cpu")
diff = 0.0
for b, s in json.loads(sys.argv[3]):
    x = example_inputs(tokenizer, "cpu", b, s)
    with torch.inference_mode():
        ref = eager(*x).float()
    diff = max(diff, (runnable.forward({"input_ids": x[0], "attention_mask": x[1]}) - ref).abs().max().item())
    with torch.inference_mode():  # evaluate builds its batches as inference tensors: same graphs
        x = example_inputs(tokenizer, "cpu", b, s)
        runnable.forward({"input_ids": x[0], "attention_mask": x[1]})
print(json.dumps({"inductor": dict(counters["inductor"]), "diff": diff, "scale": ref.abs().max().item(),
                  "graphs_after_load": graphs_after_load, "graphs": counters["stats"]["unique_graphs"]}))
"""


def test_fallback_reuses_inductor_cache_artifacts_in_a_fresh_process(run_stage, tmp_path):
    src = save_tiny(tmp_path / "model", seed=7, max_length=64)
    run_stage("quantize", {"method": "torch-int8-dynamic"}, tmp_path / "q", {"model": src})
    out = tmp_path / "compiled"
    metrics = run_stage("compile", {"mode": "default", "max_length": 64, "max_batch": 32}, out,
                        {"model": tmp_path / "q"})
    assert metrics["path"] == "compiled"
    assert metrics["fallback_reason"].startswith("AOTInductor failed")
    assert (out / "inductor_cache.bin").stat().st_size > 0 and (out / "eager" / modeling.META).is_file()

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "empty-inductor-cache"))
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK, str(out), str(tmp_path / "q"),
                           json.dumps(SHAPES)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["inductor"].get("fxgraph_cache_hit", 0) > 0
    assert result["inductor"].get("fxgraph_cache_miss", 0) == 0  # no Inductor compile after loading
    assert result["graphs"] == result["graphs_after_load"] > 0  # other shapes: no new Dynamo graph either
    assert result["diff"] <= 2e-2 * result["scale"]


def test_allowed_difference_bounds():
    from optforge.methods.compile import allowed_difference

    assert allowed_difference("float", "fp32", 10.0, None) == pytest.approx(1e-2)
    assert allowed_difference("float", "bf16", 0.2, 0.5) == pytest.approx(3e-2)  # scale floored at 1
    # quantized: float tolerance + 2q (compiled and eager each within q of the float model) ...
    assert allowed_difference("torchao", "fp32", 10.0, 1.0) == pytest.approx(1e-2 + 2.0)
    # ... but never under 5% of the scale, and 5% when q is unknown
    assert allowed_difference("torchao", "bf16", 4.0, 0.01) == pytest.approx(0.2)
    assert allowed_difference("torch-int8-dynamic", "fp32", 4.0, None) == pytest.approx(0.2)
