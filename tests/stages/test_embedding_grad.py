"""`embedding_grad: sparse` (finetune/distill/recover): the trained word-embedding table gets sparse
gradients and SparseAdam, so a step updates only the rows of the batch's tokens; unset it is the dense
AdamW of every row, and the dump (every key) is unchanged."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from optforge import training
from optforge.errors import OptforgeError
from optforge.recipe import DistillSpec, TrainSpec
from tiny_models import build_tiny

TEXTS = ["a fine film", "dull and long", "great fun", "a mess"] * 4
LABELS = [0, 1, 0, 1] * 4


def test_unset_leaves_the_dump_unchanged_and_bad_values_are_refused():
    assert "embedding_grad" not in TrainSpec().model_dump(mode="json")
    assert "embedding_grad" not in DistillSpec().model_dump(mode="json")
    assert DistillSpec(embedding_grad="sparse", freeze_embeddings=False).model_dump(mode="json")["embedding_grad"] == "sparse"
    with pytest.raises(ValidationError, match="embedding_grad"):
        TrainSpec(embedding_grad="lazy")
    with pytest.raises(ValidationError, match="freeze_embeddings is true"):
        DistillSpec(embedding_grad="sparse")  # frozen by default: a sparse gradient would change nothing


def _train(embedding_grad):
    model, tok = build_tiny(seed=5)
    ids = tok(TEXTS, truncation=True, max_length=16)["input_ids"]
    table = model.encoder.embeddings.word_embeddings
    before = table.weight.detach().clone()
    spec = TrainSpec(epochs=1, batch_size=16, lr=1e-2, freeze_embeddings=False, precision="fp32",
                     embedding_grad=embedding_grad)
    training.train(model, ids, LABELS, spec, "cpu", tok.pad_token_id)
    touched = sorted({t for s in ids for t in s})
    changed = (table.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    return model, touched, changed


def test_sparse_updates_exactly_the_rows_of_the_batch_tokens():
    model, touched, changed = _train("sparse")
    assert changed == touched
    assert model.encoder.embeddings.word_embeddings.sparse is False  # the saved model is the usual one


def test_dense_adamw_decays_every_row():
    _, touched, changed = _train(None)
    assert len(changed) > len(touched)  # weight decay moves the rows no batch touched


def test_clip_grad_norm_with_a_sparse_gradient_matches_the_dense_one():
    torch.manual_seed(0)
    dense, sparse = torch.nn.Embedding(50, 8), torch.nn.Embedding(50, 8, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    head_d, head_s = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)
    head_s.load_state_dict(head_d.state_dict())
    x = torch.tensor([[1, 4, 4, 9], [2, 3, 9, 0]])
    for emb, head in ((dense, head_d), (sparse, head_s)):
        (head(emb(x)).sum() * 100).backward()
    total_d = torch.nn.utils.clip_grad_norm_(list(dense.parameters()) + list(head_d.parameters()), 1.0)
    total_s = training.clip_grad_norm(torch.nn.ModuleList([sparse, head_s]), 1.0)
    assert torch.allclose(total_d, total_s)
    assert torch.allclose(dense.weight.grad, sparse.weight.grad.to_dense())
    assert torch.allclose(head_d.weight.grad, head_s.weight.grad)


def test_sparse_is_single_device_in_the_recipe_and_at_build_time(monkeypatch):
    with pytest.raises(ValidationError, match="one device only"):
        TrainSpec(embedding_grad="sparse", freeze_embeddings=False, devices=2)
    model, tok = build_tiny(seed=5)
    ids = tok(TEXTS, truncation=True, max_length=16)["input_ids"]
    monkeypatch.setenv("OPTFORGE_TRAIN_DEVICES", "2")
    spec = TrainSpec(epochs=1, batch_size=16, freeze_embeddings=False, precision="fp32", embedding_grad="sparse")
    with pytest.raises(OptforgeError, match="one device only"):
        training.train(model, ids, LABELS, spec, "cpu", tok.pad_token_id)
