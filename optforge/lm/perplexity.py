"""Perplexity with one fixed protocol (the recipe's `perplexity` section; defaults: context = data.max_length,
stride = context // 2), the one every causal-LM row is evaluated with:

1. The eval texts, each tokenized without special tokens and followed by the separator id
   (`lm.model.eos_id`: EOS, else SEP), concatenated in file order into one token stream.
2. Windows of `context_length` tokens: the first starts at 0; each next one ends `stride` tokens after the
   previous one (stride < context_length) and scores only the tokens the previous window did not, so every
   token after the first is scored exactly once, with at least context_length - stride tokens of context
   (fewer only in the first window); the first token of the stream has no context and is never scored.
   This is the sliding-window evaluation of the transformers perplexity guide; a smaller stride gives
   more context per token (lower perplexity) at more forward passes.
3. perplexity = exp(total negative log-likelihood / scored tokens), the NLL summed in fp32 from
   log_softmax of the logits (fp32) the row's runnable returns, computed only at the positions that
   predict scored tokens (`logits_to_keep`).

`windows` is pure (tested on integers); `perplexity` runs a model.
"""

from __future__ import annotations

import math
from typing import Callable, Optional


def windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over a stream of `n_tokens` tokens: the window
    feeds tokens [begin, end) and scores the targets at positions [first, end). The first window scores
    [1, context); each next one ends `stride` tokens later, starts `context` tokens before its end, and
    scores what the previous one did not: every token after the first exactly once, with at least
    context - stride tokens of context."""
    if context < 2 or not 1 <= stride < context:
        raise ValueError(f"need context >= 2 and 1 <= stride < context, got context {context}, stride {stride}")
    if n_tokens < 2:
        return []
    end = min(context, n_tokens)
    out = [(0, end, 1)]
    while end < n_tokens:
        prev, end = end, min(end + stride, n_tokens)
        out.append((max(0, end - context), end, prev))
    return out


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    from optforge.lm.model import eos_id

    sep = eos_id(tokenizer)
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(sep)
    return stream


def perplexity(logits_fn: Callable, stream: list[int], context: int, stride: int, device, batch_size: int = 8,
               bar: Optional[Callable] = None) -> dict:
    """Perplexity of `stream` under `logits_fn(input_ids [B, T], keep) -> logits [B, keep, V]` of the last
    `keep` positions (module docstring). Only the logits that predict scored tokens are asked for: with the
    default stride, half of each window's LM-head work is skipped."""
    import torch

    spans = windows(len(stream), context, stride)
    if not spans:
        raise ValueError(f"the eval stream has {len(stream)} token(s): nothing to score")
    ids = torch.tensor(stream, dtype=torch.long)
    nll, scored = 0.0, 0
    groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
    for b, e, first in spans:  # windows of one length and one scored count batch together
        groups.setdefault((e - b, e - first), []).append((b, e, first))
    progress = bar(total=len(spans), desc="perplexity", unit="window") if bar is not None else None
    with torch.inference_mode():
        for (_, n_scored), group in groups.items():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                batch = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)
                # the last n_scored + 1 positions: position t predicts token t + 1; the final one predicts nothing
                logp = torch.log_softmax(logits_fn(batch, n_scored + 1)[:, :-1].float(), dim=-1)
                targets = batch[:, -n_scored:]
                nll -= logp.gather(-1, targets[..., None]).sum().item()
                scored += targets.numel()
                if progress is not None:
                    progress.update(len(chunk))
    if progress is not None:
        progress.close()
    mean = nll / scored
    return {"perplexity": math.exp(mean), "nll_per_token": mean, "tokens_scored": scored, "windows": len(spans),
            "stream_tokens": len(stream), "context_length": context, "stride": stride}
