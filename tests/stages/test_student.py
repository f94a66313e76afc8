"""student stage: a layer subset of the teacher, or a random-init encoder sharing the teacher's tokenizer."""

from __future__ import annotations

import pytest
import torch

from optforge.errors import RecipeError
from optforge.modeling import load_classifier


def test_from_teacher_copies_exactly_those_layers(tiny_teacher, run_stage, tmp_path):
    teacher_dir, _ = tiny_teacher
    m = run_stage("student", {"from_teacher": {"layers": [2, 0]}}, tmp_path, {"teacher": teacher_dir})
    assert m["num_layers"] == 2 and m["params"] < m["teacher_params"]
    teacher, _, t_meta = load_classifier(teacher_dir)
    student, _, s_meta = load_classifier(tmp_path)
    t, s = teacher.state_dict(), student.state_dict()
    assert len(student.encoder.encoder.layer) == 2
    # layers are sorted by the recipe schema: student layer 0 <- teacher 0, student layer 1 <- teacher 2
    for new, old in ((0, 0), (1, 2)):
        keys = [k for k in s if k.startswith(f"encoder.encoder.layer.{new}.")]
        assert len(keys) == len([k for k in t if k.startswith(f"encoder.encoder.layer.{old}.")]) > 0
        for k in keys:
            assert torch.equal(s[k], t[k.replace(f"layer.{new}.", f"layer.{old}.")]), k
    shared = [k for k in s if ".layer." not in k]
    assert any(k.startswith("encoder.embeddings.") for k in shared) and "head.weight" in shared
    for k in shared:
        assert torch.equal(s[k], t[k]), k
    assert s_meta["max_length"] == t_meta["max_length"] and s_meta["label_names"] == t_meta["label_names"]
    assert student.pooling == teacher.pooling


def test_layer_out_of_range_is_a_recipe_error(tiny_teacher, run_stage, tmp_path):
    with pytest.raises(RecipeError, match=r"layer indices \[3\] out of range: the model has 3 layers"):
        run_stage("student", {"from_teacher": {"layers": [0, 3]}}, tmp_path, {"teacher": tiny_teacher[0]})


def test_from_config_shares_tokenizer_and_labels(tiny_teacher, run_stage, tmp_path):
    config = {"num_layers": 1, "hidden_size": 16, "num_heads": 2, "intermediate_size": 24, "seed": 7}
    m = run_stage("student", {"config": config}, tmp_path, {"teacher": tiny_teacher[0]})
    student, tok, meta = load_classifier(tmp_path)
    teacher, t_tok, _ = load_classifier(tiny_teacher[0])
    c = student.encoder.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (1, 16, 2, 24)
    assert m["source"] == "random-init" and m["num_layers"] == 1
    assert tok.get_vocab() == t_tok.get_vocab() and c.vocab_size == len(t_tok)
    assert student.num_labels == teacher.num_labels and student.pooling == teacher.pooling
    assert (tmp_path / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tiny_teacher[0] / "tokenizer" / "tokenizer.json").read_bytes()
