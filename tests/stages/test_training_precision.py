"""Training precision (`finetune/distill/recover: precision`): unset resolves to the build device's default
(bf16 on CUDA and on a CPU with AVX512_BF16/AMX, else fp32) before keying, so the key says what a model was
trained in; "bf16" trains under bf16 autocast on a CPU too (fp32 master weights), "fp32" nowhere."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from pathlib import Path

import yaml

from optforge import training
from optforge.device import default_train_precision
from optforge.graph import build_graph
from optforge.recipe import DistillSpec, TrainSpec
from optforge.recipe_io import load_recipe
from tiny_models import build_tiny

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_unset_precision_leaves_the_dump_and_so_every_key_unchanged():
    assert "precision" not in TrainSpec().model_dump(mode="json")
    assert "precision" not in DistillSpec().model_dump(mode="json")
    assert TrainSpec(precision="bf16").model_dump(mode="json")["precision"] == "bf16"
    assert DistillSpec(precision="fp32").model_dump(mode="json")["precision"] == "fp32"
    assert TrainSpec.model_validate(TrainSpec(precision="bf16").model_dump(mode="json")).precision == "bf16"
    with pytest.raises(ValidationError, match="precision"):
        TrainSpec(precision="fp16")


def test_the_device_default():
    assert default_train_precision("cuda") == "bf16"
    assert default_train_precision("cpu", ["avx2", "avx512f", "avx512_bf16"]) == "bf16"
    assert default_train_precision("cpu", ["avx2", "amx_bf16", "amx_tile"]) == "bf16"
    assert default_train_precision("cpu", ["avx2", "avx512f", "avx512_vnni"]) == "fp32"  # bf16 only emulated
    assert default_train_precision("cpu", []) == "fp32"


def test_the_autocast_rule():
    assert training.autocast_bf16("bf16", cuda=False) is True
    assert training.autocast_bf16("fp32", cuda=True) is False
    assert training.autocast_bf16(None, cuda=False) is (default_train_precision("cpu") == "bf16")


def test_a_build_keys_the_resolved_precision(tmp_path):
    """Unset precisions are filled with the device default in the graph a build runs, set ones are kept,
    and the teacher_logits stage computes in the distillation's precision."""
    recipe = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    recipe["distill"]["precision"] = "fp32"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(path)
    for device, want in (("cuda", "bf16"), ("cpu", default_train_precision("cpu"))):
        graph = build_graph(loaded.view(device), path.parent)
        teacher = graph["teacher"].params
        auto = teacher["finetune"] == "auto"
        assert (teacher["auto_precision"] if auto else teacher["finetune"]["precision"]) == want
        assert graph["distill"].params["precision"] == "fp32"  # set in the recipe: kept
        assert graph["teacher_logits"].params["precision"] == "fp32"
        assert graph["distill"].inputs["logits"] == "teacher_logits"
        for p in recipe.get("prune", []):
            if p.get("recover") is not None:
                assert graph[f"prune:{p['name']}"].params["recover"]["precision"] == want
                assert graph[f"prune:{p['name']}"].inputs["logits"] == "teacher_logits"


@pytest.mark.parametrize("precision, expected", [("fp32", "fp32"), ("bf16", "bf16")])
def test_training_on_cpu_reports_the_autocast_it_used(precision, expected):
    model, tok = build_tiny(seed=3)
    texts = ["a fine film", "dull and long", "great fun", "a mess"] * 8
    ids = tok(texts, truncation=True, max_length=16)["input_ids"]
    labels = [0, 1, 0, 1] * 8
    weights = model.head.weight.detach().clone()
    stats = training.train(model, ids, labels, TrainSpec(epochs=1, batch_size=8, lr=1e-3, precision=precision),
                           "cpu", tok.pad_token_id)
    assert stats["autocast"] == expected and stats["steps"] == 4
    assert math.isfinite(stats["train_loss"]) and not torch.equal(model.head.weight, weights)
    assert model.head.weight.dtype == torch.float32  # master weights stay fp32 under autocast
