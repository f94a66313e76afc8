"""ONNX Runtime artifacts (format "onnx"), made by the onnxruntime stage (optforge.stages.onnxruntime).

Files (self-contained):
  model.onnx           the graph ONNX Runtime runs: exported from the float model (`export`), dynamic-int8
                       quantized if the row asks (`quantize_dynamic`), then optimized offline by ONNX Runtime
                       at ORT_ENABLE_EXTENDED (`optimize`: constant folding, MatMul+Add, GELU, LayerNorm,
                       int8 MatMul fusions; portable across x86 CPUs, unlike ORT_ENABLE_ALL's layout passes).
                       One file, no external data. Inputs input_ids, attention_mask (int64 [batch, seq], both
                       axes dynamic); output logits (float32 [batch, num_labels]).
  config.json, head.json   the float model's architecture (FLOP counting, like an AOTI artifact)
  tokenizer/           the HF tokenizer files
  optforge_model.json  {"format": "onnx", "precision": "fp32", "quantization": null | "int8-dynamic",
                       "method" and "compute_precision" ("int8") when quantized, "opset", "exporter",
                       "graph_optimization", "params", "nonzero_params", "linear_shapes", "device": "cpu",
                       "onnxruntime" (the version it was built with), max_length, num_labels, label_names...}

Opset 17 (LayerNormalization is a single op from 17 on; ONNX Runtime >= 1.12 runs it). The exporter is
PyTorch's TorchScript-based one (`torch.onnx.export(dynamo=False)`) over the encoder's eager attention:
measured on this project's CPU (Xeon with AVX-512 VNNI, 1 thread, pruned MiniLM 3-layer student), its graph
ran faster than the dynamo exporter's (batch 1: 3.1 vs 3.3 ms fp32, 1.40 vs 1.54 ms int8; batch 32:
-4% fp32, -29% int8) and exported in 1 s instead of 10-13 s. ONNX Runtime's transformer optimizer
(onnxruntime.transformers.optimize_model, fused Attention/SkipLayerNorm/BiasGelu) was measured too and
left out: no faster at batch 1, 15-25% slower at batch 32 (its CPU Attention kernel), and a head count
it is given that differs from the layer's real one (structured pruning) silently gives wrong logits.

Loading: an InferenceSession on the CPUExecutionProvider, intra-op threads = torch.get_num_threads() at
load time (what the benchmark's `threads` knob, evaluate and serve set), inter-op 1, spin-waiting off
(ORT shares the process with torch: a spinning pool would steal the cores torch and the tokenizer use),
graph optimization off (the file is optimized already). `Runnable.fn` hands torch's int64 tensors to
ONNX Runtime as numpy views (no copy) and returns the logits as a torch tensor over ONNX Runtime's
output (no copy); `run` rather than io binding, which was no faster (int8 student, batch 1: 1.31 vs
1.25 ms median, binding per call). The onnxruntime wheel here has no CUDA execution provider: an onnx artifact loads on
CPU only, and anything else is a StageFailure saying so.
"""

from __future__ import annotations

from pathlib import Path

from optforge.errors import StageFailure, one_line

MODEL = "model.onnx"
OPSET = 17
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
EXPORTER = "torchscript"
OFFLINE_LEVEL = "ORT_ENABLE_EXTENDED"  # what the stage optimizes at; the loader then optimizes nothing
HEAD_PREFIX = "/head/"  # nodes of the classification head in the exported graph (kept float when quantizing)


def cpu_only(device: str) -> None:
    """StageFailure unless `device` is the CPU."""
    if device != "cpu":
        raise StageFailure(f"runtime: onnxruntime runs on CPU only (optforge uses ONNX Runtime's CPU execution "
                           f"provider); give this row `devices: [cpu]`, not {device}")


# --------------------------------------------------------------------------- making the graph


def export(model, tokenizer, path: Path, opset: int = OPSET) -> None:
    """The float TextClassifier -> `path` (one .onnx file), batch and sequence dynamic. Traced on a padded
    batch so the attention-mask path is the one recorded, over eager attention: the plain MatMul/Softmax
    graph (the SDPA path exports 20% more nodes of mask plumbing, at the same speed once ONNX Runtime has
    optimized it; eager is also the pattern onnxruntime.transformers' attention fusion matches)."""
    import warnings

    import torch

    from optforge.artifacts.compiled import example_inputs

    encoder = getattr(model, "encoder", None)
    if hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")
    ids, mask = example_inputs(tokenizer, "cpu", 2, 16)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in INPUTS} | {OUTPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter is deprecated (see the module docstring for why it is used) and warns
        # about every Python branch it traces through; the stage checks the graph against PyTorch instead
        warnings.simplefilter("ignore")
        torch.onnx.export(model.float().eval(), (ids, mask), str(path), dynamo=False, opset_version=opset,
                          input_names=list(INPUTS), output_names=[OUTPUT], dynamic_axes=dynamic,
                          do_constant_folding=True)


def quantize_dynamic(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic int8: int8 weights with a scale per output channel (per tensor, agreement with
    the float model fell from 0.95 to 0.66 on a MiniLM student with a random head), uint8 activations
    quantized per tensor at run time; the classification head stays float, as with the PyTorch methods."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    from optforge.quiet import dropped

    head = []
    for node in onnx.load(str(src), load_external_data=False).graph.node:
        if node.name.startswith(HEAD_PREFIX):
            # dynamic quantization first rewrites a Gemm as "<name>_MatMul" + "<name>_Add", then quantizes
            # the MatMul under its new name (onnxruntime.quantization.onnx_model.replace_gemm_with_matmul)
            head += [node.name, f"{node.name}_MatMul"] if node.op_type == "Gemm" else [node.name]
    # quantize_dynamic logs a hint to run onnxruntime's pre-processing (symbolic shape inference) first: it
    # is for static quantization, and that inference fails on this graph's dynamic sequence axis anyway
    with dropped("Please consider to run pre-processing before quantization"):
        ort_quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_exclude=head)


def optimize(src: Path, dst: Path) -> None:
    """ONNX Runtime's graph optimizations, run once here and saved, so loading optimizes nothing."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OFFLINE_LEVEL)
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3  # no per-node warnings in the build log
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    """{"<domain>:<op>": n} over the graph's nodes (domain "ai.onnx" for the standard operators)."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        op = f"{node.domain or 'ai.onnx'}:{node.op_type}"
        counts[op] = counts.get(op, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- running it


def errors() -> tuple[type, ...]:
    """ONNX Runtime's exception classes (they derive from Exception alone, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))


def session(path: Path, threads: int, optimize_at_load: bool = False):
    """An InferenceSession on the CPU: `threads` intra-op threads, one inter-op thread, spin-waiting off;
    no graph optimization at load unless `optimize_at_load` (a graph not optimized offline)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize_at_load
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except errors() as e:
        raise StageFailure(f"onnxruntime cannot load {path}: {one_line(e)}") from e


class OrtForward:
    """`fn(input_ids, attention_mask) -> logits` over an InferenceSession: torch int64 CPU tensors in
    (handed over as numpy views, no copy), a torch float32 tensor out (over ONNX Runtime's array, no copy).
    ONNX Runtime's own exceptions come out as RuntimeError (errors.KERNEL_ERRORS covers them)."""

    def __init__(self, session):
        self.session = session
        self._errors = errors()

    def __call__(self, input_ids, attention_mask):
        import torch

        feed = {INPUTS[0]: _int64(input_ids), INPUTS[1]: _int64(attention_mask)}
        try:
            logits = self.session.run([OUTPUT], feed)[0]
        except self._errors as e:
            raise RuntimeError(f"onnxruntime: {one_line(e)}") from e
        return torch.from_numpy(logits)


def _int64(t):
    import numpy as np

    a = t.detach().numpy() if hasattr(t, "numpy") else t
    return np.ascontiguousarray(a, dtype=np.int64)  # a view when it already is contiguous int64


def load(artifact_dir, device: str, precision: str = "fp32"):
    """The artifact runs in the precision it was exported in (`precision` is not applied: fp32, or int8
    through ONNX Runtime's quantization); CPU only."""
    import torch
    from transformers import AutoTokenizer

    from optforge import modeling
    from optforge.artifacts.compiled import ShapesRunnable

    cpu_only(device)
    artifact_dir = Path(artifact_dir)
    meta = modeling.read_meta(artifact_dir)
    fn = OrtForward(session(artifact_dir / MODEL, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir / modeling.TOKENIZER_DIR))
    return ShapesRunnable(fn, tokenizer, meta, device, precision=meta["precision"], artifact_dir=artifact_dir,
                          description=describe(meta), shapes_dir=artifact_dir)


def describe(meta: dict) -> str:
    return f"onnxruntime {meta.get('quantization') or meta['precision']}"
