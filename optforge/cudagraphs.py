"""CUDA graphs for a classifier forward: one captured graph per (batch bucket, length bucket).

`GraphedForward(fn, ...)` is called like `fn(input_ids, attention_mask) -> logits`. A call pads its batch
up to the nearest bucket (extra rows: all padding, mask 0; extra columns: mask 0), copies it into that
bucket's static input buffers, replays the bucket's graph and returns the first rows of its output. A
bucket's graph is captured on first use, after warm-up calls on a side stream (so anything `fn` compiles
or allocates for that shape happens before capture, never inside it).

Why not `torch.compile(mode="reduce-overhead")`: measured on an H200 (torch 2.11, MiniLM-L6 bf16, seq 64),
its CUDA-graph trees replayed in 0.46 ms at batch 1 where a plain graph around the same compiled code
replays in 0.23 ms: the trees check guards, copy inputs and manage their memory pool in Python on every
call. Here a call costs two copies (four when it pads), one replay and one output copy.

Padding does not change the logits of the real rows: padded positions are masked out of attention and of
mean pooling, and rows do not interact. `capture=False` runs the same bucketing and padding without
CUDA graphs (CPU tests of exactly that logic).
"""

from __future__ import annotations

import threading
from typing import Callable

LENGTH_STEP = 16  # sequence buckets: 16, 32, 48, ... up to max_length


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... (powers of two below max_batch), then max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def length_buckets(max_length: int, step: int = LENGTH_STEP) -> list[int]:
    """step, 2*step, ... below max_length, then max_length."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    return [n for n in range(step, max_length, step)] + [max_length]


def bucket_for(n: int, buckets: list[int]) -> int | None:
    """The smallest bucket >= n, or None when n exceeds every bucket."""
    for b in buckets:
        if b >= n:
            return b
    return None


class _Entry:
    __slots__ = ("graph", "ids", "mask", "out")

    def __init__(self, graph, ids, mask, out):
        self.graph, self.ids, self.mask, self.out = graph, ids, mask, out


class GraphedForward:
    """`fn` replayed through CUDA graphs over shape buckets; see the module docstring.

    A batch larger than `max_batch` or longer than `max_length` runs `fn` directly (no graph)."""

    def __init__(self, fn: Callable, *, pad_id: int, max_batch: int, max_length: int, device,
                 capture: bool = True, warmup_calls: int = 2):
        import torch

        self.fn = fn
        self.pad_id = int(pad_id)
        self.device = torch.device(device)
        self.capture = capture
        self.warmup_calls = warmup_calls
        self.batch_buckets = batch_buckets(max_batch)
        self.length_buckets = length_buckets(max_length)
        self._entries: dict[tuple[int, int], _Entry] = {}
        self._lock = threading.Lock()
        # One memory pool for every bucket: replays never overlap and each output is copied out before
        # the next replay, so buckets may reuse each other's intermediate memory.
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def captured(self) -> list[tuple[int, int]]:
        return sorted(self._entries)

    def __call__(self, input_ids, attention_mask):
        import torch

        b, s = (int(x) for x in input_ids.shape)
        B, S = bucket_for(b, self.batch_buckets), bucket_for(s, self.length_buckets)
        if B is None or S is None:
            return self.fn(input_ids, attention_mask)
        with self._lock, torch.inference_mode():
            entry = self._entries.get((B, S)) or self._make(B, S)
            if (b, s) != (B, S):
                entry.ids.fill_(self.pad_id)
                entry.mask.zero_()
            entry.ids[:b, :s].copy_(input_ids, non_blocking=True)
            entry.mask[:b, :s].copy_(attention_mask, non_blocking=True)
            if self.capture:
                entry.graph.replay()
                out = entry.out
            else:
                out = self.fn(entry.ids, entry.mask).float()
            return out[:b].clone()

    def _make(self, B: int, S: int) -> _Entry:
        import torch

        ids = torch.full((B, S), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.ones((B, S), dtype=torch.long, device=self.device)
        if not self.capture:
            entry = _Entry(None, ids, mask, None)
        else:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup_calls):
                    self.fn(ids, mask)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn(ids, mask).float()
            entry = _Entry(graph, ids, mask, out)
        self._entries[(B, S)] = entry
        return entry
