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


def shard_batch(batch: Sequence[int], rank: int, world: int) -> tuple[list[int], float]:
    """Rank `rank` of `world` data-parallel processes: its share of `batch` and the weight of its mean loss.

    Strided (rank r takes members r, r + world, ...), so on a length-sorted batch every share spans the
    whole length range and the ranks pad to about the same width. The weight, len(share) * world / len(batch),
    makes the ranks' averaged gradients (DDP divides their sum by `world`) the gradient of the mean loss
    over the whole batch, however unevenly it splits. A rank whose share is empty (a last batch smaller
    than `world`) runs the batch's first member at weight 0: it joins the gradient all-reduce, adding zero."""
    share = list(batch[rank::world])
    if not share:
        return list(batch[:1]), 0.0
    return share, len(share) * world / len(batch)
