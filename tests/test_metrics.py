"""Classification metrics on plain lists, checked by hand."""

from __future__ import annotations

import pytest

from optforge.metrics import classification_metrics


def test_metrics_by_hand():
    preds = [0, 0, 1, 1, 1, 2]
    labels = [0, 1, 1, 1, 2, 2]
    # class 0: tp1 fp1 fn0 -> 2/3; class 1: tp2 fp1 fn1 -> 4/6; class 2: tp1 fp0 fn1 -> 2/3
    m = classification_metrics(preds, labels, 3)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n"] == 6
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 6 + 2 / 3) / 3)


def test_a_class_nobody_predicts_or_has_is_left_out_of_macro_f1():
    # class 2 of 3 never occurs: macro-F1 averages classes 0 and 1 only
    assert classification_metrics([0, 1], [0, 1], 3) == {"accuracy": 1.0, "macro_f1": 1.0, "n": 2}
    # a class that occurs but is never predicted counts with F1 = 0
    assert classification_metrics([0, 0], [0, 1], 2)["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_empty():
    assert classification_metrics([], [], 2) == {"accuracy": 0.0, "macro_f1": 0.0, "n": 0}
