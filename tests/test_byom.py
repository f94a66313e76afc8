"""Bring your own model, at validate time: the README's Hub recipe validates, and a local classifier
checkpoint's head is checked against the recipe before anything runs (the teacher stage's own checks are
in tests/stages/test_teacher_byom.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from optforge.errors import RecipeError
from optforge.recipe_io import load_recipe
from optforge_testing import REPO

sys.path.insert(0, str(Path(__file__).parent / "stages"))
from tiny_models import save_tiny_checkpoint  # noqa: E402


def readme_recipe() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- byom-recipe[^>]*-->\n```yaml\n(.*?)```", text, re.S)
    assert m, "README.md has no byom-recipe block"
    return m.group(1)


def test_the_readme_hub_recipe_validates(tmp_path):
    path = tmp_path / "distilbert-sst2.yaml"
    path.write_text(readme_recipe())
    loaded = load_recipe(path)
    teacher = loaded.recipe.teacher
    assert teacher.model == "hf:distilbert-base-uncased-finetuned-sst-2-english"
    assert teacher.label_map == {"0": "NEGATIVE", "1": "POSITIVE"} and teacher.finetune == "auto"
    graph = loaded.graph("cpu", check_data=False)
    assert {"teacher", "student", "distill", "prune:pruned", "evaluate:pruned-int8dyn"} <= set(graph.names())


def write_recipe(tmp_path, teacher_yaml: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata: {dataset: sst2}\nteacher:\n" + teacher_yaml +
                    "configs:\n  - {name: baseline, model: teacher}\n")
    return path


def test_a_classifier_checkpoint_refuses_a_new_pooling_at_validate(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "distilbert")
    path = write_recipe(tmp_path, f"  model: {ckpt}\n  pooling: mean\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.path == ("teacher", "pooling") and e.value.line == 5
    assert "DistilBertForSequenceClassification" in str(e.value)
    load_recipe(write_recipe(tmp_path, f"  model: {ckpt}\n"))  # as is: fine


def test_a_bare_encoder_refuses_a_label_map_at_validate(tmp_path):
    enc = save_tiny_checkpoint(tmp_path / "enc", "roberta", classifier=False)
    path = write_recipe(tmp_path, f"  model: {enc}\n  label_map: {{'0': a, '1': b}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.path == ("teacher", "label_map") and e.value.line == 5 and "bare encoder" in str(e.value)


@pytest.mark.parametrize("label_map, words", [
    ("{'0': a, '1': a}", "two data labels map to the same checkpoint label"),
    ("{}", "at least 1 item"),
])
def test_a_malformed_label_map_is_located(tmp_path, label_map, words):
    path = write_recipe(tmp_path, f"  model: x\n  label_map: {label_map}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert words in str(e.value) and e.value.path[:2] == ("teacher", "label_map") and e.value.line == 5
