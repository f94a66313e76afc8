"""load_runnable / Runnable on float artifacts."""

from __future__ import annotations

import json

import pytest
import torch

from optforge.errors import OptforgeError
from optforge_testing import save_random_classifier
from optforge.artifacts import load_runnable
from optforge.artifacts.runnable import Runnable

TEXTS = ["a gripping , funny film", "dull", "the second half drags on and on and on and on and on and on"]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return save_random_classifier(tmp_path_factory.mktemp("art"), seed=3, max_length=8)


def test_predict_matches_the_model(artifact):
    out, model, tok = artifact
    r = load_runnable(out, "cpu")
    assert isinstance(r, Runnable) and r.precision == "fp32" and r.max_length == 8 and r.num_labels == 2
    preds = r.predict(TEXTS)
    enc = tok(TEXTS, truncation=True, max_length=8, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(enc["input_ids"], enc["attention_mask"]), -1)
    for p, row in zip(preds, probs):
        assert isinstance(p["probabilities"], list) and isinstance(p["label"], int)
        assert p["probabilities"] == pytest.approx(row.tolist(), abs=1e-6)
        assert p["label"] == int(row.argmax()) and p["label_name"] == ["neg", "pos"][p["label"]]
        assert sum(p["probabilities"]) == pytest.approx(1.0, abs=1e-6)


def test_pre_tokenized_and_pipelined_paths_predict_the_same(artifact):
    out, _model, _tok = artifact
    r = load_runnable(out, "cpu")
    batches = [TEXTS, TEXTS[:1], list(reversed(TEXTS))]
    expected = [r.predict(b) for b in batches]
    assert [r.predict_ids(r.tokenize(b)) for b in batches] == expected
    assert list(r.predict_pipelined(iter(batches))) == expected
    assert list(r.predict_pipelined([])) == []
    # pad_to pads every batch to that width: masked positions do not change the predictions
    for got, want in zip(r.predict(TEXTS, pad_to=8), expected[0]):
        assert got["label"] == want["label"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


def test_encode_truncates_and_pads(artifact):
    r = load_runnable(artifact[0], "cpu")
    b = r.encode(TEXTS)
    assert b["input_ids"].shape == (3, 8)  # the long text is truncated at max_length
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # [CLS] dull [SEP] + padding
    b = r.encode(TEXTS[:2], pad_to=12)
    assert b["input_ids"].shape == (2, 12) and int(b["attention_mask"].sum()) == 3 + int(
        b["attention_mask"][0].sum())
    logits = r.forward(b)
    assert logits.dtype == torch.float32 and logits.shape == (2, 2)


def test_bf16_precision_casts_the_weights(artifact):
    fp32, bf16 = load_runnable(artifact[0], "cpu"), load_runnable(artifact[0], "cpu", "bf16")
    assert bf16.precision == "bf16" and next(bf16.module.parameters()).dtype == torch.bfloat16
    b = fp32.encode(TEXTS)
    out = bf16.forward(b)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fp32.forward(b), rtol=0.05, atol=0.05)


def test_param_count_size_and_flops(artifact):
    out, model, _ = artifact
    r = load_runnable(out, "cpu")
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())  # BERT init: zero biases
    assert r.param_count() == (total, nonzero) and nonzero < total
    with torch.no_grad():
        r.module.encoder.encoder.layer[0].intermediate.dense.weight[:10].zero_()  # 10 rows x 32
    assert r.param_count() == (total, nonzero - 320)
    assert r.size_bytes == (out / "model.safetensors").stat().st_size
    # per layer: q,k,v,o 4*32*32, FFN 2*32*64 MACs per token; attention 2*L*32; head 32*2 once per sequence
    L = 10
    per_layer = 4 * 32 * 32 + 2 * 32 * 64 + 2 * L * 32
    assert r.flops_per_token(L) == pytest.approx(2 * (2 * per_layer + 32 * 2 / L))


def test_unknown_format_lists_the_known_ones(artifact, tmp_path):
    meta = json.loads((artifact[0] / "optforge_model.json").read_text())
    (tmp_path / "optforge_model.json").write_text(json.dumps(meta | {"format": "tflite"}))
    with pytest.raises(OptforgeError, match=r"unknown model format 'tflite' \(known: aoti, compiled, float, lm-compiled, lm-float, lm-quantized, onnx"):
        load_runnable(tmp_path, "cpu")
    with pytest.raises(OptforgeError, match="not an optforge model artifact"):
        load_runnable(tmp_path / "nothing", "cpu")


def test_runnable_from_a_plain_callable(artifact):
    """Other formats (compiled, AOTI) hand Runnable a callable; shapes come from `module` if given."""
    out, model, tok = artifact
    meta = json.loads((out / "optforge_model.json").read_text())
    r = Runnable(lambda ids, mask: model(ids, mask), tok, meta, "cpu")
    assert r.flops_per_token(16) is None
    assert [p["label"] for p in r.predict(TEXTS)] == [p["label"] for p in load_runnable(out, "cpu").predict(TEXTS)]
    r2 = Runnable(lambda ids, mask: model(ids, mask), tok, meta, "cpu", module=model)
    assert r2.flops_per_token(16) == load_runnable(out, "cpu").flops_per_token(16)
