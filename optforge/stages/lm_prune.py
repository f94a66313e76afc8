"""lm_prune (a `prune:<name>` stage of a causal-lm recipe): unstructured or structured pruning, then optionally
`recover` (the pruned model distilled from the teacher, as lm_distill does).

Unstructured (`amount`): L1 pruning. In every projection of the transformer blocks (nn.Linear or GPT-2's
Conv1D; not the embeddings or the LM head) the `amount` fraction of weights with the smallest magnitude is
zeroed, per module; during recovery the masks are re-applied after every optimizer step, so zeros stay zero.

Structured (`heads`, `ffn`; GPT-2 only, optforge.lm.structure — another model type is a RecipeError naming
the supported ones): per block, the least important `heads` fraction of attention heads (their q, k and v
features of the fused c_attn and their input features of attn.c_proj) and `ffn` fraction of MLP channels
(c_fc's output and mlp.c_proj's input features) are removed, so the projections really shrink. Importance is
the classifier prune's (stages/prune.py's docstring; hooks in optforge.importance), measured on train blocks
(`CALIBRATION_TOKENS` tokens of `data.max_length` blocks, a seeded draw) with the summed next-token
cross-entropy as the loss, each block its own example: a head scores sum over blocks |d L / d gate|, a channel
its mean |activation| times the norm of its output weights. Counts (optforge/prune_counts.py): every block
loses round(heads * H) heads, keeping at least one, and keeps I - round(ffn * I) channels, rounded to a
multiple of 16; a fraction that would remove nothing is a StageFailure. Which heads and channels go is
chosen per block. The saved config describes an FFN-only prune (`n_inner`); removed heads are recorded in
optforge_model.json's "pruned_layers" (optforge.lm.model's docstring says how that loads).

Metrics: structured adds params before/after, heads and FFN channels before/after and the fractions removed,
per layer the heads (original indices) and channel count removed, and the calibration loss before and after
pruning (and after recovery).
"""

from __future__ import annotations

from optforge.errors import RecipeError, StageFailure
from optforge.recipe import PruneParams
from optforge.stages.base import StageContext, StageKind

CALIBRATION_TOKENS = 16384  # train tokens that score heads and channels (whole blocks, at least one)
CALIBRATION_BATCH = 4


def prunable(model) -> list:
    """(name, module) of the projections pruning zeroes: 2-d weights outside the embeddings and LM head."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and id(m) not in skip]


def l1_masks(model, amount: float) -> dict:
    """{module name: bool mask of the weights kept}: per module, the `amount` fraction of smallest |w| dropped."""
    import torch

    masks = {}
    for name, module in prunable(model):
        w = module.weight.detach().abs().flatten()
        k = int(round(amount * w.numel()))
        if k == 0:
            continue
        threshold = torch.kthvalue(w.float(), k).values
        masks[name] = module.weight.detach().abs() > threshold
    return masks


def apply_masks(model, masks: dict) -> None:
    import torch

    with torch.no_grad():
        for name, mask in masks.items():
            model.get_submodule(name).weight.mul_(mask)


def run(ctx: StageContext) -> dict:
    from optforge.lm import model as lm_model
    from optforge.lm.train import train_blocks, train_lm

    spec: PruneParams = ctx.params
    model, tokenizer, meta = lm_model.load_float(ctx.inputs["model"])
    after_step = None
    train = None
    if spec.method == "structured":
        check_structured(ctx, model)
        train = train_blocks(tokenizer, ctx.inputs["data"], int(meta["max_length"]))
        calib = calibration_blocks(train)
        metrics = prune_structured(ctx, model, calib)
        source = f" (pruned heads {spec.heads:.0%}, FFN {spec.ffn:.0%})"
    else:
        masks = l1_masks(model, spec.amount)
        if not masks:
            raise StageFailure(f"amount {spec.amount} zeroes no weight of any projection")
        apply_masks(model, masks)
        metrics = {"method": "unstructured", "amount": spec.amount, "modules_pruned": len(masks)}
        source = f" (pruned {spec.amount:.0%})"
    if spec.recover is not None:
        teacher, _, _ = lm_model.load_float(ctx.inputs["teacher"])
        data = train if train is not None else train_blocks(tokenizer, ctx.inputs["data"], int(meta["max_length"]))
        if spec.method == "unstructured":
            masks = {n: m.to(ctx.device) for n, m in masks.items()}
            after_step = lambda: apply_masks(model, masks)  # noqa: E731
        stats = train_lm(model, data, spec.recover, ctx.device, teacher=teacher,
                         temperature=spec.recover.temperature, alpha=spec.recover.alpha, bar=ctx.bar,
                         desc="prune recovery", after_step=after_step)
        metrics.update({f"recover_{k}": v for k, v in stats.items()})
        if spec.method == "structured":
            metrics["calibration_loss_after_recovery"] = calibration_loss(model, calib, ctx.device)
    if spec.method == "unstructured":
        weights = [m.weight for _, m in prunable(model)]
        total = sum(w.numel() for w in weights)
        zeros = sum(int((w == 0).sum()) for w in weights)
        metrics["sparsity"] = zeros / total
        ctx.log(f"{ctx.name}: {len(masks)} projections pruned, sparsity {metrics['sparsity']:.3f}")
    lm_model.save_float(model.cpu(), tokenizer, {"max_length": meta["max_length"],
                                                 "source": meta.get("source", "model") + source}, ctx.out)
    return metrics


KIND = StageKind(kind="lm_prune", version="1", params_model=PruneParams, run=run, task="causal-lm")


# --------------------------------------------------------------------------- structured


def check_structured(ctx: StageContext, model) -> None:
    """RecipeError at `prune` (naming the entry) for a model type structured pruning does not know."""
    from optforge.lm.structure import supports_structured, unsupported

    model_type = model.config.model_type
    if not supports_structured(model_type):
        entry = ctx.name.partition(":")[2]
        raise RecipeError((f"entry {entry!r}: " if entry else "") + unsupported(model_type).reason, ("prune",))


def calibration_blocks(blocks, seed: int = 0):
    """A seeded draw of whole blocks ([n, length]) worth about CALIBRATION_TOKENS tokens, in stream order."""
    import random

    n = max(1, min(len(blocks), CALIBRATION_TOKENS // blocks.shape[1]))
    idx = list(range(len(blocks)))
    random.Random(seed).shuffle(idx)
    return blocks[sorted(idx[:n])]


def importance_scores(model, calib, device) -> tuple[list, list, float]:
    """(head importance [layer][head], FFN channel importance [layer][channel], mean next-token loss) on the
    calibration blocks; see the module docstring."""
    import torch

    from optforge.importance import ImportanceProbe
    from optforge.lm.structure import blocks, head_dim
    from optforge.lm.train import lm_loss

    layers = blocks(model)
    probe = ImportanceProbe([b.attn.c_proj for b in layers], [b.mlp.c_proj for b in layers],
                            [head_dim(model)] * len(layers))
    model.to(device).eval()
    total = 0.0
    try:
        with torch.enable_grad(), probe:
            for i in range(0, len(calib), CALIBRATION_BATCH):
                ids = calib[i:i + CALIBRATION_BATCH].to(device)
                probe.batch(torch.ones_like(ids))
                loss = lm_loss(model(ids).logits, ids, reduction="sum")  # per block: its own gradient
                loss.backward()
                total += loss.item()
    finally:
        model.zero_grad(set_to_none=True)
    heads, ffn = probe.scores()
    return heads, ffn, total / (calib.numel() - len(calib))


def calibration_loss(model, calib, device) -> float:
    """Mean next-token cross-entropy of `model` on the calibration blocks."""
    import torch

    from optforge.lm.train import lm_loss

    model.to(device).eval()
    total = 0.0
    with torch.inference_mode():
        for i in range(0, len(calib), CALIBRATION_BATCH):
            ids = calib[i:i + CALIBRATION_BATCH].to(device)
            total += lm_loss(model(ids).logits, ids, reduction="sum").item()
    return total / (calib.numel() - len(calib))


def check_removes_something(plan: list[dict], heads: float, ffn: float) -> None:
    """StageFailure when a fraction asked for removes nothing at this model's sizes (prune_counts' rounding)."""
    h, i = plan[0]["heads_before"], plan[0]["intermediate_before"]
    if heads > 0 and all(len(p["kept_heads"]) == p["heads_before"] for p in plan):
        fix = "set heads: 0" if h == 1 else f"use heads > {0.5 / h:.3g}, or heads: 0"
        raise StageFailure(f"heads: {heads} removes no head of a block of {h} (round({heads} x {h}) heads go, and "
                           f"every block keeps at least one); {fix}")
    if ffn > 0 and all(len(p["kept_channels"]) == p["intermediate_before"] for p in plan):
        raise StageFailure(f"ffn: {ffn} removes no FFN channel of a block of {i} (the kept count is rounded to a "
                           f"multiple of 16); raise it, or set ffn: 0")


def prune_structured(ctx: StageContext, model, calib) -> dict:
    """Score, plan, check and shrink every block in place; the metrics (module docstring)."""
    from optforge.importance import layer_plan
    from optforge.lm.structure import blocks, head_dim, shrink_block
    from optforge.prune_counts import removed_fractions
    from optforge.stages.prune import param_stats
    from optforge.training import configure_threads

    spec: PruneParams = ctx.params
    configure_threads()
    params_before = param_stats(model)["params"]
    head_imp, ffn_imp, loss_before = importance_scores(model, calib, ctx.device)
    d = head_dim(model)
    plan = [layer_plan(hi, fi, d, spec.heads, spec.ffn) for hi, fi in zip(head_imp, ffn_imp)]
    check_removes_something(plan, spec.heads, spec.ffn)
    for block, p in zip(blocks(model), plan):
        shrink_block(block, p["kept_heads"], p["kept_channels"], d)
    pruned = [{"heads": len(p["kept_heads"]), "head_size": d, "intermediate": len(p["kept_channels"])} for p in plan]
    metrics = {"method": "structured", "heads": spec.heads, "ffn": spec.ffn, "params_before": params_before,
               "params_after": param_stats(model)["params"], "calibration_blocks": len(calib),
               "calibration_loss_before": loss_before,
               "calibration_loss_after_prune": calibration_loss(model, calib, ctx.device)}
    metrics.update(removed_fractions(pruned, before_shapes=plan))
    metrics["removed_per_layer"] = [
        {"heads": sorted(set(range(p["heads_before"])) - set(p["kept_heads"])),
         "channels": p["intermediate_before"] - len(p["kept_channels"])} for p in plan]
    ctx.log(f"{ctx.name}: params {params_before:,} -> {metrics['params_after']:,}, heads "
            f"{metrics['heads_before']} -> {metrics['heads_after']}, FFN channels {metrics['ffn_before']} -> "
            f"{metrics['ffn_after']}, calibration loss {loss_before:.3f} -> "
            f"{metrics['calibration_loss_after_prune']:.3f}")
    return metrics
