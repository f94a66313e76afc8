"""Compiled artifacts (formats "aoti" and "compiled"), made by the compile stage.

  "aoti"      model.pt2: an AOTInductor package (generated code compiled into a shared library, plus the
              weights); loading (`aoti_load_package`) runs no compiler at all.
  "compiled"  eager/ (a copy of the float or quantized input artifact) + inductor_cache.bin (Inductor's
              cache artifacts, `torch.compiler.save_cache_artifacts()`). Loading hot-loads the artifacts,
              then torch.compile again and replays the compile-time warm-up: Dynamo still traces (seconds),
              but every Inductor/AOTAutograd graph is a cache hit, no code generation, no C++ compile.
              With "cuda_graphs": true the compiled function is replayed through CUDA graphs per shape
              bucket (optforge.cudagraphs).

Both keep config.json/head.json (shapes, for FLOP counting) and tokenizer/. optforge_model.json:
{"format", "mode", "compiled_mode", "cuda_graphs", "precision", "device", "max_batch", "max_length",
"params", "nonzero_params", "inner_format", "warmup_shapes", "warmup_passes", "threads", ...}.
Inductor's CPU code is keyed on the torch thread count, and Dynamo guards on it: a "compiled" artifact
is loaded and run at the count recorded in "threads" (the compile stage's), whatever the caller's
count, so its cached code is always a hit and never recompiled.
"""

from __future__ import annotations

from pathlib import Path

from optforge.errors import OptforgeError, StageFailure
from optforge.artifacts.runnable import Runnable, flops_per_token

PACKAGE = "model.pt2"
CACHE_BLOB = "inductor_cache.bin"
EAGER_DIR = "eager"


def load_eager(artifact_dir: Path, device: str, precision: str):
    """(nn.Module on device in eval mode, tokenizer, meta) for a float or quantized artifact: what the
    compile stage compiles, and what a "compiled" artifact keeps in eager/. A float model is cast to
    `precision`; a quantized one keeps the precision it was quantized for (a mismatch fails)."""
    from optforge import modeling

    meta = modeling.read_meta(artifact_dir)
    if meta["format"] == "float":
        model, tokenizer, meta = modeling.load_classifier(artifact_dir)
        model = model.to(device=device, dtype=modeling.PRECISION_DTYPES[precision]).eval()
        return model, tokenizer, dict(meta, precision=precision)
    if meta["format"] in ("torch-int8-dynamic", "torchao"):
        from optforge.artifacts.quantized import load_module

        if meta["precision"] != precision:
            raise StageFailure(f"the model was quantized for {meta['precision']}, compile asks for {precision}")
        return load_module(artifact_dir, device)
    raise OptforgeError(f"{artifact_dir}: cannot compile a {meta['format']!r} artifact")


def example_inputs(tokenizer, device: str, batch: int, seq: int):
    """A [batch, seq] batch whose later rows are padded (the attention-mask path must be the one traced)."""
    import torch

    g = torch.Generator().manual_seed(seq * 1000 + batch)
    low = 1000 if len(tokenizer) > 2000 else 1
    ids = torch.randint(low, len(tokenizer), (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(1, batch):
        keep = max(1, seq - (row * seq) // (batch + 1))
        mask[row, keep:] = 0
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id or 0)
    return ids.to(device), mask.to(device)


class InferenceInputs:
    """Calls a torch.compile'd model on inference-mode copies of its inputs. Dynamo guards on a tensor's
    dispatch keys, so tensors made inside inference_mode (evaluate's batches) and outside it
    (Runnable.encode) would each need their own graphs, and the second kind would compile at serving
    time. A clone made inside inference_mode is always an inference tensor: one set of graphs serves both."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, input_ids, attention_mask):
        import torch

        with torch.inference_mode():
            return self.fn(input_ids.clone(), attention_mask.clone())


def torch_compile(model, compiled_mode: str) -> InferenceInputs:
    """torch.compile as the compile stage and the loader both do it (dynamic shapes, inference inputs)."""
    import torch

    from optforge.methods.compile import COMPILE_MODES

    return InferenceInputs(torch.compile(model, mode=COMPILE_MODES[compiled_mode].torch_mode, dynamic=True))


def replay_warmup(fn, tokenizer, device: str, shapes, max_passes: int) -> int:
    """Run `shapes` in order, pass after pass, until a pass adds no Dynamo graph; returns the passes run."""
    import torch
    from torch._dynamo.utils import counters

    for n in range(1, max_passes + 1):
        graphs = counters["stats"]["unique_graphs"]
        with torch.inference_mode():
            for b, s in shapes:
                fn(*example_inputs(tokenizer, device, b, s))
        if n > 1 and counters["stats"]["unique_graphs"] == graphs:
            return n
    raise StageFailure(f"torch.compile keeps recompiling after {max_passes} warm-up passes over {shapes}")


def graphed(compiled_fn, tokenizer, device: str, max_batch: int, max_length: int):
    """The compiled function replayed through CUDA graphs per shape bucket (optforge.cudagraphs). It gets
    the raw compiled callable: its static input buffers are inference tensors already."""
    from optforge.cudagraphs import GraphedForward

    return GraphedForward(compiled_fn, pad_id=tokenizer.pad_token_id or 0, max_batch=max_batch,
                          max_length=max_length, device=device, capture=str(device).startswith("cuda"))


class AtCompileThreads:
    """Runs a torch.compile'd function at the thread count it was compiled at. Dynamo guards on global
    state that includes torch's thread count, and Inductor's CPU code is keyed on it: called at another
    count, the function would retrace and compile again (seen: an artifact compiled with OPTFORGE_THREADS=1
    recompiled at the benchmark's 2 threads). Setting and restoring the count costs ~0.3 us a call."""

    def __init__(self, fn, threads: "int | None"):
        self.fn = fn
        self.threads = int(threads) if threads else None  # None: not recorded (older artifacts), as called

    def __call__(self, input_ids, attention_mask):
        import torch

        old = torch.get_num_threads()
        if self.threads is None or old == self.threads:
            return self.fn(input_ids, attention_mask)
        torch.set_num_threads(self.threads)
        try:
            return self.fn(input_ids, attention_mask)
        finally:
            torch.set_num_threads(old)


class ShapesRunnable(Runnable):
    """A Runnable around a callable with no module to inspect (an AOTInductor package, an ONNX Runtime
    session): parameter counts come from optforge_model.json ("params", "nonzero_params"), FLOPs from a
    weightless (meta-device) skeleton built from the artifact's config.json, head.json and the saved
    Linear shapes ("linear_shapes")."""

    def __init__(self, *args, shapes_dir: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self._shapes_dir = Path(shapes_dir)
        self._skeleton = None

    def param_count(self) -> tuple[int, int]:
        return int(self.meta["params"]), int(self.meta["nonzero_params"])

    def flops_per_token(self, seq_len: int):
        import torch

        from optforge.artifacts.quantized import float_skeleton

        if self._skeleton is None:
            with torch.device("meta"):
                self._skeleton = float_skeleton(self._shapes_dir, self.meta)
        return flops_per_token(self._skeleton, seq_len)


def load(artifact_dir, device: str, precision: str = "fp32") -> Runnable:
    import torch
    from transformers import AutoTokenizer

    from optforge import modeling

    artifact_dir = Path(artifact_dir)
    meta = modeling.read_meta(artifact_dir)
    if meta.get("device", device) != device:
        raise StageFailure(f"compiled artifact was built for {meta['device']}, not {device}")
    if meta["format"] == "aoti":
        tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir / modeling.TOKENIZER_DIR))
        fn = torch._inductor.aoti_load_package(str(artifact_dir / PACKAGE))
        return ShapesRunnable(fn, tokenizer, meta, device, precision=meta["precision"], artifact_dir=artifact_dir,
                              description=f"aoti {meta['precision']}", shapes_dir=artifact_dir)
    if meta["format"] == "compiled":
        model, tokenizer, _ = load_eager(artifact_dir / EAGER_DIR, device, meta["precision"])
        torch.compiler.load_cache_artifacts((artifact_dir / CACHE_BLOB).read_bytes())
        mode = meta.get("compiled_mode", "default")
        compiled = torch_compile(model, mode)
        fn = AtCompileThreads(compiled, meta.get("threads"))
        # Replay the compile-time warm-up, same shapes, same order, same passes: the first trace of each
        # graph decides its symbolic shapes (duck sizing, 0/1 specialisation), hence its cache key, so this
        # traces exactly the saved graphs (all cache hits), after which any shape in range passes a guard.
        replay_warmup(fn, tokenizer, device, meta["warmup_shapes"], max_passes=meta["warmup_passes"])
        description = f"torch.compile {mode} {meta['precision']}"
        if meta.get("cuda_graphs"):
            fn = graphed(compiled.fn, tokenizer, device, meta["max_batch"], meta["max_length"])
            description += " + CUDA graphs"
        return Runnable(fn, tokenizer, meta, device, precision=meta["precision"], module=model,
                        artifact_dir=artifact_dir, description=description)
    raise OptforgeError(f"{artifact_dir}: not a compiled artifact (format {meta['format']!r})")
