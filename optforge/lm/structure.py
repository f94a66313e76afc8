"""Structured shapes of a GPT-2 (the causal-LM family optforge prunes structurally): per block, how many
attention heads and FFN channels it has, shrinking a block to chosen heads and channels, and rebuilding a
stock-config model at the saved (pruned) shapes before its weights load.

Per block, on the projections as transformers builds them (Conv1D, weight [in, out]; an nn.Linear after
`model.conv1d_to_linear` works the same, weight [out, in]):
  attn.c_attn   hidden -> 3 * heads * head_dim   the fused q | k | v: head h is features h*d..(h+1)*d of each
  attn.c_proj   heads * head_dim -> hidden
  mlp.c_fc      hidden -> intermediate
  mlp.c_proj    intermediate -> hidden
GPT2Attention (transformers 5) splits c_attn's output at `split_size` and reshapes to (-1, head_dim), so a
block with fewer heads runs once `split_size` and `num_heads` follow its c_attn; head_dim (and so the
attention scaling) is unchanged. KV caches size themselves per layer from the keys they receive (DynamicCache,
and StaticCache's lazy initialization), so blocks may differ.

What a stock GPT2Config can say: one FFN width for every block (`n_inner`), and a head count only through
head_dim = n_embd // n_head. So after a structured prune the config's `n_inner` is set when every block
keeps the same width (an FFN-only prune stays a stock transformers directory), and otherwise — any head
removed, or widths that differ — `undescribed_shapes` gives the per-block shapes that `lm.model.save_float`
records in optforge_model.json ("pruned_layers") and `fit_blocks` applies when optforge loads the artifact.
"""

from __future__ import annotations

from typing import Optional

STRUCTURED = ("gpt2",)  # model types structured pruning knows


def supports_structured(model_type: Optional[str]) -> bool:
    return model_type in STRUCTURED


def unsupported(model_type: Optional[str], where: Optional[str] = None):
    """The UnsupportedArchitecture (optforge.arch) for structured pruning of a causal LM of `model_type`."""
    from optforge.arch import UnsupportedArchitecture

    return UnsupportedArchitecture(model_type, "structured pruning of a causal LM", where=where, known=list(STRUCTURED))


def blocks(model) -> list:
    return list(model.transformer.h)


def head_dim(model) -> int:
    return model.config.n_embd // model.config.n_head


def block_shape(block, d: int) -> dict:
    """{"heads", "head_size", "intermediate"} of one block, read from its projections."""
    from optforge.importance import in_features

    return {"heads": in_features(block.attn.c_proj) // d, "head_size": d,
            "intermediate": in_features(block.mlp.c_proj)}


def layer_shapes(model) -> list[dict]:
    d = head_dim(model)
    return [block_shape(b, d) for b in blocks(model)]


def config_width(config) -> int:
    return config.n_inner if config.n_inner is not None else 4 * config.n_embd


def undescribed_shapes(model) -> Optional[list[dict]]:
    """The per-block shapes when the config does not describe them all (a structurally pruned GPT-2), else None.
    Sets `config.n_inner` first when every block has the same FFN width and the config says another."""
    if model.config.model_type not in STRUCTURED:
        return None
    shapes = layer_shapes(model)
    widths = {s["intermediate"] for s in shapes}
    if len(widths) == 1 and widths != {config_width(model.config)}:  # unpruned configs stay byte-identical
        model.config.n_inner = widths.pop()
    if all(s["heads"] == model.config.n_head and s["intermediate"] == config_width(model.config) for s in shapes):
        return None
    return shapes


# --------------------------------------------------------------------------- changing shapes


def _projection(like, n_in: int, n_out: int):
    """A new projection of `like`'s type (Conv1D or nn.Linear), n_in -> n_out, on its device and dtype."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    w = like.weight
    if isinstance(like, nn.Linear):
        return nn.Linear(n_in, n_out, bias=like.bias is not None, device=w.device, dtype=w.dtype)
    return Conv1D(n_out, n_in).to(device=w.device, dtype=w.dtype)


def _select(module, index, side: str):
    """A copy of `module` keeping only the output (`side="out"`) or input features at `index`."""
    import torch
    from torch import nn

    out_dim = 0 if isinstance(module, nn.Linear) else 1  # the weight's output-feature dimension
    dim = out_dim if side == "out" else 1 - out_dim
    index = index.to(module.weight.device)
    w = module.weight.detach().index_select(dim, index)
    n_in, n_out = (w.shape[1], w.shape[0]) if out_dim == 0 else (w.shape[0], w.shape[1])
    new = _projection(module, n_in, n_out)
    with torch.no_grad():
        new.weight.copy_(w)
        if module.bias is not None:
            new.bias.copy_(module.bias.detach()[index] if side == "out" else module.bias.detach())
    return new


def _set_heads(attn, heads: int, d: int) -> None:
    attn.num_heads = heads
    attn.split_size = heads * d


def shrink_block(block, kept_heads: list[int], kept_channels: list[int], d: int) -> None:
    """Keep only heads `kept_heads` and FFN channels `kept_channels` (original indices) of one block, in place."""
    import torch

    shape = block_shape(block, d)
    attn, mlp = block.attn, block.mlp
    if len(kept_heads) < shape["heads"]:
        width = shape["heads"] * d
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kept_heads])
        attn.c_attn = _select(attn.c_attn, torch.cat([rows + part * width for part in range(3)]), "out")
        attn.c_proj = _select(attn.c_proj, rows, "in")
        _set_heads(attn, len(kept_heads), d)
    if len(kept_channels) < shape["intermediate"]:
        ch = torch.tensor(kept_channels)
        mlp.c_fc = _select(mlp.c_fc, ch, "out")
        mlp.c_proj = _select(mlp.c_proj, ch, "in")


def fit_blocks(model, shapes: list[dict]) -> None:
    """Give a freshly built model's blocks the saved shapes (new, uninitialized projections where they differ),
    so the saved weights load over it."""
    if model.config.model_type not in STRUCTURED or len(shapes) != len(blocks(model)):
        raise ValueError(f"pruned_layers describes {len(shapes)} GPT-2 blocks; the model is a "
                         f"{model.config.model_type} with {len(blocks(model))} blocks")
    hidden = model.config.n_embd
    for block, s in zip(blocks(model), shapes):
        attn, mlp, d = block.attn, block.mlp, s["head_size"]
        width = s["heads"] * d
        attn.c_attn = _projection(attn.c_attn, hidden, 3 * width)
        attn.c_proj = _projection(attn.c_proj, width, hidden)
        _set_heads(attn, s["heads"], d)
        mlp.c_fc = _projection(mlp.c_fc, hidden, s["intermediate"])
        mlp.c_proj = _projection(mlp.c_proj, s["intermediate"], hidden)
