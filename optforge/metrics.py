"""Quality metrics of a classifier's predictions, on plain lists (no torch): what `evaluate` reports."""

from __future__ import annotations

from typing import Sequence


def classification_metrics(predictions: Sequence[int], labels: Sequence[int], num_labels: int) -> dict:
    """{"accuracy" (0-1), "macro_f1", "n"}. Macro-F1 averages per-class F1 over the classes that occur in
    the labels or the predictions (a class that is neither has no defined F1)."""
    n = len(labels)
    correct = sum(int(p == y) for p, y in zip(predictions, labels))
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": correct / n if n else 0.0, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0, "n": n}
