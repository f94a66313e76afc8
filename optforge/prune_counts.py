"""How much a structured prune removes, on plain numbers (no torch): heads and FFN channels kept per
layer, and the fractions the prune stage reports. The rules are in stages/prune.py's docstring."""

from __future__ import annotations

FFN_ALIGN = 16  # packed int8/int4 CPU kernels want N % 16 == 0


def heads_to_remove(n_heads: int, fraction: float) -> int:
    """round(fraction * n_heads), keeping at least one head."""
    return min(round(fraction * n_heads), n_heads - 1)


def channels_to_keep(n: int, fraction: float, align: int = FFN_ALIGN) -> int:
    """n - round(fraction * n), rounded to a multiple of `align` (at least `align`) when n is one; at least 1."""
    keep = n - round(fraction * n)
    if n % align == 0 and n >= align:
        keep = max(align, min(n, align * round(keep / align)))
    return max(1, keep)


def removed_fractions(pruned_layers: list[dict], before_shapes: list[dict]) -> dict:
    """Heads and FFN channels before/after over all layers and the fractions removed, from the per-layer
    plan (`heads_before`, `intermediate_before`) and the shrunk layers (`heads`, `intermediate`)."""
    heads_before = sum(p["heads_before"] for p in before_shapes)
    ch_before = sum(p["intermediate_before"] for p in before_shapes)
    return {"heads_before": heads_before, "heads_after": sum(p["heads"] for p in pruned_layers),
            "heads_removed_fraction": 1 - sum(p["heads"] for p in pruned_layers) / heads_before,
            "ffn_before": ch_before, "ffn_after": sum(p["intermediate"] for p in pruned_layers),
            "ffn_removed_fraction": 1 - sum(p["intermediate"] for p in pruned_layers) / ch_before,
            "pruned_layers": [{k: v for k, v in p.items() if k != "kept_heads"} for p in pruned_layers]}
