"""Training a causal LM: next-token cross-entropy on fixed-length blocks of the train split's token stream,
optionally distilled from a teacher's next-token distributions (the lm_teacher, lm_distill and lm_prune
stages).

loss = alpha * KL(softmax(t/T) || softmax(s/T)) * T^2 + (1 - alpha) * CE(s, next token)
per predicted position (the KL averaged over positions, like the CE). The teacher runs on each batch in
eval mode (its logits for a whole epoch, blocks x length x vocab, would not fit in memory).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from optforge import training


def blocks(stream: list[int], length: int) -> torch.Tensor:
    """[n, length] non-overlapping blocks of the stream (the tail that does not fill one is dropped)."""
    n = len(stream) // length
    if n == 0:
        raise ValueError(f"the train stream has {len(stream)} tokens, fewer than one block of {length}")
    return torch.tensor(stream[:n * length], dtype=torch.long).view(n, length)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy (mean, or `reduction="sum"`): position t predicts ids[t + 1]."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction=reduction)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor, temperature: float,
                 alpha: float) -> torch.Tensor:
    """alpha * KL at temperature T (times T^2) + (1 - alpha) * the LM loss, over predicted positions."""
    T = temperature
    s = student[:, :-1].reshape(-1, student.shape[-1]).float()
    t = teacher[:, :-1].reshape(-1, teacher.shape[-1]).float()
    soft = F.kl_div(F.log_softmax(s / T, dim=-1), F.log_softmax(t / T, dim=-1), log_target=True,
                    reduction="batchmean") * (T * T)
    return alpha * soft + (1 - alpha) * lm_loss(student, ids)


def train_lm(model, data: torch.Tensor, spec, device: str, teacher=None, temperature: float = 1.0,
             alpha: float = 0.0, bar: Optional[Callable] = None, desc: str = "train",
             after_step: Optional[Callable[[], None]] = None) -> dict:
    """Train `model` in place on `data` blocks ([n, length]) with a TrainSpec/DistillSpec `spec`; with a
    `teacher`, the distillation loss. Fractional epochs stop after ceil(epochs * batches per epoch) steps.
    `after_step` runs after every optimizer step (prune recovery re-applies its masks there)."""
    training.configure_threads()
    training.set_seed(spec.seed)
    model.to(device).train()
    if spec.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = training.make_optimizer(model, spec.lr, spec.weight_decay)
    per_epoch = math.ceil(len(data) / spec.batch_size)
    total = max(1, math.ceil(spec.epochs * per_epoch))
    scheduler = training.linear_schedule(optimizer, int(spec.warmup * total), total)
    rng = random.Random(spec.seed)
    cuda = torch.device(device).type == "cuda"
    use_bf16 = training.autocast_bf16(getattr(spec, "precision", None), cuda)
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=use_bf16)
    progress = bar(total=total, desc=desc) if bar is not None else None
    losses: list[float] = []
    steps = tokens = 0
    start = time.perf_counter()
    while steps < total:
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), spec.batch_size):
            if steps == total:
                break
            ids = data[order[i:i + spec.batch_size]].to(device)
            with autocast:
                logits = model(ids).logits
            if teacher is None:
                loss = lm_loss(logits, ids)
            else:
                with torch.inference_mode(), (autocast if use_bf16 else contextlib.nullcontext()):
                    teacher_logits = teacher(ids).logits
                loss = distill_loss(logits, teacher_logits.clone(), ids, temperature, alpha)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(loss.item())
            steps += 1
            tokens += ids.numel()
            if progress is not None:
                progress.set_postfix({"loss": f"{sum(losses[-10:]) / len(losses[-10:]):.3f}"})
                progress.update(1)
    elapsed = time.perf_counter() - start
    if progress is not None:
        progress.close()
    model.eval()
    tail = losses[-max(1, min(50, len(losses) // 10)):]
    return {"train_loss": sum(losses) / len(losses), "final_loss": sum(tail) / len(tail), "first_loss": losses[0],
            "steps": steps, "train_tokens": tokens, "train_time_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else None, "block_length": int(data.shape[1]),
            "autocast": "bf16" if use_bf16 else "fp32"}


def read_split(data_dir, name: str) -> list[str]:
    """The texts of a data-stage jsonl file (lm_data: {"text"} per line)."""
    import json
    from pathlib import Path

    with open(Path(data_dir) / name, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def train_blocks(tokenizer, data_dir, length: int) -> torch.Tensor:
    """The train split as [n, length] blocks of its token stream (optforge.lm.perplexity.token_stream)."""
    from optforge.lm.perplexity import token_stream
    from optforge.stages.data import TRAIN_FILE

    return blocks(token_stream(tokenizer, read_split(data_dir, TRAIN_FILE)), length)
