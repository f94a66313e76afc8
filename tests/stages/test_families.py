"""Every supported family through the real stage functions: a tiny random HF checkpoint (3 layers, hidden
32, 4 heads, FFN 128, saved with save_pretrained beside MiniLM's tokenizer) as `teacher.model`, a bare
encoder (optforge's head) or a `*ForSequenceClassification` (its own head, HFSeqClassifier), then
student from layers, distill, unstructured and structured prune, quantize, evaluate, benchmark (and an AOTI
compile of a pruned DistilBERT); and the error a stage gives for a model type no adapter knows. Random models: these tests check structure, not accuracy."""

from __future__ import annotations

import json

import pytest
import torch

from optforge import arch, modeling
from optforge.artifacts import load_runnable
from optforge.errors import RecipeError
from tiny_models import MINILM, sample_batch, save_tiny_checkpoint

FAMILIES = ["bert", "distilbert", "electra", "roberta", "xlm-roberta"]
TEXTS = ["the movie was good", "a really dull and boring plot that never ends", "great", "it was quite awful"]


# 4 heads and FFN 128 (tiny_hf_config's defaults are 2 and 64): structured pruning at 0.5 keeps 2 heads
# and 64 channels (a multiple of 16) per layer
SIZE = {"distilbert": {"n_heads": 4, "hidden_dim": 128}}
SIZE_BERT_LIKE = {"num_attention_heads": 4, "intermediate_size": 128}


def checkpoint(folder, family: str, classifier: bool = False):
    """A checkpoint as a user brings it: a bare base model (BERT/RoBERTa with their pooler), or a
    `*ForSequenceClassification` (used as is, with its own head)."""
    return save_tiny_checkpoint(folder, family, classifier=classifier, **SIZE.get(family, SIZE_BERT_LIKE))


@pytest.fixture(scope="module", params=[(f, h) for f in FAMILIES for h in ("text", "stock")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def teacher(request, tmp_path_factory, toy_data, run_stage):
    """(family, head, teacher artifact dir, data dir, data metrics): a bare encoder given optforge's head
    ("text"), or a classifier checkpoint keeping its own ("stock"), briefly fine-tuned."""
    family, head = request.param
    root = tmp_path_factory.mktemp(f"{family}-{head}")
    folder = checkpoint(root / "hf", family, classifier=head == "stock")
    data_dir, data_metrics = toy_data
    out = root / "teacher"
    params = {"model": str(folder), "finetune": {"epochs": 0.25, "batch_size": 32, "lr": 1e-3}}
    metrics = run_stage("teacher", params, out, {"data": data_dir}, {"data": data_metrics})
    assert metrics["steps"] == 2 and 0 <= metrics["accuracy"] <= 1
    model, _, _ = modeling.load_classifier(out)
    assert type(model) is (modeling.HFSeqClassifier if head == "stock" else modeling.TextClassifier)
    return family, head, out, data_dir, data_metrics


def _logits(model, tokenizer):
    with torch.inference_mode():
        return model(*sample_batch(tokenizer, TEXTS))


def test_teacher_keeps_the_family_and_drops_the_unused_pooler(teacher):
    family, head, out, _, _ = teacher
    model, tokenizer, _ = modeling.load_classifier(out)
    assert arch.adapter_for(model, "a test").model_type == family
    # optforge's head never uses a pooler; BERT's stock head does (and keeps it)
    has_pooler = head == "stock" and family == "bert"
    assert (getattr(model.encoder, "pooler", None) is not None) == has_pooler
    assert any(".pooler." in k for k in model.state_dict()) == has_pooler
    head = json.loads((out / modeling.HEAD).read_text())
    assert head["layers"] == [{"attention_width": 32, "heads": 4, "intermediate": 128}] * 3


def test_student_from_layers_then_distill(teacher, run_stage, tmp_path):
    family, head, teacher_dir, data_dir, data_metrics = teacher
    m = run_stage("student", {"from_teacher": {"layers": [0, 2]}}, tmp_path / "s", {"teacher": teacher_dir})
    assert m["num_layers"] == 2 and m["params"] < m["teacher_params"]
    student, tokenizer, _ = modeling.load_classifier(tmp_path / "s")
    assert type(student) is (modeling.HFSeqClassifier if head == "stock" else modeling.TextClassifier)
    adapter = arch.adapter_for(student, "a test")
    assert adapter.model_type == family and getattr(student.encoder.config, adapter.layer_count) == 2
    t_layers = modeling.encoder_layers(modeling.load_classifier(teacher_dir)[0])
    for new, old in ((0, 0), (1, 2)):
        s_state, t_state = modeling.encoder_layers(student)[new].state_dict(), t_layers[old].state_dict()
        assert s_state.keys() == t_state.keys() and all(torch.equal(s_state[k], t_state[k]) for k in s_state)
    lm = run_stage("teacher_logits", {"precision": "fp32"}, tmp_path / "l", {"teacher": teacher_dir, "data": data_dir},
                   {"data": data_metrics})
    assert lm["examples"] == data_metrics["train_size"]
    d = run_stage("distill", {"epochs": 0.25, "batch_size": 32}, tmp_path / "d",
                  {"student": tmp_path / "s", "logits": tmp_path / "l", "data": data_dir}, {"data": data_metrics})
    assert d["steps"] == 2 and d["params"] == m["params"]
    distilled, _, _ = modeling.load_classifier(tmp_path / "d")
    assert torch.isfinite(_logits(distilled, tokenizer)).all()


def test_unstructured_prune(teacher, run_stage, tmp_path):
    family, head, teacher_dir, data_dir, data_metrics = teacher
    metrics = run_stage("prune", {"method": "unstructured", "amount": 0.5}, tmp_path,
                        {"model": teacher_dir, "data": data_dir}, {"data": data_metrics})
    assert metrics["pruned_weights"] == 3 * (4 * 32 * 32 + 2 * 32 * 128)  # the layer Linears only
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-6)
    model, _, _ = modeling.load_classifier(tmp_path)
    original, _, _ = modeling.load_classifier(teacher_dir)
    for linear in arch.adapter_for(model, "a test").layer_linears(model.encoder):
        assert int((linear.weight == 0).sum()) == linear.weight.numel() // 2
    targets = {id(m) for m in arch.adapter_for(model, "a test").layer_linears(model.encoder)}
    others = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and id(m) not in targets]
    assert others  # optforge's head or the stock one, ELECTRA's embedding projection, BERT's stock pooler
    for name in others:  # left alone
        assert torch.equal(model.get_submodule(name).weight, original.get_submodule(name).weight), name


def test_structured_prune_then_quantize_and_evaluate(teacher, run_stage, tmp_path):
    family, head, teacher_dir, data_dir, data_metrics = teacher
    metrics = run_stage("prune", {"method": "structured", "heads": 0.5, "ffn": 0.5}, tmp_path / "p",
                        {"model": teacher_dir, "data": data_dir}, {"data": data_metrics})
    assert (metrics["heads_before"], metrics["heads_after"], metrics["ffn_before"], metrics["ffn_after"]) == \
        (12, 6, 384, 192)
    removed = 3 * (3 * 16 * 33 + 16 * 32 + 64 * 33 + 64 * 32)
    assert metrics["params_before"] - metrics["params_after"] == removed
    assert metrics["flops_per_token_after"] < metrics["flops_per_token_before"]
    model, tokenizer, _ = modeling.load_classifier(tmp_path / "p")
    assert modeling.layer_shapes(model) == [{"attention_width": 16, "heads": 2, "intermediate": 64}] * 3
    ref = _logits(model, tokenizer)
    assert torch.isfinite(ref).all()

    q = run_stage("quantize", {"method": "torch-int8-dynamic"}, tmp_path / "q", {"model": tmp_path / "p"})
    # the base model's Linears: the blocks', plus ELECTRA's embedding projection and BERT's stock pooler
    extra = (family == "electra") + (family == "bert" and head == "stock")
    assert q["linears_quantized"] == 18 + extra and q["linears_skipped"] == 0
    runnable = load_runnable(tmp_path / "q", "cpu")
    got = runnable.forward(dict(zip(("input_ids", "attention_mask"), sample_batch(tokenizer, TEXTS))))
    assert (got - ref).abs().max().item() <= 0.05 * ref.abs().max().item() and not torch.equal(got, ref)
    assert runnable.flops_per_token(16) == pytest.approx(load_runnable(tmp_path / "p", "cpu").flops_per_token(16))
    e = run_stage("evaluate", {}, tmp_path / "e", {"model": tmp_path / "q", "data": data_dir})
    assert e["n"] == data_metrics["eval_size"]
    b = run_stage("benchmark", {"batch_sizes": [1, 4], "warmup": 1, "min_runs": 3, "max_seconds": 0.05,
                                "threads": 1}, tmp_path / "b", {"model": tmp_path / "q", "data": data_dir})
    assert b["flops_per_sample"] > 0 and b["params"] > 0 and set(b["batches"]) == {"1", "4"}


def test_a_pruned_distilbert_compiles_to_the_same_logits(toy_data, run_stage, tmp_path):
    """AOTI export of a structurally pruned DistilBERT (the family least like BERT: its own attention
    module, n_heads/dim bookkeeping): the package runs and matches eager. (Checked by hand for RoBERTa,
    XLM-RoBERTa and ELECTRA as well, float and int8-weight-only; one family here keeps the suite short.)"""
    from optforge.artifacts.compiled import example_inputs

    data_dir, data_metrics = toy_data
    checkpoint(tmp_path / "hf", "distilbert")
    run_stage("teacher", {"model": str(tmp_path / "hf"), "finetune": None}, tmp_path / "t", {"data": data_dir},
              {"data": data_metrics})
    run_stage("prune", {"method": "structured", "heads": 0.5, "ffn": 0.5}, tmp_path / "p",
              {"model": tmp_path / "t", "data": data_dir}, {"data": data_metrics})
    m = run_stage("compile", {"mode": "default", "max_length": 32, "max_batch": 8}, tmp_path / "c",
                  {"model": tmp_path / "p"})
    assert m["path"] == "aoti"
    eager, compiled = load_runnable(tmp_path / "p", "cpu"), load_runnable(tmp_path / "c", "cpu")
    for b, s in [(1, 3), (8, 32), (5, 17)]:
        inputs = dict(zip(("input_ids", "attention_mask"), example_inputs(eager.tokenizer, "cpu", b, s)))
        ref = eager.forward(inputs)
        torch.testing.assert_close(compiled.forward(inputs), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert compiled.flops_per_token(32) == eager.flops_per_token(32)


def test_an_unsupported_teacher_is_a_recipe_error_naming_the_field(run_stage, tmp_path, toy_data):
    from transformers import AutoModel, GPT2Config

    tok = modeling.load_tokenizer(MINILM)
    model = modeling.TextClassifier(AutoModel.from_config(GPT2Config(vocab_size=len(tok), n_positions=64,
                                                                     n_embd=32, n_layer=2, n_head=2)), 2)
    modeling.save_classifier(model, tok, {"max_length": 32}, tmp_path / "t")
    with pytest.raises(RecipeError) as e:
        run_stage("student", {"from_teacher": {"layers": [0]}}, tmp_path / "s", {"teacher": tmp_path / "t"})
    assert str(e.value) == ("<recipe>: error: student.from_teacher: model type 'gpt2' is not supported for a "
                            "student made of teacher layers; supported: bert, distilbert, electra, roberta, "
                            "xlm-roberta")
    from optforge.stages.base import StageContext
    from optforge.stages.registry import get_kind

    data_dir, data_metrics = toy_data
    kind = get_kind("prune")  # as the engine names a prune entry's stage: prune:<name>
    ctx = StageContext(name="prune:p1", kind="prune", params=kind.params_model.model_validate(
        {"method": "structured", "heads": 0.5}), inputs={"model": tmp_path / "t", "data": data_dir},
        input_metrics={"data": data_metrics}, out=tmp_path / "p", device="cpu", log=lambda s: None)
    with pytest.raises(RecipeError) as e:
        kind.run(ctx)
    assert str(e.value) == ("<recipe>: error: prune: entry 'p1': model type 'gpt2' is not supported for "
                            "structured pruning; supported: bert, distilbert, electra, roberta, xlm-roberta")
