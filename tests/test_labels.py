"""optforge.labels.align: which checkpoint output is which data label (pure)."""

from __future__ import annotations

import pytest

from optforge.errors import RecipeError
from optforge.labels import align, checkpoint_label_names


def test_same_names_keep_the_order():
    assert align(["neg", "pos"], ["neg", "pos"]) == ([0, 1], ["neg", "pos"], "same names")


def test_names_match_case_insensitively_and_reorder():
    assert align(["positive", "negative"], ["NEGATIVE", "POSITIVE"]) == (
        [1, 0], ["POSITIVE", "NEGATIVE"], "same names (case-insensitive)")


def test_unnamed_outputs_match_by_index_and_take_the_data_names():
    order, names, how = align(["0", "1"], ["LABEL_0", "LABEL_1"])
    assert (order, names) == ([0, 1], ["0", "1"]) and how.startswith("by index")


def test_named_outputs_that_differ_need_a_label_map():
    with pytest.raises(RecipeError) as e:
        align(["0", "1"], ["NEGATIVE", "POSITIVE"])
    assert e.value.path == ("teacher", "label_map")
    assert "`label_map: {'0': 'NEGATIVE', '1': 'POSITIVE'}`" in str(e.value)
    assert align(["0", "1"], ["NEGATIVE", "POSITIVE"], {"0": "POSITIVE", "1": "NEGATIVE"}) == (
        [1, 0], ["POSITIVE", "NEGATIVE"], "label_map")


@pytest.mark.parametrize("label_map, words", [
    ({"0": "NEGATIVE"}, "data labels ['1'] are not mapped"),
    ({"0": "NEGATIVE", "1": "POSITIVE", "2": "x"}, "['2'] are not data labels"),
    ({"0": "NEGATIVE", "1": "GOOD"}, "['GOOD'] are not labels of the checkpoint"),
])
def test_a_bad_label_map_is_located(label_map, words):
    with pytest.raises(RecipeError) as e:
        align(["0", "1"], ["NEGATIVE", "POSITIVE"], label_map)
    assert e.value.path == ("teacher", "label_map") and words in str(e.value)


def test_a_different_label_count_is_an_error_on_the_model():
    with pytest.raises(RecipeError) as e:
        align(["0", "1"], ["a", "b", "c"])
    assert e.value.path == ("teacher", "model") and "3 labels" in str(e.value)


def test_checkpoint_label_names_read_config_json_keys():
    assert checkpoint_label_names({"id2label": {"0": "NEG", "1": "POS"}}) == ["NEG", "POS"]
    assert checkpoint_label_names({"num_labels": 3}) == ["LABEL_0", "LABEL_1", "LABEL_2"]
