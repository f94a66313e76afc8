"""prune: exact unstructured sparsity with no pruning residue, real structured shrinking (parameter
count from shapes), importance that removes what does not matter, and save -> load round trips."""

from __future__ import annotations

import json

import pytest
import torch

from optforge import modeling, prune_counts
from optforge.stages import prune
from tiny_models import TINY, build_tiny, sample_batch, save_tiny

TEXTS = ["the movie was good", "a really dull and boring plot that never ends", "great", "it was quite awful"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


def _linear_names(model):
    return [n for n, m in model.encoder.named_modules() if isinstance(m, torch.nn.Linear)]


def test_unstructured_sparsity_is_exact_and_permanent(run_stage, tmp_path, tiny_model, toy_data):
    data_dir, data_metrics = toy_data
    amount = 0.37
    metrics = run_stage("prune", {"method": "unstructured", "amount": amount}, tmp_path,
                        {"model": tiny_model, "data": data_dir}, {"data": data_metrics})
    model, _, _ = modeling.load_classifier(tmp_path)
    original, _, _ = modeling.load_classifier(tiny_model)
    state = model.state_dict()
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in state)
    for name in _linear_names(model):
        w = state[f"encoder.{name}.weight"]
        assert abs(int((w == 0).sum()) - round(amount * w.numel())) <= 1, name
    # the head and the non-Linear parameters are untouched
    assert torch.equal(state["head.weight"], original.state_dict()["head.weight"])
    assert torch.equal(state["encoder.embeddings.word_embeddings.weight"],
                       original.state_dict()["encoder.embeddings.word_embeddings.weight"])
    assert metrics["params_after"] == metrics["params_before"]
    assert metrics["sparsity"] == pytest.approx(amount, abs=1e-3)
    assert metrics["nonzero_before"] - metrics["nonzero_after"] == pytest.approx(metrics["zeros"], abs=8)


def test_unstructured_pruning_removes_masks_and_hooks():
    model, _ = build_tiny()
    linears = prune.encoder_linears(model)
    prune.mask_linears(linears, 0.5)
    assert all(hasattr(m, "weight_orig") for m in linears)
    prune.make_permanent(linears)
    for m in linears:
        assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_mask")
        assert not m._forward_pre_hooks
        assert isinstance(m.weight, torch.nn.Parameter)


def test_recovery_keeps_pruned_weights_at_zero(run_stage, tmp_path, tmp_path_factory, tiny_model, toy_data):
    data_dir, data_metrics = toy_data
    logits = tmp_path_factory.mktemp("logits")
    amount = 0.5
    run_stage("teacher_logits", {"precision": "fp32"}, logits, {"teacher": tiny_model, "data": data_dir},
              {"data": data_metrics})
    metrics = run_stage("prune", {"method": "unstructured", "amount": amount,
                                  "recover": {"epochs": 0.25, "batch_size": 16, "lr": 1e-3}}, tmp_path,
                        {"model": tiny_model, "data": data_dir, "logits": logits},
                        {"data": data_metrics})
    assert metrics["recovery"]["steps"] > 0 and "accuracy_after_recovery" in metrics
    model, _, _ = modeling.load_classifier(tmp_path)
    original, _, _ = modeling.load_classifier(tiny_model)
    for name in _linear_names(model):
        w = model.state_dict()[f"encoder.{name}.weight"]
        assert abs(int((w == 0).sum()) - round(amount * w.numel())) <= 1, name
    # training did move the surviving weights
    key = f"encoder.{_linear_names(model)[0]}.weight"
    assert not torch.equal(model.state_dict()[key], original.state_dict()[key])


def _expected_structured_params(hidden, heads, head_size, inter, removed_heads, kept_inter, layers):
    removed_width = removed_heads * head_size
    per_layer = 3 * removed_width * (hidden + 1) + removed_width * hidden  # Q/K/V rows (+bias), O columns
    per_layer += (inter - kept_inter) * (hidden + 1) + (inter - kept_inter) * hidden  # FFN in rows, out cols
    return per_layer * layers


@pytest.mark.parametrize("heads,ffn", [(0.5, 0.5), (0.25, 0.3), (0.0, 0.5), (0.5, 0.0)])
def test_structured_removes_expected_parameters(run_stage, tmp_path, tiny_model, toy_data, heads, ffn):
    data_dir, data_metrics = toy_data
    metrics = run_stage("prune", {"method": "structured", "heads": heads, "ffn": ffn}, tmp_path,
                        {"model": tiny_model, "data": data_dir}, {"data": data_metrics})
    H, nh, inter, L = TINY["hidden_size"], TINY["num_heads"], TINY["intermediate_size"], TINY["num_layers"]
    removed_heads = prune_counts.heads_to_remove(nh, heads)
    kept_inter = prune_counts.channels_to_keep(inter, ffn) if ffn else inter
    expected = _expected_structured_params(H, nh, H // nh, inter, removed_heads, kept_inter, L)
    assert metrics["params_before"] - metrics["params_after"] == expected
    if heads or ffn:
        assert metrics["flops_per_token_after"] < metrics["flops_per_token_before"]

    model, tokenizer, _ = modeling.load_classifier(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == metrics["params_after"]
    head_meta = json.loads((tmp_path / modeling.HEAD).read_text())
    assert head_meta["pruned_layers"] == [
        {"heads": nh - removed_heads, "head_size": H // nh, "intermediate": kept_inter,
         "kept_heads": p["kept_heads"]} for p in head_meta["pruned_layers"]]
    for layer, entry in zip(modeling.encoder_layers(model.encoder), head_meta["pruned_layers"]):
        assert layer.attention.self.query.out_features == entry["heads"] * entry["head_size"]
        assert layer.intermediate.dense.out_features == entry["intermediate"]
    input_ids, mask = sample_batch(tokenizer, TEXTS)
    with torch.inference_mode():
        assert torch.isfinite(model(input_ids, mask)).all()
        assert torch.isfinite(model(input_ids[:1, :3], mask[:1, :3])).all()


def test_structured_save_load_round_trip_is_exact(tmp_path):
    model, tokenizer = build_tiny(seed=1)
    layers = modeling.encoder_layers(model.encoder)
    plan = [{"kept_heads": [0, 3], "kept_channels": list(range(0, 128, 2)), "heads_before": 4,
             "intermediate_before": 128, "head_size": 16},
            {"kept_heads": [1, 2, 3], "kept_channels": list(range(96)), "heads_before": 4,
             "intermediate_before": 128, "head_size": 16}]
    assert len(layers) == len(plan)
    prune.shrink(model, plan)
    modeling.save_classifier(model, tokenizer, {"max_length": 32}, tmp_path)
    loaded, _, _ = modeling.load_classifier(tmp_path)
    input_ids, mask = sample_batch(tokenizer, TEXTS)
    with torch.inference_mode():
        assert torch.equal(model(input_ids, mask), loaded(input_ids, mask))
    assert loaded.encoder.encoder.layer[0].attention.self.num_attention_heads == 2
    assert loaded.encoder.encoder.layer[1].output.dense.in_features == 96


def test_shrink_keeps_the_function_of_the_kept_heads():
    """A head whose value projection is zero contributes nothing: removing it changes no logit."""
    model, tokenizer = build_tiny(seed=2)
    attn = model.encoder.encoder.layer[0].attention.self
    with torch.no_grad():
        attn.value.weight[16:32] = 0  # head 1 of layer 0 outputs exactly zero
        attn.value.bias[16:32] = 0
    input_ids, mask = sample_batch(tokenizer, TEXTS)
    with torch.inference_mode():
        before = model(input_ids, mask)
    plan = [{"kept_heads": [0, 2, 3], "kept_channels": list(range(128)), "heads_before": 4,
             "intermediate_before": 128, "head_size": 16},
            {"kept_heads": [0, 1, 2, 3], "kept_channels": list(range(128)), "heads_before": 4,
             "intermediate_before": 128, "head_size": 16}]
    prune.shrink(model, plan)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids, mask), before, rtol=1e-5, atol=1e-5)


def test_importance_ranks_dead_heads_and_channels_last(toy_data):
    from optforge.stages.data import Splits

    data_dir, data_metrics = toy_data
    model, tokenizer = build_tiny(seed=3)
    layer = model.encoder.encoder.layer[1]
    with torch.no_grad():
        layer.attention.self.value.weight[32:48] = 0  # head 2 of layer 1: zero output
        layer.attention.self.value.bias[32:48] = 0
        layer.output.dense.weight[:, 5] = 0  # channel 5 of layer 1 writes nothing
    calib = prune.calibration_set(tokenizer, Splits(data_dir, data_metrics), 64, seed=0)
    head_imp, ffn_imp = prune.importance_scores(model, calib, tokenizer.pad_token_id, "cpu")
    assert head_imp[1][2] == 0 and (head_imp[1][[0, 1, 3]] > 0).all()
    assert ffn_imp[1][5] == 0 and (ffn_imp[1] > 0).sum() == 127
    plan = prune.structured_plan(model, head_imp, ffn_imp, heads=0.25, ffn=0.1)
    assert 2 not in plan[1]["kept_heads"] and len(plan[1]["kept_heads"]) == 3
    assert 5 not in plan[1]["kept_channels"]
    assert all(p.grad is None for p in model.parameters())  # scoring leaves no gradients behind
