"""Structured-pruning importance, shared by the classifier's prune stage (stages/prune.py, whose docstring
defines the scores) and the causal-LM one (stages/lm_prune.py): hooks on each block's attention-output and
FFN-output projections that accumulate, over the calibration batches a caller runs forward and backward,
  - per head, sum over examples of |sum over tokens and the head's dims of context * dL/dcontext|
    (Michel et al. 2019: |dL/d xi_h| for a gate xi_h on the head's output, at xi = 1), and
  - per FFN channel, mean over real tokens of |activation| times the L2 norm of the channel's output weights,
and the choice of the heads and channels to keep from those scores (counts: optforge/prune_counts.py).

A projection is an nn.Linear (weight [out, in]) or transformers' Conv1D (GPT-2: weight [in, out]); the hooks
read only the projection's input, so they work on either. torch is imported inside the functions.
"""

from __future__ import annotations

from optforge.prune_counts import channels_to_keep, heads_to_remove


def in_features(module) -> int:
    """Input width of an nn.Linear or a Conv1D."""
    from torch import nn

    return module.in_features if isinstance(module, nn.Linear) else int(module.weight.shape[0])


def input_column_norms(module):
    """||W[:, j]||_2 per input feature j (what input j writes to the output), float64 on CPU."""
    from torch import nn

    w = module.weight.detach().float()
    return w.norm(dim=0 if isinstance(module, nn.Linear) else 1).double().cpu()


class ImportanceProbe:
    """`with ImportanceProbe(attn_outs, ffn_outs, head_sizes) as probe:` then, per calibration batch,
    `probe.batch(mask)` ([B, S] real-token mask) before its forward and backward; `probe.scores()` after:
    (head importance [layer][head], FFN channel importance [layer][channel]) as CPU float tensors."""

    def __init__(self, attn_outs: list, ffn_outs: list, head_sizes: list[int]):
        import torch

        self.attn_outs, self.ffn_outs, self.head_sizes = attn_outs, ffn_outs, head_sizes
        self.head_imp = [torch.zeros(in_features(m) // d, dtype=torch.float64) for m, d in zip(attn_outs, head_sizes)]
        self.act_sum = [torch.zeros(in_features(m), dtype=torch.float64) for m in ffn_outs]
        self.tokens = 0
        self._mask = None
        self._handles: list = []

    def batch(self, mask) -> None:
        self._mask = mask
        self.tokens += int(mask.sum())

    def _attn_hook(self, i: int):
        d = self.head_sizes[i]

        def hook(_module, inputs):
            ctx_out = inputs[0]  # [B, S, heads * d]: the heads' context, going into the output projection

            def grad_hook(grad):
                contrib = (ctx_out.detach() * grad).float()  # d L / d xi, split over tokens and dims
                b, s, _ = contrib.shape
                per_example = contrib.reshape(b, s, -1, d).sum(dim=(1, 3))  # [B, heads]
                self.head_imp[i] += per_example.abs().sum(0).double().cpu()
            ctx_out.register_hook(grad_hook)
        return hook

    def _ffn_hook(self, i: int):
        def hook(_module, inputs):
            act = inputs[0]  # [B, S, channels]: the activation, going into the FFN output projection
            m = self._mask.unsqueeze(-1).to(act.dtype)
            self.act_sum[i] += (act.detach().abs() * m).sum(dim=(0, 1)).double().cpu()
        return hook

    def __enter__(self) -> "ImportanceProbe":
        for i, (attn_out, ffn_out) in enumerate(zip(self.attn_outs, self.ffn_outs)):
            self._handles.append(attn_out.register_forward_pre_hook(self._attn_hook(i)))
            self._handles.append(ffn_out.register_forward_pre_hook(self._ffn_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def scores(self) -> tuple[list, list]:
        ffn_imp = [s / max(self.tokens, 1) * input_column_norms(m) for m, s in zip(self.ffn_outs, self.act_sum)]
        return [h.float() for h in self.head_imp], [f.float() for f in ffn_imp]


def layer_plan(head_imp, ffn_imp, head_size: int, heads: float, ffn: float) -> dict:
    """One layer's plan: the heads and FFN channels to keep (original indices, ascending), the most important,
    as many as prune_counts allows for the fractions `heads` and `ffn` (ties keep the lower index), and the
    layer's shape before."""
    import torch

    n_heads, n_ch = head_imp.numel(), ffn_imp.numel()
    keep_h = n_heads - heads_to_remove(n_heads, heads)
    keep_c = channels_to_keep(n_ch, ffn) if ffn > 0 else n_ch
    return {"kept_heads": sorted(torch.argsort(-head_imp, stable=True)[:keep_h].tolist()),
            "kept_channels": sorted(torch.argsort(-ffn_imp, stable=True)[:keep_c].tolist()),
            "heads_before": n_heads, "intermediate_before": n_ch, "head_size": head_size}
