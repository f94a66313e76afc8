"""Training precision (`finetune/distill/recover: precision`): unset keeps the device default and stays out
of every key; "bf16" trains under bf16 autocast on a CPU too (fp32 master weights), "fp32" nowhere."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from optforge import training
from optforge.recipe import DistillSpec, TrainSpec
from tiny_models import build_tiny


def test_unset_precision_leaves_the_dump_and_so_every_key_unchanged():
    assert "precision" not in TrainSpec().model_dump(mode="json")
    assert "precision" not in DistillSpec().model_dump(mode="json")
    assert TrainSpec(precision="bf16").model_dump(mode="json")["precision"] == "bf16"
    assert DistillSpec(precision="fp32").model_dump(mode="json")["precision"] == "fp32"
    assert TrainSpec.model_validate(TrainSpec(precision="bf16").model_dump(mode="json")).precision == "bf16"
    with pytest.raises(ValidationError, match="precision"):
        TrainSpec(precision="fp16")


def test_the_autocast_rule():
    assert training.autocast_bf16(None, cuda=False) is False  # CPU default: fp32, as every cached key
    assert training.autocast_bf16("bf16", cuda=False) is True
    assert training.autocast_bf16("fp32", cuda=True) is False


@pytest.mark.parametrize("precision, expected", [(None, "fp32"), ("bf16", "bf16")])
def test_training_on_cpu_reports_the_autocast_it_used(precision, expected):
    model, tok = build_tiny(seed=3)
    texts = ["a fine film", "dull and long", "great fun", "a mess"] * 8
    ids = tok(texts, truncation=True, max_length=16)["input_ids"]
    labels = [0, 1, 0, 1] * 8
    weights = model.head.weight.detach().clone()
    stats = training.train(model, ids, labels, TrainSpec(epochs=1, batch_size=8, lr=1e-3, precision=precision),
                           "cpu", tok.pad_token_id)
    assert stats["autocast"] == expected and stats["steps"] == 4
    assert math.isfinite(stats["train_loss"]) and not torch.equal(model.head.weight, weights)
    assert model.head.weight.dtype == torch.float32  # master weights stay fp32 under autocast
