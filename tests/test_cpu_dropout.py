"""optforge.cpu_dropout: CPU dropout masks from one 64-bit draw per four elements, taken over by a
TorchFunctionMode around the training forward (nn.Dropout / F.dropout and the attention dropout of
F.scaled_dot_product_attention)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from optforge import cpu_dropout, training
from optforge.recipe import TrainSpec

sys.path.insert(0, str(Path(__file__).parent / "stages"))
from tiny_models import build_tiny  # noqa: E402


def test_p_is_rounded_to_a_multiple_of_1_65536_and_the_expectation_is_exact():
    drop, q = cpu_dropout.quantized_p(0.1)
    assert (drop, q) == (6554, 6554 / 65536)
    torch.manual_seed(0)
    x = torch.randn(2000, 1000, requires_grad=True)
    y = cpu_dropout.dropout(x, 0.1)
    kept = y != 0
    n = x.numel()
    # the kept fraction within 5 standard deviations of 1 - q
    assert abs(kept.float().mean().item() - (1 - q)) < 5 * math.sqrt(q * (1 - q) / n)
    assert torch.allclose(y[kept], x[kept] * (1 / (1 - q)))  # every kept element scaled by exactly 1 / (1 - q)
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() * (1 / (1 - q)))  # the gradient goes through the same mask


def test_p_zero_and_p_one():
    x = torch.randn(10, 10)
    assert cpu_dropout.dropout(x, 0.0) is x
    assert torch.equal(cpu_dropout.dropout(x, 1.0), torch.zeros_like(x))


def test_masks_come_from_torchs_seeded_cpu_generator():
    torch.manual_seed(5)
    a = cpu_dropout.keep_mask((64, 384), 0.1)
    torch.manual_seed(5)
    b = cpu_dropout.keep_mask((64, 384), 0.1)
    c = cpu_dropout.keep_mask((64, 384), 0.1)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_the_mode_takes_over_attention_dropout_with_its_mask_and_nothing_else():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    pad = torch.zeros(2, 1, 1, 7)
    pad[0, ..., 5:] = float("-inf")  # the first row's last two keys are padding
    torch.manual_seed(1)
    with cpu_dropout.CPUDropout():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad, dropout_p=0.2)
    torch.manual_seed(1)
    mask = cpu_dropout.keep_mask((2, 4, 5, 7), 0.2)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + pad, -1)
    expected = (probs * mask / (1 - cpu_dropout.quantized_p(0.2)[1])) @ v
    assert torch.allclose(out, expected, atol=1e-5)
    # no dropout (eval): the call passes through untouched, bit for bit
    with cpu_dropout.CPUDropout():
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    assert torch.equal(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=pad))


def test_an_eval_mode_model_computes_the_same_inside_the_mode():
    model, tok = build_tiny(seed=2)
    ids = tok(["a fine film", "dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        outside = model(ids["input_ids"], ids["attention_mask"])
        with cpu_dropout.CPUDropout():
            inside = model(ids["input_ids"], ids["attention_mask"])
    assert torch.equal(inside, outside)


TEXTS = ["a fine film", "dull and long", "great fun", "a mess"] * 4
LABELS = [0, 1, 0, 1] * 4


def _train(native: bool, monkeypatch=None, calls=None):
    model, tok = build_tiny(seed=3)
    if calls is not None:
        real = cpu_dropout.keep_mask
        monkeypatch.setattr(cpu_dropout, "keep_mask", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    ids = tok(TEXTS, truncation=True, max_length=16)["input_ids"]
    spec = TrainSpec(epochs=2, batch_size=4, lr=1e-2, precision="fp32", freeze_embeddings=False)
    stats = training.train(model, ids, LABELS, spec, "cpu", tok.pad_token_id, native_dropout=native)
    return model, stats


def test_cpu_training_draws_every_dropout_mask_here_and_is_reproducible(monkeypatch):
    calls: list = []
    model, stats = _train(False, monkeypatch, calls)
    # per step, a tiny BERT of 2 layers has 8 dropout sites: the embeddings, per layer the attention
    # probabilities, the attention output and the FFN output, and the head
    assert stats["steps"] == 8 and len(calls) == 8 * 8
    heads = build_tiny(seed=3)[0].encoder.config.num_attention_heads
    assert sum(1 for shape in calls if len(shape) == 4 and shape[1] == heads) == 8 * 2
    again, _ = _train(False)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


def test_native_dropout_is_still_there_for_comparison(monkeypatch):
    calls: list = []
    _train(True, monkeypatch, calls)
    assert calls == []
