"""`Runnable`: a loaded model artifact plus everything needed to feed it text (what evaluate, benchmark,
serve and export use), and the counting helpers (parameters, FLOPs) every artifact kind shares.
Artifacts are loaded through `optforge.artifacts.load_runnable`, never built here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from optforge.modeling import TOKENIZER_DIR


class Runnable:
    """A loaded model plus everything needed to feed it text.

    `fn(input_ids, attention_mask) -> logits` is what runs (an nn.Module, a compiled or AOTI callable);
    `module` is an nn.Module with the model's layers for param_count/flops_per_token (defaults to `fn`
    when that is a module). Everything else comes from the artifact's `meta` (optforge_model.json).
    """

    def __init__(self, fn: Callable, tokenizer, meta: dict, device, *, precision: Optional[str] = None,
                 module: Optional[nn.Module] = None, artifact_dir=None, description: Optional[str] = None):
        self.fn = fn
        self.module = module if module is not None else (fn if isinstance(fn, nn.Module) else None)
        self.tokenizer = tokenizer
        self.meta = dict(meta)
        self.device = torch.device(device)
        self.precision = precision or meta.get("precision", "fp32")
        self.max_length = int(meta["max_length"])
        self.num_labels = int(meta["num_labels"])
        self.label_names = list(meta.get("label_names") or [str(i) for i in range(self.num_labels)])
        self.artifact_dir = Path(artifact_dir) if artifact_dir is not None else None
        self.description = description or f"{meta.get('format', '?')} {self.precision}"
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._encode_ids = None

    # ---- text -> tensors
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated at max_length (no padding)."""
        if self._encode_ids is None:
            from optforge.tokens import batch_encoder

            self._encode_ids = batch_encoder(self.tokenizer, self.max_length)
        return self._encode_ids(texts)

    def collate(self, ids: list[list[int]], pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
        """Pad token-id lists to the longest (or to `pad_to`) and move them to the device (on CUDA from
        pinned memory, without blocking the host: the forward queues behind the copy)."""
        from optforge.tokens import pad_batch

        input_ids, mask = pad_batch(ids, self.pad_id, pad_to)
        if self.device.type == "cuda":
            input_ids, mask = input_ids.pin_memory(), mask.pin_memory()
        return {"input_ids": input_ids.to(self.device, non_blocking=True),
                "attention_mask": mask.to(self.device, non_blocking=True)}

    def encode(self, texts: list[str], pad_to: Optional[int] = None) -> dict[str, torch.Tensor]:
        return self.collate(self.tokenize(texts), pad_to)

    # ---- tensors -> logits -> predictions
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            return self.fn(batch["input_ids"], batch["attention_mask"]).float()

    def predict(self, texts: list[str], pad_to: Optional[int] = None) -> list[dict]:
        """[{"label": int, "label_name": str, "probabilities": [float, ...]}] per text."""
        return self.postprocess(self.forward(self.encode(texts, pad_to)))

    def predict_ids(self, ids: list[list[int]], pad_to: Optional[int] = None) -> list[dict]:
        """`predict` for token ids tokenized already (by a client, or ahead of time): the pre-tokenized path."""
        return self.postprocess(self.forward(self.collate(ids, pad_to)))

    def predict_pipelined(self, batches: Iterable[list[str]], pad_to: Optional[int] = None
                          ) -> Iterator[list[dict]]:
        """`predict` over a stream of batches, with batch i+1 tokenized and copied to the device on a worker
        thread while batch i runs: the Rust tokenizer releases the GIL, and the device works asynchronously,
        so host and device overlap. Yields each batch's predictions, in order."""
        from concurrent.futures import ThreadPoolExecutor

        it = iter(batches)
        first = next(it, None)
        if first is None:
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="optforge-encode") as pool:
            pending = pool.submit(self.encode, first, pad_to)
            for texts in it:
                batch = pending.result()
                pending = pool.submit(self.encode, texts, pad_to)
                yield self.postprocess(self.forward(batch))
            yield self.postprocess(self.forward(pending.result()))

    def postprocess(self, logits: torch.Tensor) -> list[dict]:
        probs = torch.softmax(logits, dim=-1).cpu()
        out = []
        for row in probs.tolist():
            label = max(range(len(row)), key=row.__getitem__)
            out.append({"label": label, "label_name": self.label_names[label], "probabilities": row})
        return out

    # ---- size and cost
    def param_count(self) -> tuple[int, int]:
        """(total, nonzero) over every weight tensor, quantized/packed ones included."""
        if self.module is None:
            return int(self.meta.get("params", 0)), int(self.meta.get("nonzero_params", 0))
        return count_params(self.module)

    @property
    def size_bytes(self) -> int:
        """On-disk size of the artifact's weights (everything but the tokenizer and JSON metadata)."""
        if self.artifact_dir is None:
            return sum(t.numel() * t.element_size() for t in _state_tensors(self.module.state_dict())) \
                if self.module is not None else 0
        total = 0
        for root, _dirs, files in os.walk(self.artifact_dir):
            rel = Path(root).relative_to(self.artifact_dir)
            if rel.parts and rel.parts[0] == TOKENIZER_DIR:
                continue
            total += sum(os.path.getsize(Path(root) / f) for f in files if not f.endswith(".json"))
        return total

    def flops_per_token(self, seq_len: int) -> Optional[float]:
        """Forward FLOPs (2·MACs) per token at this sequence length: every Linear-like layer of the encoder,
        plus the attention matmuls (QK^T and AV: 2·seq_len·width MACs per token per layer), plus the
        head (and a pooler) once per sequence. None when there is no module to read shapes from, or its
        encoder is one optforge.arch does not know."""
        if self.module is None:
            return None
        return flops_per_token(self.module, seq_len)


def flops_per_token(model: nn.Module, seq_len: int) -> Optional[float]:
    """Forward FLOPs (2·MACs) per token: the Linears of the encoder, the attention matmuls of each layer
    (optforge.arch reads their widths), and what runs once per sequence (the head, a pooler) divided by
    `seq_len`. None for an encoder optforge.arch does not know: a count without its attention is no count."""
    from optforge import arch
    from optforge.modeling import layer_shapes

    adapter = arch.find_adapter(model)
    if adapter is None:
        return None
    encoder = arch.encoder_of(model)
    pooler = adapter.pooler_module(encoder)
    per_token = {id(m) for m in encoder.modules()} - {id(m) for m in (pooler.modules() if pooler else ())}
    token_macs = seq_macs = 0
    for m in model.modules():
        shape = _linear_shape(m)
        if shape is None:
            continue
        if id(m) in per_token:
            token_macs += shape[0] * shape[1]
        else:
            seq_macs += shape[0] * shape[1]
    attn_macs = sum(2 * seq_len * layer["attention_width"] for layer in layer_shapes(model))
    return float(2 * (token_macs + attn_macs + seq_macs / max(seq_len, 1)))


def count_params(module: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over every weight tensor of `module`, quantized/packed ones included."""
    total = nonzero = 0
    for t in _state_tensors(module.state_dict()):
        n, nz = _count(t)
        total += n
        nonzero += nz
    return total, nonzero


def _linear_shape(m: nn.Module) -> Optional[tuple[int, int]]:
    """(in, out) of nn.Linear and of quantized/wrapped Linear variants that keep in/out_features."""
    if isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")
                                    and isinstance(getattr(m, "in_features"), int)):
        return int(m.in_features), int(m.out_features)
    return None


def _state_tensors(state: dict):
    """Tensors of a state dict, unpacking the (weight, bias) tuples of dynamically quantized Linears."""
    for v in state.values():
        yield from _flatten(v)


def _flatten(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (tuple, list)):
        for x in v:
            yield from _flatten(x)


def _count(t: torch.Tensor) -> tuple[int, int]:
    n = t.numel()
    try:
        if t.is_quantized:
            return n, int(torch.count_nonzero(t.int_repr()))
        return n, int(torch.count_nonzero(t))
    except (RuntimeError, NotImplementedError, TypeError):
        try:  # tensor subclasses (torchao) that cannot count in place
            return n, int(torch.count_nonzero(t.dequantize()))
        except Exception:  # noqa: BLE001 - an uncountable tensor counts as dense
            return n, n
