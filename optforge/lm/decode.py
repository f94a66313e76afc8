"""Greedy prefill and decode with a KV cache: what the causal-LM benchmark times and the compile stage checks.

Eager rows use transformers' DynamicCache; compiled rows a StaticCache (fixed-size key/value tensors updated
in place, so every decode step has the same shapes and torch.compile traces it once) sized prompt + new
tokens, under `torch.compile(model, dynamic=False)`. A fresh cache per call: each call is one complete,
independent request. Positions are passed explicitly (the prompt is unpadded: batch rows share a length).
"""

from __future__ import annotations

import torch


def new_cache(model, static: bool, max_len: int):
    from transformers import DynamicCache, StaticCache

    if static:
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def prefill(forward, model, ids: torch.Tensor, static: bool, max_len: int):
    """(next-token ids [B], cache, logits of the last position [B, V]) after the prompt `ids` [B, P]."""
    cache = new_cache(model, static, max_len)
    positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    out = forward(ids, cache=cache, use_cache=True, position_ids=positions, logits_to_keep=1)
    logits = out.logits[:, -1]
    return logits.argmax(-1), cache, logits


def generate(forward, model, ids: torch.Tensor, new_tokens: int, static: bool, keep_logits: bool = False):
    """Greedy: `new_tokens` token ids [B, new_tokens] after the prompt (its prefill included), and, with
    `keep_logits`, the logits of every step [B, new_tokens, V] (float32)."""
    with torch.inference_mode():
        token, cache, logits = prefill(forward, model, ids, static, ids.shape[1] + new_tokens)
        tokens, all_logits = [token], [logits.float()] if keep_logits else None
        position = ids.shape[1]
        for _ in range(new_tokens - 1):
            step = token[:, None]
            out = forward(step, cache=cache, use_cache=True, position_ids=torch.full_like(step, position),
                          logits_to_keep=1)
            logits = out.logits[:, -1]
            token = logits.argmax(-1)
            tokens.append(token)
            if keep_logits:
                all_logits.append(logits.float())
            position += 1
    stacked = torch.stack(tokens, 1)
    return (stacked, torch.stack(all_logits, 1)) if keep_logits else stacked
