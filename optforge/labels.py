"""Which output of a classifier checkpoint is which label of the data. Pure (no torch).

A checkpoint that already is a classifier names its outputs (config.json `id2label`); the data names its
labels too (integer labels are named "0", "1", ...). `align` says, for each data label in order, which
checkpoint output it is, or raises a RecipeError located at `teacher.label_map` / `teacher.model` that
shows both label sets and the `label_map` that would resolve them. The teacher stage then reorders the
checkpoint's classification layer so that output i *is* data label i everywhere downstream.
"""

from __future__ import annotations

import re
from typing import Optional

from optforge.errors import RecipeError, shown

GENERIC = re.compile(r"^(LABEL_)?\d+$")  # what transformers names the outputs of a checkpoint nobody named


def checkpoint_label_names(config: dict, num_labels: Optional[int] = None) -> list[str]:
    """Output names from an HF config dict (id2label keys are strings in config.json)."""
    id2label = config.get("id2label") or {}
    n = num_labels if num_labels is not None else (len(id2label) or int(config.get("num_labels", 2)))
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]


def align(data_names: list[str], ckpt_names: list[str], label_map: Optional[dict[str, str]] = None
          ) -> tuple[list[int], list[str], str]:
    """(order, names, how): data label i is checkpoint output order[i]; `names` are the output names to
    keep, in data order; `how` says how the match was made (for the log and the metrics)."""
    if len(ckpt_names) != len(data_names):
        raise RecipeError(f"the checkpoint classifies into {len(ckpt_names)} labels {shown(ckpt_names)}, the data "
                          f"has {len(data_names)} {shown(data_names)}: use a checkpoint trained for these labels, or "
                          f"a bare encoder (a new head is trained)", ("teacher", "model"))
    if label_map is not None:
        unknown = sorted(set(label_map) - set(data_names))
        missing = [n for n in data_names if n not in label_map]
        if unknown or missing:
            parts = ([f"{shown(unknown)} are not data labels"] if unknown else []) + \
                    ([f"data labels {shown(missing)} are not mapped"] if missing else [])
            raise RecipeError(f"{'; '.join(parts)} (data labels: {shown(data_names)})", ("teacher", "label_map"))
        bad = sorted({t for t in label_map.values() if t not in ckpt_names})
        if bad:
            raise RecipeError(f"{shown(bad)} are not labels of the checkpoint (its labels: {shown(ckpt_names)})",
                              ("teacher", "label_map"))
        order = [ckpt_names.index(label_map[n]) for n in data_names]
        return order, [ckpt_names[i] for i in order], "label_map"
    if ckpt_names == data_names:
        return list(range(len(data_names))), list(ckpt_names), "same names"
    folded = [n.casefold() for n in ckpt_names]
    if len(set(folded)) == len(folded) and sorted(folded) == sorted(n.casefold() for n in data_names):
        order = [folded.index(n.casefold()) for n in data_names]
        return order, [ckpt_names[i] for i in order], "same names (case-insensitive)"
    if all(GENERIC.match(n) for n in ckpt_names):
        # nobody named the checkpoint's outputs: its output i can only mean label i
        return list(range(len(data_names))), list(data_names), "by index (the checkpoint's labels are unnamed)"
    example = ", ".join(f"{d!r}: {c!r}" for d, c in zip(data_names, ckpt_names))
    raise RecipeError(f"the checkpoint's labels {shown(ckpt_names)} do not match the data's {shown(data_names)}: "
                      f"say which is which, e.g. `label_map: {{{example}}}`", ("teacher", "label_map"))
