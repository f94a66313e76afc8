"""onnxruntime: a float model exported to ONNX, optimized offline by ONNX Runtime, optionally dynamic-int8
quantized, and loaded through `load_runnable` like any artifact. Tiny random-init models (hidden 64): the
fp32 artifact must match PyTorch within the compile stage's tolerance, the int8 one must agree on the
argmax; the session runs at torch's thread count with spinning off; evaluate, benchmark and the serving
paths take an onnx row like any other. No timing thresholds (the machine is shared)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from optforge import modeling
from optforge.artifacts import compute_precision, load_runnable
from optforge.artifacts.compiled import example_inputs
from optforge.artifacts.runnable import count_params, flops_per_token
from optforge.errors import StageFailure
from optforge.methods.compile import allowed_difference
from tiny_models import sample_batch, save_tiny

SHAPES = [(1, 3), (1, 64), (32, 3), (32, 64), (5, 17)]
TEXTS = ["a gripping , funny film", "dull", "the second half drags on and on", "superb acting", "it is what it is"]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ort-src") / "model", seed=11, max_length=64)


@pytest.fixture(scope="module")
def built(float_model, run_stage, tmp_path_factory):
    """{"fp32" | "int8": (artifact dir, stage metrics)}: both built once for the module."""
    root = tmp_path_factory.mktemp("ort")
    out = {}
    for name, quantization in (("fp32", None), ("int8", "int8-dynamic")):
        metrics = run_stage("onnxruntime", {"precision": "fp32", "quantization": quantization}, root / name,
                            {"model": float_model})
        out[name] = (root / name, metrics)
    return out


def _eager(src: Path):
    model, tokenizer, _ = modeling.load_classifier(src)
    return model.eval(), tokenizer


def test_fp32_artifact_matches_pytorch_at_every_shape(built, float_model):
    out, metrics = built["fp32"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.json", "model.onnx",
                                                     "optforge_model.json", "tokenizer"]
    meta = json.loads((out / modeling.META).read_text())
    assert meta["format"] == "onnx" and meta["precision"] == "fp32" and meta["quantization"] is None
    assert meta["opset"] == metrics["opset"] == 17 and meta["max_length"] == 64 and meta["num_labels"] == 2
    assert "method" not in meta and "compute_precision" not in meta
    onnx.checker.check_model(str(out / "model.onnx"))
    assert {i.name for i in onnx.load(str(out / "model.onnx")).graph.input} == {"input_ids", "attention_mask"}

    eager, tokenizer = _eager(float_model)
    runnable = load_runnable(out, "cpu")
    assert runnable.module is None and runnable.description == "onnxruntime fp32"
    for b, s in SHAPES:
        ids, mask = example_inputs(tokenizer, "cpu", b, s)
        got = runnable.forward({"input_ids": ids, "attention_mask": mask})
        with torch.inference_mode():
            ref = eager(ids, mask)
        assert got.dtype == torch.float32 and got.shape == (b, 2)
        assert (got - ref).abs().max().item() <= allowed_difference("float", "fp32", ref.abs().max().item(), None)
    assert metrics["logit_max_abs_diff"] <= metrics["logit_diff_allowed"]
    assert metrics["export_s"] > 0 and metrics["optimize_s"] > 0 and metrics["quantize_s"] is None
    assert metrics["nodes_exported"] > 0 and metrics["nodes"] > 0
    assert metrics["file_mb"] == pytest.approx((out / "model.onnx").stat().st_size / 2**20)


def test_counts_come_from_the_artifact_not_a_module(built, float_model):
    eager, _ = _eager(float_model)
    for name in ("fp32", "int8"):
        runnable = load_runnable(built[name][0], "cpu")
        assert runnable.param_count() == count_params(eager)
        assert runnable.flops_per_token(32) == flops_per_token(eager, 32)
        assert runnable.size_bytes == (built[name][0] / "model.onnx").stat().st_size


def test_int8_artifact_agrees_with_pytorch_and_is_smaller(built, float_model):
    out, metrics = built["int8"]
    meta = json.loads((out / modeling.META).read_text())
    assert meta["quantization"] == "int8-dynamic" and meta["compute_precision"] == "int8"
    assert compute_precision(meta, "fp32") == "int8"
    ops = metrics["op_counts"]
    assert ops.get("com.microsoft:DynamicQuantizeMatMul", 0) + ops.get("com.microsoft:MatMulIntegerToFloat", 0) > 0
    assert metrics["quantize_s"] > 0 and metrics["agreement"] >= 0.9
    assert (out / "model.onnx").stat().st_size < 0.5 * (built["fp32"][0] / "model.onnx").stat().st_size
    # the classification head stays float, as with the PyTorch methods
    head = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node if n.name.startswith("/head/")}
    assert head == {"Gemm"}

    eager, tokenizer = _eager(float_model)
    runnable = load_runnable(out, "cpu")
    assert runnable.description == "onnxruntime int8-dynamic"
    ids, mask = sample_batch(tokenizer, TEXTS * 4)
    got = runnable.forward({"input_ids": ids, "attention_mask": mask})
    with torch.inference_mode():
        ref = eager(ids, mask)
    assert torch.isfinite(got).all()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


def test_session_runs_at_torch_threads_without_spinning(built):
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runnable = load_runnable(built["fp32"][0], "cpu")
            options = runnable.fn.session.get_session_options()
            assert options.intra_op_num_threads == threads and options.inter_op_num_threads == 1
            assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
            assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
            # optimized offline when built: the load does not optimize again
            assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            assert runnable.fn.session.get_providers() == ["CPUExecutionProvider"]
    finally:
        torch.set_num_threads(old)


def test_predict_paths_agree(built):
    runnable = load_runnable(built["fp32"][0], "cpu")
    expected = runnable.predict(TEXTS)
    assert runnable.predict_ids(runnable.tokenize(TEXTS)) == expected
    assert list(runnable.predict_pipelined([TEXTS, TEXTS[:2]])) == [expected, runnable.predict(TEXTS[:2])]
    for got, want in zip(runnable.predict(TEXTS, pad_to=40), expected):  # padding is masked
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
    with torch.inference_mode():  # inference tensors (evaluate's batches) go through as well
        batch = runnable.encode(TEXTS)
        assert runnable.forward(batch).shape == (len(TEXTS), 2)


def test_structurally_pruned_model_exports_and_matches(run_stage, toy_data, tmp_path):
    """Pruned layers have fewer heads than config.json says: the export must follow the real widths."""
    data_dir, data_metrics = toy_data
    src = save_tiny(tmp_path / "model", seed=12, max_length=64)
    run_stage("prune", {"method": "structured", "heads": 0.5, "ffn": 0.5}, tmp_path / "pruned",
              {"model": src, "data": data_dir}, {"data": data_metrics})
    metrics = run_stage("onnxruntime", {"precision": "fp32"}, tmp_path / "ort", {"model": tmp_path / "pruned",
                                                                                   "data": data_dir})
    assert metrics["logit_max_abs_diff"] <= metrics["logit_diff_allowed"]
    assert metrics["calibration_n"] == 32  # eval sentences of the data input
    eager, tokenizer = _eager(tmp_path / "pruned")
    runnable = load_runnable(tmp_path / "ort", "cpu")
    ids, mask = example_inputs(tokenizer, "cpu", 7, 29)
    with torch.inference_mode():
        ref = eager(ids, mask)
    got = runnable.forward({"input_ids": ids, "attention_mask": mask})
    assert (got - ref).abs().max().item() <= allowed_difference("float", "fp32", ref.abs().max().item(), None)
    assert runnable.param_count() == count_params(eager)


def test_cuda_and_non_float_inputs_fail_with_a_reason(run_stage, float_model, built, tmp_path):
    with pytest.raises(StageFailure, match="runtime: onnxruntime runs on CPU only"):
        run_stage("onnxruntime", {"precision": "fp32"}, tmp_path / "cuda", {"model": float_model}, device="cuda")
    with pytest.raises(StageFailure, match="runtime: onnxruntime runs on CPU only"):
        load_runnable(built["fp32"][0], "cuda")
    with pytest.raises(StageFailure, match="needs a float model, got format 'onnx'"):
        run_stage("onnxruntime", {"precision": "fp32"}, tmp_path / "twice", {"model": built["fp32"][0]})


def test_a_session_error_is_a_runtime_error(built):
    """ONNX Runtime's own exceptions derive from Exception alone; the Runnable turns them into RuntimeError,
    which the stages' kernel-failure rule (errors.KERNEL_ERRORS) already handles."""
    runnable = load_runnable(built["fp32"][0], "cpu")
    too_long = torch.ones(1, 1000, dtype=torch.long)  # past the 128 positions of the tiny model
    with pytest.raises(RuntimeError, match="onnxruntime"):
        runnable.fn(too_long, too_long)


# --------------------------------------------------------------------------- the consumers


def test_evaluate_and_benchmark_take_an_onnx_row(built, run_stage, toy_data, tmp_path):
    data_dir, _ = toy_data
    for name in ("fp32", "int8"):
        out = built[name][0]
        ev = run_stage("evaluate", {"precision": "fp32"}, tmp_path / f"ev-{name}", {"model": out, "data": data_dir})
        assert ev["n"] == 64 and 0 <= ev["accuracy"] <= 1
        bm = run_stage("benchmark", {"batch_sizes": [1, 4], "warmup": 1, "min_runs": 3, "max_seconds": 0.2,
                                     "threads": 1}, tmp_path / f"bm-{name}", {"model": out, "data": data_dir})
        assert bm["threads"] == 1 and bm["params"] > 0 and bm["flops_per_sample"] > 0
        assert bm["compute_precision"] == ("int8" if name == "int8" else "fp32")
        assert bm["description"].startswith("onnxruntime")
        for b in ("1", "4"):
            block = bm["batches"][b]
            for scope in ("model", "e2e", "pretokenized"):
                assert block[scope]["p50"] > 0, (b, scope)
            assert block["e2e_pipelined"]["throughput"] > 0


def test_serving_an_onnx_row(built, run_stage, toy_data, tmp_path):
    """The serve_benchmark stage's child server (`python -m optforge.serve.server`) loads the onnx
    artifact and answers as the Runnable does; the stage records both modes."""
    from optforge.recipe import GatesSpec
    from optforge.serve.model import batch_function

    data_dir, _ = toy_data
    out = built["int8"][0]
    runnable = load_runnable(out, "cpu")
    predictions, timings = batch_function(runnable)(TEXTS)
    assert predictions == runnable.predict(TEXTS) and set(timings) == {"tokenize", "forward", "postprocess"}

    stats = {"p50": 5.0, "p90": 5.0, "p99": 5.0, "mean": 5.0, "std": 0, "cv": 0.01, "throughput": 200.0,
             "runs": 10, "pct_peak": None}
    metrics = {"evaluate:ort": {"accuracy": 0.9, "macro_f1": 0.9, "n": 64},
               "benchmark:ort": {"precision": "fp32", "batches": {"1": {"model": stats, "e2e": stats}}}}
    params = {"config": "ort", "slo_p99_ms": 5000.0, "rates": [20.0], "max_batch": 4, "max_wait_ms": 2.0,
              "duration_s": 0.5, "max_requests": 10, "seed": 0, "baseline": "ort",
              "gates": GatesSpec().model_dump()}
    serving = run_stage("serve_benchmark", params, tmp_path / "serve",
                        {"data": data_dir, "model:ort": out, "evaluate:ort": tmp_path, "benchmark:ort": tmp_path},
                        metrics)["serving"]
    assert serving["config"] == "ort" and serving["server"]["model"] == "onnxruntime int8-dynamic"
    assert [r["mode"] for r in serving["runs"]] == ["batching_off", "batching_on"]
    assert all(r["ok"] == r["sent"] > 0 for r in serving["runs"])


def test_kind_is_a_row_step_between_quantize_and_compile():
    from optforge.stages.registry import get_kind

    kind = get_kind("onnxruntime")
    assert get_kind("quantize").row.order < kind.row.order < get_kind("compile").row.order
    assert kind.row.measure is False and kind.row.needs_data is True and kind.hardware_bound
    assert set(kind.libraries) == {"onnxruntime", "onnx"}


def test_logits_match_the_raw_numpy_path(built, float_model):
    """What the export writer copies (model.onnx) runs with onnxruntime and numpy alone."""
    _, tokenizer = _eager(float_model)
    ids, mask = sample_batch(tokenizer, TEXTS)
    session = ort.InferenceSession(str(built["fp32"][0] / "model.onnx"), providers=["CPUExecutionProvider"])
    raw = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    via_runnable = load_runnable(built["fp32"][0], "cpu").forward({"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(raw, via_runnable.numpy(), rtol=0, atol=1e-6)
