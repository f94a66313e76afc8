"""lm_prune (a `prune:<name>` stage of a causal-lm recipe): unstructured L1 pruning. In every projection of the
transformer blocks (nn.Linear or GPT-2's Conv1D; not the embeddings or the LM head) the `amount` fraction of
weights with the smallest magnitude is zeroed, per module. With `recover`, the pruned model is then distilled
from the teacher with the zeros held (the masks re-applied after every optimizer step). Structured pruning of
a causal LM is refused by the recipe (not implemented)."""

from __future__ import annotations

from optforge.errors import StageFailure
from optforge.recipe import PruneParams
from optforge.stages.base import StageContext, StageKind


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
    if spec.method != "unstructured":
        raise StageFailure("causal-LM pruning is unstructured only")
    model, tokenizer, meta = lm_model.load_float(ctx.inputs["model"])
    masks = l1_masks(model, spec.amount)
    if not masks:
        raise StageFailure(f"amount {spec.amount} zeroes no weight of any projection")
    apply_masks(model, masks)
    metrics: dict = {"method": "unstructured", "amount": spec.amount, "modules_pruned": len(masks)}
    if spec.recover is not None:
        teacher, _, _ = lm_model.load_float(ctx.inputs["teacher"])
        data = train_blocks(tokenizer, ctx.inputs["data"], int(meta["max_length"]))
        masks = {n: m.to(ctx.device) for n, m in masks.items()}
        stats = train_lm(model, data, spec.recover, ctx.device, teacher=teacher,
                         temperature=spec.recover.temperature, alpha=spec.recover.alpha, bar=ctx.bar,
                         desc="prune recovery", after_step=lambda: apply_masks(model, masks))
        metrics.update({f"recover_{k}": v for k, v in stats.items()})
    weights = [m.weight for _, m in prunable(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    metrics["sparsity"] = zeros / total
    ctx.log(f"{ctx.name}: {len(masks)} projections pruned, sparsity {metrics['sparsity']:.3f}")
    lm_model.save_float(model.cpu(), tokenizer, {"max_length": meta["max_length"],
                                                 "source": meta.get("source", "model") + f" (pruned {spec.amount:.0%})"},
                        ctx.out)
    return metrics


KIND = StageKind(kind="lm_prune", version="1", params_model=PruneParams, run=run, task="causal-lm")
