"""Structured-prune counts on plain numbers."""

from __future__ import annotations

import pytest

from optforge.prune_counts import channels_to_keep, heads_to_remove, removed_fractions


def test_channel_rounding_keeps_kernel_friendly_widths():
    assert channels_to_keep(1536, 0.3) % 16 == 0
    assert channels_to_keep(128, 0.3) == 96  # 128 - 38 = 90 -> nearest multiple of 16
    assert channels_to_keep(100, 0.5) == 50  # not a multiple of 16 to begin with: exact
    assert channels_to_keep(32, 0.99) == 16  # never below one aligned block
    assert channels_to_keep(3, 0.99) == 1  # never below one channel
    assert channels_to_keep(128, 0.0) == 128


def test_heads_to_remove_keeps_at_least_one():
    assert heads_to_remove(12, 0.25) == 3
    assert heads_to_remove(2, 0.9) == 1
    assert heads_to_remove(1, 1.0) == 0
    assert heads_to_remove(4, 0.0) == 0


def test_removed_fractions_over_all_layers():
    plan = [{"heads_before": 4, "intermediate_before": 64, "kept_heads": [0, 1, 3], "kept_channels": []},
            {"heads_before": 4, "intermediate_before": 64, "kept_heads": [0, 1, 2, 3], "kept_channels": []}]
    layers = [{"heads": 3, "head_size": 8, "intermediate": 48, "kept_heads": [0, 1, 3]},
              {"heads": 4, "head_size": 8, "intermediate": 32, "kept_heads": [0, 1, 2, 3]}]
    out = removed_fractions(layers, before_shapes=plan)
    assert (out["heads_before"], out["heads_after"], out["ffn_before"], out["ffn_after"]) == (8, 7, 128, 80)
    assert out["heads_removed_fraction"] == pytest.approx(1 / 8)
    assert out["ffn_removed_fraction"] == pytest.approx(48 / 128)
    assert out["pruned_layers"] == [{"heads": 3, "head_size": 8, "intermediate": 48},
                                    {"heads": 4, "head_size": 8, "intermediate": 32}]
