"""prune: make a float model sparser (unstructured) or physically smaller (structured), then optionally
recover accuracy by distilling from the teacher. Writes a float artifact (`modeling.save_classifier`).

Unstructured (`amount`): L1-magnitude pruning of the weight of every nn.Linear of the encoder's
transformer blocks (Q/K/V/O, FFN in/out; not the embeddings or ELECTRA's embedding projection, not a
pooler, not the head), layer by layer (`torch.nn.utils.prune.l1_unstructured`: each weight loses exactly round(amount * numel) entries), kept
as a mask during recovery so zeros stay zero, then made permanent with `prune.remove` (no
`weight_orig`/`weight_mask`/hooks remain). Dense kernels do not get faster from zeros: this is about
size after compression and about what a sparse kernel could do, and the metrics say how sparse.

Structured (`heads`, `ffn`): per layer, remove the least important fraction of attention heads and of
FFN channels, and shrink the Linear layers for real (Q/K/V rows and the attention-output columns of a
head; intermediate rows and FFN-output columns of a channel), so parameters and FLOPs really drop.

Importance, measured on a calibration set (`CALIBRATION` train sentences, fixed seed):
  - head h of layer l (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"):
      I_h = sum_x | dL(x)/d xi_h |   with xi_h a gate on the head's context output, at xi = 1.
    No gate module is needed: dL/d xi_h = sum over tokens and the head's dims of (context * dL/dcontext),
    read from a forward pre-hook on the attention-output Linear (its input is the heads' context,
    [B, S, heads * d]) and a gradient hook on that tensor. The loss is the summed per-example
    cross-entropy on the true labels, so each example's term is its own gradient (an encoder in eval mode
    treats examples independently), as in the paper (per example, not per batch).
  - FFN channel j of layer l:  I_j = mean over real (non-pad) tokens |act(x W_in + b)_j| * ||W_out[:, j]||_2
    (the expected magnitude of what channel j writes into the residual stream), the activation read by a
    forward pre-hook on the FFN-output Linear.
Both hooks sit on Linears every supported family has (optforge.arch: BERT, DistilBERT, RoBERTa,
XLM-RoBERTa, ELECTRA), so nothing depends on what a family's attention or FFN module returns.
A model type without an adapter is a RecipeError for the prune entry before any work.
Counts (optforge/prune_counts.py, pure): a layer of H heads loses round(heads * H) of them, keeping at
least one. A layer of I channels keeps I - round(ffn * I) channels, rounded to a multiple of 16 when I is
one (packed int8/int4 CPU kernels want N % 16 == 0), keeping at least 16; the metrics report the real
fractions removed.

A structurally pruned model has a different width per layer. `modeling.load_classifier` rebuilds each
Linear from the shapes in model.safetensors; head.json additionally records, under "pruned_layers", one
entry per layer: {"heads": int, "head_size": int, "intermediate": int, "kept_heads": [original indices]}.
"""

from __future__ import annotations

import json
import random

from optforge.errors import RecipeError
from optforge.prune_counts import removed_fractions
from optforge.recipe import PruneParams
from optforge.stages.base import StageContext, StageKind

CALIBRATION = 256  # train sentences used to score heads and channels
CALIBRATION_BATCH = 32


def run(ctx: StageContext) -> dict:
    import torch

    from optforge import arch, modeling, tokens, training
    from optforge.artifacts.runnable import flops_per_token
    from optforge.stages.data import Splits

    params: PruneParams = ctx.params
    data = Splits(ctx.inputs["data"], ctx.input_metrics.get("data"))
    model, tokenizer, meta = modeling.load_classifier(ctx.inputs["model"])
    try:
        arch.adapter_for(model, f"{params.method} pruning")
    except arch.UnsupportedArchitecture as e:
        entry = ctx.name.partition(":")[2]
        raise RecipeError((f"entry {entry!r}: " if entry else "") + e.reason, ("prune",)) from None
    model = model.float().to(ctx.device).eval()
    training.configure_threads()
    pad_id = tokenizer.pad_token_id or 0
    seq = data.max_length
    eval_ids = tokens.tokenize(tokenizer, data.eval_texts, data.max_length)

    before = param_stats(model)
    metrics: dict = {"method": params.method, "params_before": before["params"],
                     "nonzero_before": before["nonzero"],
                     "flops_per_token_before": flops_per_token(model, seq), "flops_seq_len": seq}
    metrics["accuracy_before"] = training.evaluate_model(model, eval_ids, data.eval_labels, pad_id, ctx.device,
                                                         bar=ctx.bar, desc="evaluate before")["accuracy"]

    pruned_layers = None
    if params.method == "unstructured":
        targets = encoder_linears(model)
        mask_linears(targets, params.amount)
    else:
        calib = calibration_set(tokenizer, data, CALIBRATION, seed=0)
        heads_imp, ffn_imp = importance_scores(model, calib, pad_id, ctx.device)
        plan = structured_plan(model, heads_imp, ffn_imp, params.heads, params.ffn)
        pruned_layers = shrink(model, plan)
        metrics.update(removed_fractions(pruned_layers, before_shapes=plan))

    metrics["accuracy_after_prune"] = training.evaluate_model(model, eval_ids, data.eval_labels, pad_id, ctx.device,
                                                              bar=ctx.bar, desc="evaluate pruned")["accuracy"]
    if params.recover is not None:
        metrics.update(recover(ctx, model, tokenizer, data, params.recover))
        metrics["accuracy_after_recovery"] = training.evaluate_model(
            model, eval_ids, data.eval_labels, pad_id, ctx.device, bar=ctx.bar, desc="evaluate recovered")["accuracy"]
    if params.method == "unstructured":
        make_permanent(targets)
        metrics.update(sparsity_stats(targets))

    after = param_stats(model)
    metrics.update({"params_after": after["params"], "nonzero_after": after["nonzero"],
                    "sparsity_all": 1 - after["nonzero"] / after["params"],
                    "flops_per_token_after": flops_per_token(model, seq)})
    metrics["accuracy"] = metrics.get("accuracy_after_recovery", metrics["accuracy_after_prune"])

    source = meta.get("source", "model") + (f" + prune {params.method}")
    with torch.no_grad():
        modeling.save_classifier(model.cpu(), tokenizer, {"max_length": meta["max_length"], "source": source},
                                 ctx.out)
    if pruned_layers is not None:
        head_path = ctx.out / modeling.HEAD
        head = json.loads(head_path.read_text())
        head["pruned_layers"] = pruned_layers
        head_path.write_text(json.dumps(head, indent=2, sort_keys=True) + "\n")
    ctx.log(f"{ctx.name}: params {before['params']:,} -> {after['params']:,}, nonzero {before['nonzero']:,} -> "
            f"{after['nonzero']:,}, accuracy {metrics['accuracy_before']:.4f} -> {metrics['accuracy']:.4f}")
    return metrics


KIND = StageKind(kind="prune", version="2", params_model=PruneParams, run=run)


# --------------------------------------------------------------------------- counting


def param_stats(model) -> dict:
    import torch

    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    return {"params": total, "nonzero": nonzero}


def encoder_linears(model) -> list:
    """The Linears of the encoder's transformer blocks (Q/K/V/O, FFN in/out; optforge.arch): not the
    embeddings or an embedding projection, not a pooler, not the classification head."""
    from optforge import arch

    return arch.adapter_for(model, "unstructured pruning").layer_linears(arch.encoder_of(model))


# --------------------------------------------------------------------------- unstructured


def mask_linears(linears: list, amount: float) -> None:
    """Zero the round(amount * numel) smallest-|w| entries of each weight, as a mask (weight_orig * mask)."""
    from torch.nn.utils import prune

    for m in linears:
        prune.l1_unstructured(m, "weight", amount=amount)


def make_permanent(linears: list) -> None:
    from torch.nn.utils import prune

    for m in linears:
        if prune.is_pruned(m):
            prune.remove(m, "weight")


def sparsity_stats(linears: list) -> dict:
    total = sum(m.weight.numel() for m in linears)
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    return {"pruned_weights": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0}


# --------------------------------------------------------------------------- structured: importance


def calibration_set(tokenizer, data, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """(token ids, labels) of `n` train examples drawn with a fixed seed."""
    from optforge import tokens

    idx = list(range(len(data.train_texts)))
    random.Random(seed).shuffle(idx)
    idx = sorted(idx[:n])
    ids = tokens.tokenize(tokenizer, [data.train_texts[i] for i in idx], data.max_length)
    return ids, [data.train_labels[i] for i in idx]


def importance_scores(model, calib, pad_id: int, device) -> tuple[list, list]:
    """(head importance [layer][head], FFN channel importance [layer][channel]) as CPU float tensors.
    See the module docstring for the definitions (optforge.importance holds the hooks)."""
    import torch
    import torch.nn.functional as F

    from optforge import arch
    from optforge.batching import sorted_batches
    from optforge.importance import ImportanceProbe
    from optforge.tokens import pad_batch

    ids, labels = calib
    adapter = arch.adapter_for(model, "structured pruning")
    layers = adapter.layers(arch.encoder_of(model))
    probe = ImportanceProbe([adapter.linear(layer, "attn_out") for layer in layers],
                            [adapter.linear(layer, "ffn_out") for layer in layers],
                            [adapter.head_size(layer) for layer in layers])
    model.eval()
    labels_t = torch.tensor(labels, dtype=torch.long)
    try:
        with torch.enable_grad(), probe:
            for batch in sorted_batches([len(s) for s in ids], CALIBRATION_BATCH):
                input_ids, mask = pad_batch([ids[j] for j in batch], pad_id)
                input_ids, mask = input_ids.to(device), mask.to(device)
                probe.batch(mask)
                logits = model(input_ids, mask).float()
                loss = F.cross_entropy(logits, labels_t[batch].to(device), reduction="sum")
                loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
    return probe.scores()


# --------------------------------------------------------------------------- structured: shrinking


def structured_plan(model, head_imp: list, ffn_imp: list, heads: float, ffn: float) -> list[dict]:
    """Per layer: the original head indices and FFN channel indices to keep (ascending), by importance."""
    from optforge import arch
    from optforge.importance import layer_plan

    adapter = arch.adapter_for(model, "structured pruning")
    return [layer_plan(hi, fi, adapter.head_size(layer), heads, ffn)
            for layer, hi, fi in zip(adapter.layers(arch.encoder_of(model)), head_imp, ffn_imp)]


def shrink(model, plan: list[dict]) -> list[dict]:
    """Apply `plan` in place: new, smaller nn.Linear layers holding the kept rows/columns. Returns the
    per-layer "pruned_layers" metadata written into head.json."""
    import torch
    from transformers.pytorch_utils import prune_linear_layer

    from optforge import arch

    adapter = arch.adapter_for(model, "structured pruning")
    out = []
    for layer, p in zip(adapter.layers(arch.encoder_of(model)), plan):
        d = p["head_size"]
        if len(p["kept_heads"]) < p["heads_before"]:
            rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in p["kept_heads"]])
            for role in ("query", "key", "value"):
                adapter.set_linear(layer, role, prune_linear_layer(adapter.linear(layer, role), rows, dim=0))
            adapter.set_linear(layer, "attn_out", prune_linear_layer(adapter.linear(layer, "attn_out"), rows, dim=1))
            adapter.set_attention_width(layer, len(rows))
        if len(p["kept_channels"]) < p["intermediate_before"]:
            ch = torch.tensor(p["kept_channels"])
            adapter.set_linear(layer, "ffn_in", prune_linear_layer(adapter.linear(layer, "ffn_in"), ch, dim=0))
            adapter.set_linear(layer, "ffn_out", prune_linear_layer(adapter.linear(layer, "ffn_out"), ch, dim=1))
        out.append({"heads": len(p["kept_heads"]), "head_size": d,
                    "intermediate": len(p["kept_channels"]), "kept_heads": list(p["kept_heads"])})
    return out


# --------------------------------------------------------------------------- recovery


def recover(ctx: StageContext, model, tokenizer, data, spec) -> dict:
    """Distill from the teacher into the pruned model (the teacher_logits stage's logits, as `distill`).
    Unstructured masks are still attached here, so pruned weights stay zero while the rest trains."""
    from optforge import training
    from optforge.stages import teacher_logits

    if "logits" not in ctx.inputs:
        raise ValueError("prune with `recover` needs a logits input (graph.build_graph wires it)")
    logits = teacher_logits.load(ctx.inputs["logits"], len(data.train_labels))
    stats = training.distill(model, tokenizer, logits, data, spec, ctx.device, bar=ctx.bar, desc="prune recovery")
    model.eval()
    return {"recovery": stats}
