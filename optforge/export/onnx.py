"""The `onnx` export writer (`optforge export --format onnx`): a built row -> a folder that ONNX Runtime and
the tokenizer libraries run without optforge.

    model.onnx            inputs input_ids, attention_mask (int64 [batch, sequence], both axes dynamic),
                          output logits (float32 [batch, num_labels]); opset 17 (ai.onnx)
    tokenizer files       as `save_pretrained` writes them; tokenizer.json (what `tokenizers` alone reads)
                          truncates at max_length and pads to the longest text of a batch
    config.json           the encoder's HF config plus id2label / label2id / num_labels, max_length (the
                          truncation length the model was built for) and pooling

What is exportable:
  float rows (format "float")   exported afresh from the fp32 weights (a bf16/fp16 artifact is exported as
                                fp32, with a note): standard ONNX operators only, so any ONNX runtime runs it;
                                its logits are checked against PyTorch before `write` returns.
  onnx rows (format "onnx")     `runtime: onnxruntime` rows, int8 included: their model.onnx is copied as
                                built, optimized offline by ONNX Runtime, so it may hold ONNX Runtime contrib
                                operators (com.microsoft: FusedMatMul, DynamicQuantizeMatMul...): it runs on
                                onnxruntime.
Not exportable (check() says why in one line, and what to export instead): PyTorch dynamic int8/fp16
(packed weights), torchao (tensor subclasses), aoti/compiled (compiled code).

`load_logits` and the returned loader snippet use onnxruntime, numpy and the tokenizer only: no optforge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

NAME = "onnx"
MODEL = "model.onnx"
OPSET = 17  # optforge.artifacts.onnx.OPSET (not imported here: this module imports nothing heavy)
EXAMPLE_TEXTS = ["a gripping, funny and moving film", "dull, lifeless and far too long"]

_INSTEAD = "export the row's float model, or add a `runtime: onnxruntime` row"
_REFUSED = {
    "torchao": "torchao tensor subclasses (quantized weights) have no ONNX operator mapping; " + _INSTEAD
               + " (its int8-dynamic or torch-int8-dynamic quantize entries are ONNX int8)",
    "aoti": "an AOTInductor package is compiled code, not a graph ONNX can express; export the same row "
            "without `compile:`, or add a `runtime: onnxruntime` row",
    "compiled": "a torch.compile artifact holds compiled code, not a graph ONNX can express; export the same "
                "row without `compile:`, or add a `runtime: onnxruntime` row",
}

LOADER = '''\
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

folder = Path({folder!r})
config = json.loads((folder / "config.json").read_text())
tokenizer = AutoTokenizer.from_pretrained(folder)
session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

texts = {texts!r}
batch = tokenizer(texts, padding=True, truncation=True, max_length=config["max_length"], return_tensors="np")
logits = session.run(["logits"], {{"input_ids": batch["input_ids"].astype(np.int64),
                                   "attention_mask": batch["attention_mask"].astype(np.int64)}})[0]
print(json.dumps([config["id2label"][str(i)] for i in logits.argmax(-1)]))
'''


def check(meta: dict, artifact_dir: Path) -> Optional[str]:
    """None when the artifact can be exported as ONNX, else the one-line reason."""
    fmt = meta.get("format")
    if fmt == "float":
        return None
    if fmt == "onnx":
        if not (Path(artifact_dir) / MODEL).is_file():
            return f"the artifact has no {MODEL}"
        return None
    if fmt == "torch-int8-dynamic":
        dtype = "fp16" if meta.get("method") == "torch-fp16-dynamic" else "int8"
        instead = ("export the row's float model" if dtype == "fp16" else
                   _INSTEAD + " with the same quantize entry (ONNX int8)")
        return f"PyTorch dynamic {dtype} packed weights have no ONNX operator mapping; {instead}"
    if fmt in _REFUSED:
        return _REFUSED[fmt]
    return f"unknown artifact format {fmt!r}"


def write(artifact_dir: Path, out: Path) -> dict:
    """Write model.onnx, the tokenizer files and config.json into `out` (an existing, empty folder).
    Returns {"loader": python snippet, "opset": int, "details": {...}}."""
    from optforge.artifacts.onnx import op_counts
    from optforge.errors import OptforgeError
    from optforge.modeling import ENCODER_CONFIG, TOKENIZER_DIR, read_meta

    artifact_dir, out = Path(artifact_dir), Path(out)
    meta = read_meta(artifact_dir)
    reason = check(meta, artifact_dir)
    if reason is not None:
        raise OptforgeError(f"not exportable as onnx: {reason}")
    notes: list[str] = []
    if meta["format"] == "float":
        _export_float(artifact_dir, meta, out / MODEL, notes)
        opset, quantization = OPSET, None
    else:
        shutil.copy2(artifact_dir / MODEL, out / MODEL)
        opset, quantization = int(meta["opset"]), meta.get("quantization")
    contrib = sorted({op.split(":", 1)[1] for op in op_counts(out / MODEL) if not op.startswith("ai.onnx:")})
    operators = (f"standard ONNX (ai.onnx opset {opset}): any ONNX runtime runs it" if not contrib else
                 f"ONNX Runtime contrib operators (com.microsoft: {', '.join(contrib)}), optimized offline at "
                 f"{meta.get('graph_optimization', 'build time')}: runs on onnxruntime")
    for f in sorted((artifact_dir / TOKENIZER_DIR).iterdir()):
        shutil.copy2(f, out / f.name)
    _tokenizers_defaults(out, int(meta["max_length"]))
    labels = list(meta.get("label_names") or [str(i) for i in range(int(meta["num_labels"]))])
    config = json.loads((artifact_dir / ENCODER_CONFIG).read_text())
    config.update({"id2label": {str(i): name for i, name in enumerate(labels)},
                   "label2id": {name: i for i, name in enumerate(labels)}, "num_labels": len(labels),
                   "max_length": int(meta["max_length"]), "pooling": meta.get("pooling")})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    details = {"source_format": meta["format"], "precision": "fp32", "quantization": quantization,
               "operators": operators, "inputs": {"input_ids": "int64 [batch, sequence]",
                                                  "attention_mask": "int64 [batch, sequence]"},
               "output": {"logits": f"float32 [batch, {len(labels)}]"}, "max_length": int(meta["max_length"]),
               "labels": labels, "notes": notes}
    return {"loader": LOADER.format(folder=str(out.resolve()), texts=EXAMPLE_TEXTS), "opset": opset,
            "details": details}


def _export_float(artifact_dir: Path, meta: dict, path: Path, notes: list[str]) -> None:
    """Export the float model as fp32 and check the file's logits against PyTorch's."""
    from optforge import modeling
    from optforge.artifacts import onnx as ort_artifact
    from optforge.errors import KERNEL_ERRORS, OptforgeError, one_line
    from optforge.stages.onnxruntime import check_export

    if meta.get("precision", "fp32") != "fp32":
        notes.append(f"the {meta['precision']} weights were exported as fp32 (ONNX Runtime's CPU kernels for "
                     f"this encoder are fp32)")
    model, tokenizer, _ = modeling.load_classifier(artifact_dir)
    model = model.float().eval()
    try:
        try:
            ort_artifact.export(model, tokenizer, path)
        except KERNEL_ERRORS as e:
            raise OptforgeError(f"onnx export of {artifact_dir} failed: {one_line(e)}") from e
        check_export(path, model, tokenizer, max_batch=8, max_length=int(meta["max_length"]), threads=1)
    except OptforgeError:
        path.unlink(missing_ok=True)  # never leave a model that was not checked
        raise


def _tokenizers_defaults(out: Path, max_length: int) -> None:
    """tokenizer.json, as `tokenizers` alone uses it: truncation at the model's max_length and padding to
    the longest text of a batch, with the tokenizer's pad token (a Hugging Face tokenizer sets both per
    call anyway, so AutoTokenizer reads the same ids)."""
    path = out / "tokenizer.json"
    if not path.is_file():  # a slow (Python) tokenizer: AutoTokenizer only
        return
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=hf.pad_token_id or 0, pad_token=hf.pad_token or "[PAD]")
    tok.save(str(path))


def load_logits(out: Path) -> Callable:
    """(input_ids int64 [B, T], attention_mask int64 [B, T]) -> float32 logits [B, num_labels], with
    onnxruntime and numpy only."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(Path(out) / MODEL), providers=["CPUExecutionProvider"])

    def logits(input_ids, attention_mask):
        feed = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return session.run(["logits"], feed)[0]

    return logits
