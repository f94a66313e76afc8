"""The training loop shared by teacher fine-tuning, distillation and prune recovery.

Reads top to bottom: tokenize once -> length-bucketed batches padded to each batch's longest ->
AdamW with linear warmup/decay -> (cross-entropy | distillation) loss -> evaluate.
Which examples share a batch is `optforge.batching`; texts -> ids -> padded tensors is `optforge.tokens`.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from optforge.batching import length_bucketed_batches, shard_batch, sorted_batches
from optforge.metrics import classification_metrics
from optforge.tokens import pad_batch, tokenize

# --------------------------------------------------------------------------- threads & seeds


def configure_threads() -> int:
    """Use every core this process may run on for intra-op parallelism (torch's default can be fewer).

    $OPTFORGE_THREADS overrides: on a machine whose cores other jobs are also using, fewer threads are
    much faster (measured on a shared 2-core box: 1 thread trained a 3-layer H384 encoder 2.5-4x faster
    than 2 threads, because every parallel op waits for its preempted sibling thread)."""
    env = os.environ.get("OPTFORGE_THREADS", "").strip()
    if env:
        n = max(1, int(env))
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0)) or 1
    else:
        n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------- losses & optimizer


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float) -> torch.Tensor:
    """alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, y).

    The T^2 factor keeps the soft-target gradients on the same scale as the hard-label ones (Hinton et al.)."""
    T = temperature
    soft = F.kl_div(F.log_softmax(student_logits / T, dim=-1), F.softmax(teacher_logits / T, dim=-1),
                    reduction="batchmean") * (T * T)
    hard = F.cross_entropy(student_logits, labels)
    return alpha * soft + (1 - alpha) * hard


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, exclude: tuple = (),
                   scales: Optional[dict[int, float]] = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters (but `exclude`); no weight decay on biases and LayerNorm weights
    (1-d tensors); `scales` (layer_lr_scales): a parameter's lr factor, 1 if absent. The fused kernel on CUDA
    and on CPU (one pass over each parameter: on a 2-core Xeon about 10% faster steps than the multi-tensor
    one, more with the word embeddings trained)."""
    skip, scales = {id(p) for p in exclude}, scales or {}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    groups: dict[tuple[float, bool], list] = {}
    for p in params:
        groups.setdefault((scales.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr * scale, "weight_decay": weight_decay if decayed else 0.0}
                              for (scale, decayed), ps in groups.items()], lr=lr, fused=True)


def word_embeddings(model: nn.Module) -> list[nn.Embedding]:
    """The trainable word-embedding tables (`*word_embeddings` nn.Embedding modules) of `model`."""
    return [m for name, m in model.named_modules()
            if name.endswith("word_embeddings") and isinstance(m, nn.Embedding) and m.weight.requires_grad]


def layer_lr_scales(model: nn.Module, decay: Optional[float]) -> dict[int, float]:
    """id(parameter) -> its learning-rate factor under layer-wise decay `decay` (TrainSpec.layer_lr_decay):
    transformer layer i of L gets decay^(L - i); the rest of the encoder below the layers (embeddings, an
    embedding projection) decay^(L + 1); the pooler and the head 1. Empty when `decay` is None or 1."""
    if decay is None or decay == 1:
        return {}
    from optforge import arch

    adapter = arch.adapter_for(model, "layer-wise learning-rate decay")
    encoder = arch.encoder_of(model)
    layers = adapter.layers(encoder)
    pooler = adapter.pooler_module(encoder)
    scales = {id(p): 1.0 for p in (pooler.parameters() if pooler is not None else ())}
    for i, layer in enumerate(layers):
        scales.update((id(p), decay ** (len(layers) - i)) for p in layer.parameters())
    for p in encoder.parameters():
        scales.setdefault(id(p), decay ** (len(layers) + 1))
    return scales


def make_optimizers(model: nn.Module, spec) -> list[torch.optim.Optimizer]:
    """The optimizers of a training run: AdamW over everything, or with `spec.embedding_grad == "sparse"`
    AdamW over everything but the trained word-embedding tables, which get sparse gradients (only the rows
    of the batch's tokens) and torch.optim.SparseAdam. Measured with MiniLM's 30522-row table trained (bf16
    autocast, batch 64): on the 2-core Xeon a 3-layer student's step 18% faster, the 6-layer teacher's
    within noise; on an H100 both 15-20% slower (README "Choosing the defaults")."""
    tables = word_embeddings(model) if getattr(spec, "embedding_grad", None) == "sparse" else []
    for table in tables:
        table.sparse = True
    scales = layer_lr_scales(model, getattr(spec, "layer_lr_decay", None))
    optimizers: list[torch.optim.Optimizer] = [
        make_optimizer(model, spec.lr, spec.weight_decay, exclude=tuple(t.weight for t in tables), scales=scales)]
    if tables:
        optimizers.append(torch.optim.SparseAdam(
            [{"params": [t.weight], "lr": spec.lr * scales.get(id(t.weight), 1.0)} for t in tables], lr=spec.lr))
    return optimizers


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (total 2-norm over all gradients) that also takes sparse gradients
    (a sparse embedding table's: coalesced, its values scaled)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not any(p.grad.is_sparse for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    for p in params:
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
    values = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in values]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for v in values:
        v.mul_(coef)
    return total


class TailAverage:
    """TrainSpec.average_last: the running mean of the trainable weights after evenly spaced steps of the last
    `fraction` of `total` steps (at most SNAPSHOTS of them, the last step included), put into the model by
    `apply`. Snapshot steps are counted back from the last one, so the last step is always one of them."""

    SNAPSHOTS = 20

    def __init__(self, model: nn.Module, fraction: Optional[float], total: int):
        self.params = [p for p in model.parameters() if p.requires_grad] if fraction else []
        tail = max(1, round(fraction * total)) if fraction else 0
        self.first, self.every = total - tail + 1, max(1, math.ceil(tail / self.SNAPSHOTS))
        self.total, self.count, self.sums = total, 0, None

    def after_step(self, step: int) -> None:
        """`step`: optimizer steps done so far (1..total)."""
        if not self.params or step < self.first or (self.total - step) % self.every:
            return
        with torch.no_grad():
            weights = [p.detach().float() for p in self.params]
            if self.sums is None:
                self.sums = [w.clone() for w in weights]
            else:
                torch._foreach_add_(self.sums, weights)
        self.count += 1

    def apply(self) -> int:
        """Put the mean into the model; how many snapshots it averages (0: nothing done)."""
        if self.sums is not None:
            with torch.no_grad():
                for p, total in zip(self.params, self.sums):
                    p.copy_(total / self.count)
        return self.count


def linear_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to lr over `warmup_steps`, then linear decay to 0 at `total_steps`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def freeze_word_embeddings(model: nn.Module) -> int:
    """Stop training the word-embedding table (vocab x hidden: its AdamW update dominates a CPU step).
    Returns the number of frozen parameters."""
    frozen = 0
    for name, p in model.named_parameters():
        if name.endswith("word_embeddings.weight"):
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen


# --------------------------------------------------------------------------- train / predict

LOSS_EVERY = 50  # CUDA: read the losses back (a host-device sync) once per this many steps


def no_cudnn_attention():
    """A context in which scaled_dot_product_attention never picks the cuDNN backend.

    Training batches change shape every step (length bucketing), and cuDNN's attention builds an
    execution plan per new shape on the host: profiled on an H200 (torch 2.11, bf16 autocast, MiniLM-L6,
    batch 32), its forward cost 2.5 ms and its backward 6.2 ms of CPU time per call, six calls per step:
    70% of the profiled step's CPU time.
    The memory-efficient and flash kernels have no such per-shape setup."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def train(model: nn.Module, ids: list[list[int]], labels: list[int], spec, device: str, pad_id: int,
          teacher_logits: Optional[torch.Tensor] = None, temperature: float = 1.0, alpha: float = 0.0,
          bar: Optional[Callable] = None, desc: str = "train", rank=None) -> dict:
    """Train `model` in place on pre-tokenized examples with a TrainSpec/DistillSpec `spec`.

    With `teacher_logits` ([N, C], row i = example i) the loss is `distillation_loss`, else cross-entropy.
    Fractional epochs are allowed: training stops after ceil(epochs * batches_per_epoch) steps.
    `spec.devices` > 1 (or $OPTFORGE_TRAIN_DEVICES): the same training data-parallel in that many processes
    (optforge.distributed), each calling this with its `rank` (a distributed.Rank): it trains on its
    share of every batch (batching.shard_batch) through DDP; the batches and steps are the same."""
    if rank is None:
        from optforge import distributed
        from optforge.errors import OptforgeError

        n = distributed.requested_devices(spec)
        if n > 1 and getattr(spec, "embedding_grad", None) == "sparse":
            raise OptforgeError(f"embedding_grad: sparse trains on one device only, but {n} devices were asked "
                                f"for ($OPTFORGE_TRAIN_DEVICES or `devices`)")
        if n > 1:
            return distributed.train_data_parallel(n, train, bar, dict(
                model=model, ids=ids, labels=labels, spec=spec, device=device, pad_id=pad_id,
                teacher_logits=teacher_logits, temperature=temperature, alpha=alpha, desc=desc))
    configure_threads()
    set_seed(spec.seed + (rank.index if rank is not None else 0))  # dropout: each rank its own masks
    model.to(device).train()
    if spec.freeze_embeddings:
        freeze_word_embeddings(model)
    optimizers = make_optimizers(model, spec)
    per_epoch = math.ceil(len(ids) / spec.batch_size)
    total = max(1, math.ceil(spec.epochs * per_epoch))
    schedulers = [linear_schedule(o, int(spec.warmup * total), total) for o in optimizers]
    average = TailAverage(model, getattr(spec, "average_last", None), total)
    lengths = [len(s) for s in ids]
    rng = random.Random(spec.seed)
    labels_t = torch.tensor(labels, dtype=torch.long)

    cuda = torch.device(device).type == "cuda"
    use_bf16 = autocast_bf16(getattr(spec, "precision", None), cuda)
    # On CUDA nothing in the loop waits for the GPU: batches are copied from pinned memory without
    # blocking, labels and teacher logits live on the device, and the loss is read back every
    # LOSS_EVERY steps, so the host queues step n+1 while the GPU runs step n.
    labels_t = labels_t.to(device)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(device)

    forward = model if rank is None else rank.wrap(model, device)
    progress = bar(total=total, desc=desc) if bar is not None else None
    losses: list[float] = []
    pending: list[torch.Tensor] = []
    steps = seen = 0
    start = time.perf_counter()
    warm: list = []  # (time, examples) at the first loss read-back: what `warm_examples_per_s` counts from

    def drain():
        if pending:
            stacked = torch.stack(pending).float()
            losses.extend((stacked if rank is None else rank.mean(stacked)).cpu().tolist())
            warm[:] = warm or [time.perf_counter(), seen]
            if progress is not None:  # what the loop knows and the bar does not: examples/s and the loss
                elapsed = time.perf_counter() - start
                progress.set_postfix({**({"ex/s": seen / elapsed} if elapsed > 0 else {}),
                                      "loss": f"{sum(losses[-10:]) / len(losses[-10:]):.4f}"})
                progress.update(len(pending))
            pending.clear()

    with no_cudnn_attention() if cuda else contextlib.nullcontext():
        while steps < total:
            for batch in length_bucketed_batches(lengths, spec.batch_size, rng):
                if steps == total:
                    break
                rows, weight = (batch, 1.0) if rank is None else shard_batch(batch, rank.index, rank.world)
                input_ids, mask = pad_batch([ids[i] for i in rows], pad_id)
                if cuda:
                    input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
                input_ids = input_ids.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                index = torch.tensor(rows, dtype=torch.long)
                index = (index.pin_memory() if cuda else index).to(device, non_blocking=True)
                y = labels_t[index]
                with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    logits = forward(input_ids, mask)
                logits = logits.float()
                if teacher_logits is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    loss = distillation_loss(logits, teacher_logits[index], y, temperature, alpha)
                if rank is not None:
                    loss = loss * weight
                loss.backward()
                clip_grad_norm(model, 1.0)
                for optimizer, scheduler in zip(optimizers, schedulers):
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                pending.append(loss.detach())
                steps += 1
                average.after_step(steps)
                seen += len(batch)
                if len(pending) == LOSS_EVERY or steps == total or not cuda:
                    drain()
    drain()
    elapsed = time.perf_counter() - start
    if progress is not None:
        progress.close()
    averaged = average.apply()
    for table in word_embeddings(model):
        table.sparse = False  # a training-time choice: the saved and evaluated model is the usual one
    model.eval()
    tail = losses[-max(1, min(50, len(losses) // 10)):]
    warm_s = start + elapsed - warm[0] if warm else 0.0
    return {"train_loss": sum(losses) / len(losses), "final_loss": sum(tail) / len(tail),
            "first_loss": losses[0], "steps": len(losses), "examples": seen,
            "train_time_s": elapsed, "examples_per_s": seen / elapsed if elapsed > 0 else None,
            # after the first loss read-back (CUDA: LOSS_EVERY steps of kernel selection and allocator growth)
            "warm_examples_per_s": (seen - warm[1]) / warm_s if warm_s > 0 and seen > warm[1] else None,
            "autocast": "bf16" if use_bf16 else "fp32", **({"averaged_steps": averaged} if averaged else {})}


def autocast_bf16(precision: Optional[str], cuda: bool) -> bool:
    """Whether the training forward runs under bf16 autocast: `precision` "bf16" or "fp32" as the recipe
    says (a build resolves an unset one to the device default before keying: Recipe.with_train_precision);
    unset here (a direct call), the device default of `device.default_train_precision`."""
    if precision is not None:
        return precision == "bf16"
    from optforge.device import default_train_precision

    return default_train_precision("cuda" if cuda else "cpu") == "bf16"


def teacher_logits(teacher_dir, data, device: str, precision: str = "fp32", batch_size: int = 128,
                   bar=None) -> torch.Tensor:
    """The frozen teacher's logits [N, C] (float32, CPU) over data's train split, in input order, under
    `precision` autocast (the teacher_logits stage: computed once for every distillation)."""
    from optforge import modeling

    configure_threads()
    teacher, t_tok, _ = modeling.load_classifier(teacher_dir)
    t_ids = tokenize(t_tok, data.train_texts, data.max_length)
    teacher.float().to(device).eval()
    cuda = torch.device(device).type == "cuda"
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return predict_logits(teacher, t_ids, t_tok.pad_token_id or 0, device, batch_size=batch_size, bar=bar,
                              desc="teacher logits")


def distill(student: nn.Module, tokenizer, teacher_logits: torch.Tensor, data, spec, device: str,
            bar=None, desc: str = "distill") -> dict:
    """Train `student` on data's train split against the teacher's logits (row i = train example i:
    the teacher_logits stage) plus the labels (the `distill` stage and prune recovery)."""
    s_ids = tokenize(tokenizer, data.train_texts, data.max_length)
    return train(student, s_ids, data.train_labels, spec, device, tokenizer.pad_token_id or 0,
                 teacher_logits=teacher_logits, temperature=spec.temperature, alpha=spec.alpha, bar=bar, desc=desc)


def predict_logits(forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ids: list[list[int]],
                   pad_id: int, device, batch_size: int = 64, pad_to: Optional[int] = None,
                   bar: Optional[Callable] = None, desc: str = "predict") -> torch.Tensor:
    """Logits [N, C] (float32, CPU, input order) from `forward(input_ids, attention_mask)`, run over
    length-sorted batches with dynamic padding, under inference_mode. `bar`: StageContext.bar (progress
    in examples)."""
    out: list[Optional[torch.Tensor]] = [None] * len(ids)
    progress = bar(total=len(ids), desc=desc, unit="example") if bar is not None else None
    with torch.inference_mode():
        for batch in sorted_batches([len(s) for s in ids], batch_size):
            input_ids, mask = pad_batch([ids[i] for i in batch], pad_id, pad_to)
            logits = forward(input_ids.to(device), mask.to(device)).float().cpu()
            for row, i in zip(logits, batch):
                out[i] = row
            if progress is not None:
                progress.update(len(batch))
    if progress is not None:
        progress.close()
    return torch.stack(out) if out else torch.zeros(0)


def evaluate_model(model: nn.Module, ids: list[list[int]], labels: list[int], pad_id: int, device: str,
                   batch_size: int = 64, bar: Optional[Callable] = None, desc: str = "evaluate") -> dict:
    model.eval()
    logits = predict_logits(model, ids, pad_id, device, batch_size, bar=bar, desc=desc)
    return classification_metrics(logits.argmax(-1).tolist(), labels, logits.shape[-1])
