"""Batch composition by token count, on plain lists of lengths."""

from __future__ import annotations

import random

from optforge.batching import length_bucketed_batches, sorted_batches


def test_sorted_batches_are_length_sorted_and_cover_every_index_once():
    lengths = [5, 1, 4, 1, 3, 9, 2]
    batches = sorted_batches(lengths, 3)
    assert batches == [[1, 3, 6], [4, 2, 0], [5]]  # ties keep index order; the last batch is short
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert sorted_batches([], 4) == []


def test_length_bucketed_batches_group_similar_lengths_in_random_order():
    rng_lengths = random.Random(0)
    lengths = [rng_lengths.randint(1, 64) for _ in range(1000)]
    batches = length_bucketed_batches(lengths, 10, random.Random(1), chunk_batches=5)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len(b) == 10 for b in batches)
    # each batch is a slice of a length-sorted chunk of 50: its range of lengths is narrow
    widths = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(widths) / len(widths) < 16  # random batches of 10 from 1..64 would span ~52
    for b in batches:
        assert [lengths[i] for i in b] == sorted(lengths[i] for i in b)
    # seeded: the same rng gives the same batches, another seed another order
    assert length_bucketed_batches(lengths, 10, random.Random(1), chunk_batches=5) == batches
    assert length_bucketed_batches(lengths, 10, random.Random(2), chunk_batches=5) != batches
