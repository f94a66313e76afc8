"""optforge.cudagraphs: shape buckets, and that padding a batch up to its bucket leaves the real rows'
logits unchanged. The bucketing and padding run on CPU with capture=False (the same code path minus the
graph); the captured path runs on CUDA only."""

from __future__ import annotations

import pytest
import torch

from optforge.cudagraphs import GraphedForward, batch_buckets, bucket_for, length_buckets
from optforge.artifacts.compiled import example_inputs
from tiny_models import build_tiny


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert length_buckets(64) == [16, 32, 48, 64]
    assert length_buckets(40) == [16, 32, 40]
    assert length_buckets(8) == [8]
    assert bucket_for(5, [1, 2, 4, 8]) == 8
    assert bucket_for(8, [1, 2, 4, 8]) == 8
    assert bucket_for(9, [1, 2, 4, 8]) is None
    with pytest.raises(ValueError):
        batch_buckets(0)


def _check(device: str, capture: bool):
    model, tokenizer = build_tiny(seed=3)
    model = model.to(device)
    graphed = GraphedForward(model, pad_id=tokenizer.pad_token_id, max_batch=32, max_length=64, device=device,
                             capture=capture)
    shapes = [(1, 3), (1, 64), (5, 17), (32, 64), (3, 17), (40, 20)]  # the last: beyond max_batch
    for b, s in shapes:
        ids, mask = example_inputs(tokenizer, device, b, s)
        with torch.inference_mode():
            ref = model(ids, mask).float()
        got = graphed(ids, mask)
        assert got.shape == (b, 2)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # (1,3) -> (1,16); (5,17) -> (8,32); (3,17) -> (4,32); (40,20) is beyond max_batch: no graph
    assert graphed.captured == [(1, 16), (1, 64), (4, 32), (8, 32), (32, 64)]
    # a later, smaller batch in a used bucket must not see the earlier batch's rows
    ids, mask = example_inputs(tokenizer, device, 2, 9)
    with torch.inference_mode():
        torch.testing.assert_close(graphed(ids, mask), model(ids, mask).float(), rtol=1e-4, atol=1e-3)


def test_padding_to_buckets_keeps_logits_cpu():
    _check("cpu", capture=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_captured_graphs_match_eager_cuda():
    _check("cuda", capture=True)
