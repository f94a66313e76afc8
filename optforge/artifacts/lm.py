"""Causal-LM artifacts (task: causal-lm), loaded through `optforge.artifacts.load_runnable` like every other:

  format        written by                       files
  lm-float      lm_teacher, lm_student,          a stock transformers directory (save_pretrained: model.safetensors,
                lm_distill, lm_prune             config.json) + tokenizer/ + optforge_model.json (optforge.lm.model;
                                                 a head-pruned GPT-2 adds per-block shapes: "pruned_layers")
  lm-quantized  lm_quantize                      config.json, tokenizer/, the quantized state dict (model.safetensors
                                                 through torchao's flattening, else model.pt read with
                                                 torch.load(weights_only=True): optforge.artifacts.quantized.save)
  lm-compiled   lm_compile                       the files of the float or quantized artifact it compiles, with
                                                 "format": "lm-compiled", "base_format", "compile_mode" in its meta

Loading a quantized one rebuilds the model from config.json, converts GPT-2's Conv1D projections to nn.Linear
(as the quantize stage did), applies the same registered method (optforge.methods.quantize) so every module
has its quantized type, then loads the saved bits over it (`assign=True`). A compiled one loads its base
format and compiles it here (`torch.compile(dynamic=False)`; decoding with a static KV cache): the compile
happens at load and on the first call of each shape, which the benchmark counts as warm-up, not in its
timings. Perplexity of a compiled row is computed by the same weights run eagerly (compiling every
evaluation window shape would cost more than the evaluation; the compile stage checks compiled against eager
logits on prefill and decode).
"""

from __future__ import annotations

from pathlib import Path

from optforge.errors import OptforgeError, StageFailure, kernel_failure

QUANTIZED_FORMAT = "lm-quantized"
RECOMPILE_LIMIT = 64
COMPILED_FORMAT = "lm-compiled"


class LMRunnable:
    """A causal LM ready to run on a device: `logits(ids)`, `generate(ids, n)`, `prefill(ids)`,
    `first_token(texts, length)`, its size and parameter counts."""

    def __init__(self, model, tokenizer, meta: dict, device: str, precision: str, artifact_dir: Path,
                 description: str, compile_mode: str | None = None):
        import torch

        self.model, self.tokenizer, self.meta = model, tokenizer, meta
        self.device = torch.device(device)
        self.precision, self.artifact_dir, self.description = precision, Path(artifact_dir), description
        self.compiled = compile_mode is not None
        self.forward = model
        if compile_mode is not None:
            import torch._dynamo.config as dynamo

            # one graph per (batch, length, cache length): prefill per prompt length, decode per batch.
            # Past Dynamo's default limit of 8 it would silently run new shapes eagerly and the benchmark
            # would time eager code under a compiled row's name
            dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
            torch_mode = None if compile_mode == "default" else compile_mode
            self.forward = torch.compile(model, mode=torch_mode, dynamic=False)

    # ------------------------------------------------------------------ running

    def logits(self, ids, keep: int = 0):
        """[B, T, V] logits of a whole sequence (no cache), eager; with `keep`, of its last `keep` positions."""
        import torch

        with torch.inference_mode():
            return self.model(ids.to(self.device), use_cache=False, logits_to_keep=keep).logits

    def generate(self, ids, new_tokens: int, keep_logits: bool = False):
        from optforge.lm.decode import generate

        return generate(self.forward, self.model, ids.to(self.device), new_tokens, static=self.compiled,
                        keep_logits=keep_logits)

    def prefill(self, ids):
        """The first generated token ids [B] after the prompt (the prefill forward + argmax)."""
        import torch

        from optforge.lm.decode import prefill

        with torch.inference_mode():
            token, _, _ = prefill(self.forward, self.model, ids.to(self.device), self.compiled, ids.shape[1] + 1)
        return token

    def encode(self, texts: list[str], length: int):
        """[B, length] prompt ids: each text tokenized without special tokens, cut to `length` (a text must
        have at least `length` tokens: the benchmark's prompts do)."""
        import torch

        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        short = [len(r) for r in rows if len(r) < length]
        if short:
            raise OptforgeError(f"a prompt has {short[0]} tokens, fewer than {length}")
        return torch.tensor([r[:length] for r in rows], dtype=torch.long, device=self.device)

    def first_token(self, texts: list[str], length: int):
        """Time to first token's work: tokenize the prompts, prefill, argmax, ids back on the host."""
        return self.prefill(self.encode(texts, length)).tolist()

    # ------------------------------------------------------------------ describing

    def param_count(self) -> tuple[int, int]:
        """(total, nonzero) parameters; a quantized weight counts its logical elements."""
        total = nonzero = 0
        seen = set()
        for p in list(self.model.parameters()) + list(self.model.buffers()):
            if id(p) in seen or not p.is_floating_point() and not hasattr(p, "tensor_impl"):
                continue
            seen.add(id(p))
            total += p.numel()
            try:
                nonzero += int((p != 0).sum().item())
            except (RuntimeError, NotImplementedError, TypeError):  # a quantized subclass without !=
                nonzero += p.numel()
        for m in self.model.modules():  # PyTorch dynamic-quantized Linears keep packed weights, not parameters
            if type(m).__name__ == "Linear" and type(m).__module__.startswith("torch.ao.nn.quantized"):
                w = m.weight()
                total += w.numel()
                nonzero += int((w.dequantize() != 0).sum().item())
        return total, nonzero

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.artifact_dir.iterdir()
                   if f.is_file() and f.suffix in (".safetensors", ".pt"))


def load(artifact_dir, device: str, precision: str = "fp32") -> LMRunnable:
    from optforge.lm.model import read_meta

    d = Path(artifact_dir)
    meta = read_meta(d)
    fmt = meta["format"]
    compile_mode = None
    if fmt == COMPILED_FORMAT:
        compile_mode, fmt = meta["compile_mode"], meta["base_format"]
    if fmt == QUANTIZED_FORMAT:
        model, tokenizer = _load_quantized(d, meta, device)
        precision, what = meta["precision"], f"{meta['method']} {meta['precision']}"
    else:
        model, tokenizer = _load_float(d, device, precision)
        what = f"float {precision}"
    if compile_mode is not None:
        what += f", compiled ({compile_mode}, static KV cache)"
    return LMRunnable(model, tokenizer, meta, device, precision, d, what, compile_mode)


def _load_float(d: Path, device: str, precision: str):
    from optforge.lm.model import load_float
    from optforge.modeling import PRECISION_DTYPES

    model, tokenizer, _ = load_float(d)
    return model.to(device=device, dtype=PRECISION_DTYPES[precision]).eval(), tokenizer


def _load_quantized(d: Path, meta: dict, device: str):
    from transformers import AutoTokenizer

    from optforge.artifacts.quantized import load_state, method_params
    from optforge.lm.model import TOKENIZER_DIR, conv1d_to_linear, skeleton
    from optforge.methods.quantize import QuantScope
    from optforge.modeling import PRECISION_DTYPES

    method, params = method_params(meta)
    method.check(meta["precision"], device)
    if meta.get("device", device) != device:
        raise StageFailure(f"{meta['method']} artifact was packed for {meta['device']}, not {device}")
    model = skeleton(d, meta).to(device=device, dtype=PRECISION_DTYPES[meta["precision"]])
    conv1d_to_linear(model)
    with kernel_failure(f"{meta['method']}: quantize"):
        method.apply(QuantScope(model), params, device)
    model.load_state_dict(load_state(d, meta, device), strict=True, assign=True)
    return model.eval(), AutoTokenizer.from_pretrained(str(d / TOKENIZER_DIR))
