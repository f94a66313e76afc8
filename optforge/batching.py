"""Which examples go into which batch, by token count: pure index arithmetic (no torch), shared by the
training loop (`length_bucketed_batches`) and every inference pass over a dataset (`sorted_batches`).

SST-2 sentences average ~13 tokens: padding every batch to max_length would waste most of the compute,
so batches group sentences of similar length and are padded to their own longest (`tokens.pad_batch`).
"""

from __future__ import annotations

import random
from typing import Sequence


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random,
                            chunk_batches: int = 50) -> list[list[int]]:
    """Index batches whose members have similar lengths, in random order.

    Shuffle all indices, cut them into chunks of `chunk_batches` batches, sort each chunk by length and
    slice it into batches, then shuffle the batch order. Randomness stays (chunks are random), padding
    mostly goes (a batch spans a narrow length range)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic length-sorted batches for inference (least padding)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
