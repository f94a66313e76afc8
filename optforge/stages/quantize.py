"""quantize: a float model artifact -> a quantized, self-contained artifact, checked against the float model.

Methods (recipe `QuantMethod`); the encoder's nn.Linear layers are quantized, the classification head
(out_features = num_labels: too narrow for packed kernels, and negligible cost) stays in float:

  torch-int8-dynamic  PyTorch's eager `quantize_dynamic` with `per_channel_dynamic_qconfig` (int8 weights
                      with a scale per output channel; activations quantized per tensor at run time;
                      fbgemm/onednn kernels). CPU and fp32 only. Per-channel rather than the default
                      per-tensor weights: on MiniLM-L6 the max logit error halves (7.9 -> 3.8 on logits of
                      scale 16) at the same speed; the per-tensor activations remain its main error.
  int8-dynamic        torchao Int8DynamicActivationInt8WeightConfig (per-row weights, per-token activations).
  int8-weight-only    torchao Int8WeightOnlyConfig (per-row int8 weights, float activations).
  int4-weight-only    CPU: torchao.prototype PrototypeInt4WeightOnlyConfig(group_size) -> Int4OpaqueTensor,
                      packed for aten._weight_int4pack_mm_for_cpu (torchao 0.18 moved the CPU layout to the
                      prototype namespace; the stable Int4WeightOnlyConfig's PLAIN format needs the CUDA-only
                      `mslk` kernels). CUDA: Int4WeightOnlyConfig(tile_packed_to_4d) (tinygemm), bf16 only.
                      A Linear whose in_features is not a multiple of group_size stays float (torchao skips
                      it; `linears_skipped` counts them), and the CPU packer needs out_features % 16 == 0.
  float8              torchao Float8DynamicActivationFloat8WeightConfig: CUDA with compute capability >= 8.9.

The recipe's precision (fp32/bf16/fp16) is applied before quantizing. Deterministic "not here" failures
(no kernel for this device, dtype or shape) become StageFailure with a one-line reason, so the report
shows the row as failed; after quantizing, a forward at batch 1 and at the calibration batch size must
succeed, and the logits are compared with the float model's on that calibration batch.

Artifact (self-contained: config.json, head.json and tokenizer/ copied from the input):
  torchao + a subclass torchao can flatten (Int8Tensor, Float8Tensor...): model.safetensors written with
      torchao.prototype.safetensors.flatten_tensor_state_dict (tensor data + JSON metadata, no pickle);
  otherwise (Int4OpaqueTensor, PyTorch packed params): model.pt = torch.save(state_dict), read back with
      torch.load(weights_only=True) - torchao registers its subclasses as safe globals, and PyTorch's
      weights-only unpickler accepts the dynamic-int8 packed params (both checked by tests/stages/test_quantize.py).
Loading rebuilds the float skeleton from config.json + the saved Linear shapes (structurally pruned models
differ per layer), quantizes it the same way so every module has the right type, then loads the saved
state over it (`assign=True`), so no quantization is recomputed: the loaded weights are the saved bits.
optforge_model.json: {"format": "torch-int8-dynamic" | "torchao", "method", "group_size", "precision",
"weights": file name, "weights_format": "safetensors" | "torch-save", "linear_shapes": {name: [out, in]}, ...}.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from optforge.errors import OptforgeError, StageFailure, kernel_failure
from optforge.recipe import QuantizeParams
from optforge.stages.base import StageContext, StageKind

CALIBRATION_TEXTS = [
    "the movie was good", "a dull, lifeless and thoroughly boring plot", "great", "it was quite awful",
    "one of the most delightful films of the year, with a cast that clearly enjoys every scene",
    "not bad", "the actors really tried, but the story never comes together",
    "an utterly brilliant, moving and funny piece of work", "horrible", "i would not watch it again",
    "the second half drags on for far too long and the ending is predictable", "superb",
    "visually stunning but emotionally empty", "it is what it is", "a lovely little surprise",
    "the director's best work since his debut more than a decade ago, and a reminder of why we go to the movies",
]
FORMATS_OF = {"torch-int8-dynamic": "torch-int8-dynamic"}  # every other method: "torchao"
WEIGHTS_SAFETENSORS = "model.safetensors"
WEIGHTS_PICKLE = "model.pt"


def run(ctx: StageContext) -> dict:
    import torch

    from optforge import modeling, training

    params: QuantizeParams = ctx.params
    src = Path(ctx.inputs["model"])
    src_meta = modeling.read_meta(src)
    if src_meta.get("format") != "float":
        raise StageFailure(f"quantize needs a float model, got format {src_meta.get('format')!r}")
    check_supported(params.method, params.precision, ctx.device)
    training.configure_threads()

    model, tokenizer, _ = modeling.load_classifier(src)
    dtype = modeling.PRECISION_DTYPES[params.precision]
    model = model.to(device=ctx.device, dtype=dtype).eval()
    shapes = linear_shapes(model)
    batch = calibration_batch(ctx, tokenizer, int(src_meta["max_length"]))
    with torch.inference_mode():
        reference = model(*batch).float()

    start = time.perf_counter()
    with kernel_failure(f"{params.method}: quantize"):
        counts = quantize_model(model, params.method, params.group_size, ctx.device)
    quant_s = time.perf_counter() - start
    if counts["quantized"] == 0:
        raise StageFailure(f"{params.method}: no Linear layer could be quantized "
                           f"(shapes {sorted(set(map(tuple, shapes.values())))}, group_size {params.group_size})")
    logits = verify_forward(model, batch, params.method)

    meta = {k: v for k, v in src_meta.items() if k not in ("format", "precision")}
    meta.update({"format": FORMATS_OF.get(params.method, "torchao"), "method": params.method,
                 "group_size": params.group_size if params.method == "int4-weight-only" else None,
                 "precision": params.precision, "linear_shapes": shapes, "device": ctx.device,
                 "source": src_meta.get("source", "model") + f" + {params.method}"})
    weights, weights_format = save_state(model, ctx.out, meta["format"])
    meta.update({"weights": weights, "weights_format": weights_format})
    copy_side_files(src, ctx.out)
    (ctx.out / modeling.META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    total_s = time.perf_counter() - start

    reloaded = load_quantized(ctx.out, ctx.device, params.precision)
    with torch.inference_mode():
        reload_diff = (reloaded.fn(*batch).float() - logits).abs().max().item()
    if reload_diff != 0:  # a serialization bug, not an unsupported method: stop the build
        raise RuntimeError(f"quantized artifact does not reload bit-exactly (max diff {reload_diff})")

    diff = (logits - reference).abs()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    size_before = (src / modeling.WEIGHTS).stat().st_size
    size_after = (ctx.out / weights).stat().st_size
    metrics = {"method": params.method, "precision": params.precision, "format": meta["format"],
               "weights_format": weights_format, "time_s": total_s, "quantize_s": quant_s,
               "size_mb_before": size_before / 2**20, "size_mb_after": size_after / 2**20,
               "compression": size_before / size_after, "linears_quantized": counts["quantized"],
               "linears_skipped": counts["skipped"], "calibration_n": int(batch[0].shape[0]),
               "logit_max_abs_diff": diff.max().item(), "logit_mean_abs_diff": diff.mean().item(),
               "logit_scale": reference.abs().max().item(), "agreement": agreement}
    if params.method == "int4-weight-only" and ctx.device == "cpu" and params.precision == "fp32":
        metrics["notes"] = ["the CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) is a slow path for fp32 "
                            "activations (MiniLM-L6 batch 1: ~20x slower than fp32 eager); use precision bf16"]
    ctx.log(f"{ctx.name}: {params.method} {params.precision}, {counts['quantized']} Linear quantized "
            f"({counts['skipped']} kept float), {metrics['size_mb_before']:.1f} -> {metrics['size_mb_after']:.1f} MB, "
            f"max |dlogit| {metrics['logit_max_abs_diff']:.4f}, agreement {agreement:.3f}")
    return metrics


KIND = StageKind(kind="quantize", version="1", params_model=QuantizeParams, run=run, hardware_bound=True)


# --------------------------------------------------------------------------- support checks


def check_supported(method: str, precision: str, device: str) -> None:
    """StageFailure, before any work, for combinations that cannot run on this device."""
    import torch

    if method == "torch-int8-dynamic":
        if device != "cpu":
            raise StageFailure("torch-int8-dynamic runs on CPU only")
        if precision != "fp32":
            raise StageFailure(f"torch-int8-dynamic computes in fp32; got precision {precision} (use fp32)")
    if method == "float8":
        cap = torch.cuda.get_device_capability() if device == "cuda" and torch.cuda.is_available() else None
        if cap is None or cap < (8, 9):
            where = f"compute capability {cap[0]}.{cap[1]}" if cap else device
            raise StageFailure(f"float8 needs a CUDA GPU with compute capability >= 8.9 (this: {where})")
    if method == "int4-weight-only" and device == "cuda" and precision != "bf16":
        raise StageFailure(f"int4-weight-only on CUDA (tinygemm) computes in bf16; got precision {precision} "
                           "(use bf16)")


# --------------------------------------------------------------------------- quantizing


def torchao_config(method: str, group_size: int, device: str):
    if method == "int8-dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    if method == "int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig(set_inductor_config=False)
    if method == "int4-weight-only":
        if device == "cpu":
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            if group_size not in (32, 64, 128):
                raise StageFailure(f"int4-weight-only on CPU supports group_size 32, 64 or 128, got {group_size}")
            return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False)
        from torchao.quantization import Int4WeightOnlyConfig

        return Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                    set_inductor_config=False)
    if method == "float8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return Float8DynamicActivationFloat8WeightConfig(set_inductor_config=False)
    raise OptforgeError(f"unknown quantization method {method!r}")


def quantize_model(model, method: str, group_size: int, device: str) -> dict:
    """Quantize the encoder's Linear layers in place; {"quantized": n, "skipped": n}."""
    from torch import nn

    before = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]
    if method == "torch-int8-dynamic":
        import torch

        # per-channel weight scales: same kernels, half the logit error of per-tensor on MiniLM
        spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        with _quiet_deprecation():
            torch.ao.quantization.quantize_dynamic(model.encoder, spec, dtype=torch.qint8, inplace=True)
        after = [m for m in model.encoder.modules() if type(m) is nn.Linear]
        return {"quantized": len(before) - len(after), "skipped": len(after)}
    from torchao.quantization import quantize_
    from torchao.utils import TorchAOBaseTensor

    quantize_(model, torchao_config(method, group_size, device),
              filter_fn=lambda mod, fqn: isinstance(mod, nn.Linear) and fqn.startswith("encoder."))
    done = sum(1 for m in before if isinstance(m.weight, TorchAOBaseTensor))
    return {"quantized": done, "skipped": len(before) - done}


class _quiet_deprecation:
    """torch.ao.quantization warns that it is deprecated on every call; the method is still what we measure."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def verify_forward(model, batch, method: str):
    """Logits of the calibration batch; StageFailure if a kernel rejects batch 1 or the full batch."""
    import torch

    input_ids, mask = batch
    with torch.inference_mode():
        with kernel_failure(f"{method}: forward at batch 1"):
            one = model(input_ids[:1], mask[:1]).float()
        with kernel_failure(f"{method}: forward at batch {input_ids.shape[0]}"):
            logits = model(input_ids, mask).float()
    if not torch.isfinite(logits).all() or not torch.isfinite(one).all():
        raise StageFailure(f"{method}: non-finite logits on the calibration batch")
    return logits


def linear_shapes(model) -> dict:
    """{module name: [out_features, in_features]} of every nn.Linear (the float skeleton's shapes)."""
    from torch import nn

    return {n: [m.out_features, m.in_features] for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def calibration_batch(ctx: StageContext, tokenizer, max_length: int):
    """(input_ids, attention_mask) on the device: eval sentences when a data input is wired, else a fixed
    set of sentences of varied lengths (padding included, so masked positions are exercised)."""
    from optforge.training import pad_batch

    texts = list(CALIBRATION_TEXTS)
    if "data" in ctx.inputs:
        from optforge.stages.data import EVAL_FILE, read_examples

        texts = read_examples(Path(ctx.inputs["data"]) / EVAL_FILE)[0][:32] or texts
    texts = (texts * 2)[:32]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id or 0)
    return input_ids.to(ctx.device), mask.to(ctx.device)


# --------------------------------------------------------------------------- save / load


def save_state(model, out: Path, fmt: str) -> tuple[str, str]:
    """Write the quantized state dict; returns (file name, "safetensors" | "torch-save")."""
    import torch

    state = model.state_dict()
    if fmt == "torchao":
        try:
            from safetensors.torch import save_file
            from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

            tensors, metadata = flatten_tensor_state_dict({k: v.detach() for k, v in state.items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / WEIGHTS_SAFETENSORS),
                      metadata=metadata)
            return WEIGHTS_SAFETENSORS, "safetensors"
        except (ValueError, ImportError):  # a subclass torchao cannot flatten (e.g. Int4OpaqueTensor)
            (out / WEIGHTS_SAFETENSORS).unlink(missing_ok=True)
    torch.save(state, out / WEIGHTS_PICKLE)
    return WEIGHTS_PICKLE, "torch-save"


def load_state(artifact_dir: Path, meta: dict, device: str) -> dict:
    import torch

    path = artifact_dir / meta["weights"]
    if meta["weights_format"] == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        state, leftover = unflatten_tensor_state_dict(load_file(str(path), device=device), metadata)
        if leftover:
            raise OptforgeError(f"{path}: unexpected tensors {sorted(leftover)[:5]}")
        return state
    import warnings

    with warnings.catch_warnings():  # PyTorch's packed params still unpickle through TypedStorage
        warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
        return torch.load(path, map_location=device, weights_only=True)


def copy_side_files(src: Path, out: Path) -> None:
    from optforge import modeling

    for name in (modeling.ENCODER_CONFIG, modeling.HEAD):
        shutil.copy2(src / name, out / name)
    shutil.copytree(src / modeling.TOKENIZER_DIR, out / modeling.TOKENIZER_DIR)


def float_skeleton(artifact_dir: Path, meta: dict):
    """An fp32 TextClassifier with the saved architecture (Linear shapes included) and throwaway weights."""
    import torch
    from transformers import AutoConfig, AutoModel, BertModel

    from optforge import modeling

    head = json.loads((artifact_dir / modeling.HEAD).read_text())
    with modeling._quiet_transformers():
        config = AutoConfig.from_pretrained(str(artifact_dir))
        encoder = (BertModel(config, add_pooling_layer=False) if config.model_type == "bert"
                   else AutoModel.from_config(config))
    model = modeling.TextClassifier(encoder, head["num_labels"], head["pooling"], head.get("dropout"),
                                    head.get("label_names"))
    shapes = {}
    for name, (out_f, in_f) in meta["linear_shapes"].items():
        shapes[f"{name}.weight"] = torch.empty(out_f, in_f, device="meta")
        shapes[f"{name}.bias"] = torch.empty(out_f, device="meta")
    modeling.fit_to_state(model, shapes)
    return model.eval()


def load_quantized_module(artifact_dir, device: str, precision: str | None = None):
    """(quantized TextClassifier on `device`, tokenizer, meta)."""
    from transformers import AutoTokenizer

    from optforge import modeling

    artifact_dir = Path(artifact_dir)
    meta = modeling.read_meta(artifact_dir)
    if precision is not None and precision != meta["precision"]:
        raise OptforgeError(f"{artifact_dir}: quantized for precision {meta['precision']}, asked for {precision}")
    check_supported(meta["method"], meta["precision"], device)
    if meta.get("device", device) != device:
        raise StageFailure(f"{meta['method']} artifact was packed for {meta['device']}, not {device}")
    model = float_skeleton(artifact_dir, meta).to(device=device, dtype=modeling.PRECISION_DTYPES[meta["precision"]])
    with kernel_failure(f"{meta['method']}: quantize"):
        quantize_model(model, meta["method"], meta.get("group_size") or 128, device)
    state = load_state(artifact_dir, meta, device)
    model.load_state_dict(state, strict=True, assign=True)
    tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir / modeling.TOKENIZER_DIR))
    return model.eval(), tokenizer, meta


def load_quantized(artifact_dir, device: str, precision: str = "fp32"):
    """`runtime.FORMATS` loader for "torch-int8-dynamic" and "torchao" artifacts -> Runnable.
    The artifact's own precision wins over `precision`: its weights were quantized for that dtype."""
    from optforge.runtime import Runnable

    model, tokenizer, meta = load_quantized_module(artifact_dir, device)
    return Runnable(model, tokenizer, meta, device, precision=meta["precision"], artifact_dir=artifact_dir,
                    description=f"{meta['method']} {meta['precision']}")
