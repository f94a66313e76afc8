"""Two training options of TrainSpec (finetune/distill/recover): `layer_lr_decay` (layer-wise learning-rate
decay: the head at `lr`, layer i of L at lr * d^(L - i), embeddings at lr * d^(L + 1)) and `average_last`
(the model saved is the mean of the weights after evenly spaced steps of the last fraction of training).
Unset, neither is in the dump, so every existing key is unchanged."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from optforge import training
from optforge.recipe import DistillSpec, TrainSpec
from tiny_models import build_tiny

TEXTS = ["a fine film", "dull and long", "great fun", "a mess"] * 4
LABELS = [0, 1, 0, 1] * 4


def test_unset_leaves_the_dump_unchanged_and_bad_values_are_refused():
    for spec in (TrainSpec(), DistillSpec()):
        dumped = spec.model_dump(mode="json")
        assert "layer_lr_decay" not in dumped and "average_last" not in dumped
    set_ = TrainSpec(layer_lr_decay=0.8, average_last=0.25).model_dump(mode="json")
    assert (set_["layer_lr_decay"], set_["average_last"]) == (0.8, 0.25)
    for bad in ({"layer_lr_decay": 0}, {"layer_lr_decay": 1.5}, {"average_last": 0}, {"average_last": 2}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            TrainSpec(**bad)


def test_layer_lr_decay_gives_each_layer_its_learning_rate():
    model, _ = build_tiny(seed=1)
    layers = list(model.encoder.encoder.layer)
    n = len(layers)
    spec = TrainSpec(lr=1e-3, layer_lr_decay=0.5, freeze_embeddings=False)
    [optimizer] = training.make_optimizers(model, spec)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for i, layer in enumerate(layers):
        assert {lr_of[id(p)] for p in layer.parameters()} == {1e-3 * 0.5 ** (n - i)}
    assert {lr_of[id(p)] for p in model.encoder.embeddings.parameters()} == {1e-3 * 0.5 ** (n + 1)}
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    assert head and {lr_of[id(p)] for p in head} == {1e-3}
    # weight decay still skips biases and LayerNorm weights, whatever the layer
    assert all(g["weight_decay"] == (0.01 if g["params"][0].ndim >= 2 else 0.0) for g in optimizer.param_groups)
    # unset: the optimizer of before, one lr
    [plain] = training.make_optimizers(model, TrainSpec(lr=1e-3, freeze_embeddings=False))
    assert {g["lr"] for g in plain.param_groups} == {1e-3}


def test_tail_average_is_the_mean_of_the_snapshot_steps():
    lin = torch.nn.Linear(2, 1, bias=False)
    avg = training.TailAverage(lin, 0.5, total=8)  # the last 4 steps: 5, 6, 7, 8
    seen = []
    for step in range(1, 9):
        with torch.no_grad():
            lin.weight.fill_(float(step))
        avg.after_step(step)
        seen.append(step)
    assert avg.apply() == 4
    assert torch.allclose(lin.weight, torch.full((1, 2), (5 + 6 + 7 + 8) / 4))


def test_tail_average_takes_at_most_twenty_evenly_spaced_steps_ending_with_the_last():
    lin = torch.nn.Linear(1, 1, bias=False)
    avg = training.TailAverage(lin, 1.0, total=100)  # every 5th step counted back from 100: 5, 10, ..., 100
    for step in range(1, 101):
        with torch.no_grad():
            lin.weight.fill_(float(step))
        avg.after_step(step)
    assert avg.apply() == 20
    assert lin.weight.item() == pytest.approx(sum(range(5, 101, 5)) / 20)


def test_training_with_average_last_saves_the_averaged_weights():
    def run(average_last):
        model, tok = build_tiny(seed=3)
        ids = tok(TEXTS, truncation=True, max_length=16)["input_ids"]
        spec = TrainSpec(epochs=4, batch_size=4, lr=1e-2, precision="fp32", average_last=average_last)
        stats = training.train(model, ids, LABELS, spec, "cpu", tok.pad_token_id)
        return model, stats

    plain, plain_stats = run(None)
    averaged, stats = run(0.5)  # 16 steps: the last 8 averaged
    assert "averaged_steps" not in plain_stats and stats["averaged_steps"] == 8
    assert stats["final_loss"] == plain_stats["final_loss"]  # the same run; only the saved weights differ
    different = [n for (n, p), q in zip(plain.named_parameters(), averaged.parameters()) if not torch.equal(p, q)]
    assert different and all("word_embeddings" not in n for n in different)  # frozen weights are not averaged
