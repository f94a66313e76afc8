"""Export format "hf": a `save_pretrained` directory that stock transformers loads
(`AutoModelForSequenceClassification.from_pretrained` + `AutoTokenizer.from_pretrained`).

  model.safetensors, config.json   the *ForSequenceClassification model; the config has id2label/label2id,
                                   the layer count and FFN width the weights have, and the row's dtype
  tokenizer files                  the artifact's tokenizer, truncating at the row's max_length

A stock config describes only what the architecture's stock model computes, so this takes float rows whose
model is the stock classifier (`optforge.modeling.HFSeqClassifier`, head.json "head": "stock") with
every weight shaped as a stock config says: a subset of the teacher's layers is fine (the config's layer
count is set), FFN pruning is fine when every layer kept the same width (the config's intermediate size is
set), head pruning is not (transformers 5 has no `pruned_heads`). optforge's own head (mean/cls pooling and
a Linear) is not any stock head; quantized and compiled rows have no stock form.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Optional

NAME = "hf"
TOKENIZER = "."
WEIGHTS = "model.safetensors"  # optforge.modeling.WEIGHTS / HEAD, spelt here: load_logits imports no optforge
HEAD = "head.json"
CONFIG = "config.json"
HF_PREFIX = "hf."  # HFSeqClassifier keeps the transformers model as its attribute `hf`

LOADER = '''import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = {out!r}
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path).eval()
batch = tokenizer(["a gripping, funny film"], padding=True, truncation=True, return_tensors="pt")
with torch.inference_mode():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
print([model.config.id2label[i] for i in logits.argmax(-1).tolist()])
'''

QUANTIZED = ("the row is quantized ({what}), which no stock transformers config describes; export the float row it "
             "was quantized from (the same model without `quantize:`) as hf")
REMOTE_CODE = ("the model's code comes with its checkpoint (trust_remote_code: config.json has an auto_map), not "
               "with transformers, so no stock transformers directory describes it; use onnx or pt2")
COMPILED = ("the row is compiled (format {fmt}), which no stock transformers config describes; export the float "
            "row it was compiled from (the same model without `compile:`) as hf{pt2}")
OPTFORGE_HEAD = ("the row uses optforge's {pooling}-pooling head, which no stock transformers *ForSequenceClassification "
                 "head computes; export as onnx or pt2, or give the teacher its stock head (`pooling: stock`)")
HEAD_PRUNED = ("transformers 5 has no pruned_heads: a head-pruned model does not fit a stock config; use onnx or pt2")


def check(meta: dict, artifact_dir: Path) -> Optional[str]:
    fmt = meta.get("format")
    if fmt in ("torch-int8-dynamic", "torchao"):
        method = meta.get("method", "?")
        return QUANTIZED.format(what=method if method == fmt else f"{method}, format {fmt}")
    if fmt in ("aoti", "compiled"):
        return COMPILED.format(fmt=fmt, pt2=", or this row as pt2" if fmt == "aoti" else "")
    if fmt != "float":
        return (f"an ONNX Runtime row is an ONNX graph, not PyTorch weights a transformers config can describe; "
                "export it as onnx, or the float row it was built from as hf" if fmt == "onnx"
                else f"format {fmt!r} is not a float model")
    head = json.loads((Path(artifact_dir) / HEAD).read_text())
    if head.get("head") != "stock":
        return OPTFORGE_HEAD.format(pooling=head.get("pooling", "?"))
    if "auto_map" in json.loads((Path(artifact_dir) / CONFIG).read_text()):
        return REMOTE_CODE
    return stock_config(Path(artifact_dir))[1]


def saved_shapes(weights: Path) -> dict[str, list[int]]:
    """{name: shape} of the tensors in a safetensors file, from its JSON header (no tensor is read)."""
    with open(weights, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def hf_shapes(artifact_dir: Path) -> dict[str, list[int]]:
    """The saved tensors of an HFSeqClassifier under their names in the transformers model."""
    shapes = saved_shapes(artifact_dir / WEIGHTS)
    return {k[len(HF_PREFIX):]: v for k, v in shapes.items() if k.startswith(HF_PREFIX)}


def stock_config(artifact_dir: Path):
    """(the transformers config that describes the saved weights, None) or (None, why none does): the
    artifact's config.json with the layer count and FFN width read from the weights, checked by building
    the stock model from it (on the meta device) and comparing every tensor's name and shape."""
    import torch
    from transformers import AutoConfig

    from optforge.modeling import _quiet_transformers

    with _quiet_transformers():
        config = AutoConfig.from_pretrained(str(artifact_dir))
    saved = hf_shapes(artifact_dir)
    layers_path, ffn = _layout(config)
    indices = sorted({int(m.group(1)) for k in saved if (m := re.match(rf"{re.escape(layers_path)}\.(\d+)\.", k))})
    if indices != list(range(len(indices))):
        return None, f"the saved layers are numbered {indices}, not 0..{len(indices) - 1}"
    config.num_hidden_layers = len(indices)
    if ffn is not None and indices:
        widths = [saved.get(f"{layers_path}.{i}.{ffn}.weight", [None])[0] for i in indices]
        if None in widths:
            return None, f"layer {widths.index(None)} has no {ffn} weight"
        if len(set(widths)) > 1:
            return None, (f"FFN pruning left the layers different widths ({', '.join(map(str, widths))}), and a "
                          "stock config has one intermediate size; use onnx or pt2")
        setattr(config, _ffn_attr(config), int(widths[0]))
    expected = {k: list(v.shape) for k, v in _meta_model(config, torch).state_dict().items()}
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        return None, (f"the saved weights do not fit a stock {_arch(config)}: "
                      + ("; ".join(filter(None, [f"missing {', '.join(missing[:3])}" if missing else "",
                                                 f"unexpected {', '.join(extra[:3])}" if extra else ""]))))
    wrong = [k for k in expected if expected[k] != saved[k]]
    if any("attention" in k for k in wrong):
        return None, HEAD_PRUNED
    if wrong:
        k = wrong[0]
        return None, f"{k} is {saved[k]} where a stock {_arch(config)} config gives {expected[k]}; use onnx or pt2"
    return config, None


def _arch(config) -> str:
    return (config.architectures or [f"{type(config).__name__.removesuffix('Config')}ForSequenceClassification"])[0]


def _ffn_attr(config) -> str:
    return "intermediate_size" if hasattr(config, "intermediate_size") else "hidden_dim"  # DistilBERT: hidden_dim


def _meta_model(config, torch):
    from transformers import AutoModelForSequenceClassification

    from optforge.modeling import _quiet_transformers

    with torch.device("meta"), _quiet_transformers():
        return AutoModelForSequenceClassification.from_config(config)


def _layout(config) -> tuple[str, Optional[str]]:
    """(the dotted name of the model's transformer layer list, the name inside a layer of its FFN's first
    Linear, None when there is none), read from a stock model of `config`."""
    import torch
    from torch import nn

    from optforge.modeling import encoder_layers

    model = _meta_model(config, torch)
    layers = encoder_layers(model.base_model)
    path = next(name for name, m in model.named_modules() if m is layers)
    width = getattr(config, _ffn_attr(config), None)
    ffn = next((name for name, m in layers[0].named_modules() if isinstance(m, nn.Linear)
                and m.out_features == width and m.in_features == config.hidden_size), None) if len(layers) else None
    return path, ffn


def write(artifact_dir: Path, out: Path, precision: Optional[str] = None) -> dict:
    """The stock model, loaded strictly from the artifact's weights, saved with `save_pretrained` in
    `precision` (default: the artifact's)."""
    from transformers import AutoModelForSequenceClassification

    from optforge import modeling
    from optforge.export import ExportError, save_tokenizer

    artifact_dir, out = Path(artifact_dir), Path(out)
    config, reason = stock_config(artifact_dir)
    if reason is not None:
        raise ExportError(f"not exportable as hf: {reason}")
    model, _, meta = modeling.load_classifier(artifact_dir)
    labels = list(meta.get("label_names") or model.label_names)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "single_label_classification"
    precision = precision or meta.get("precision", "fp32")
    with modeling._quiet_transformers():
        stock = AutoModelForSequenceClassification.from_config(config)
        stock.load_state_dict(model.hf.state_dict(), strict=True)  # the stock config describes every weight
        stock = stock.to(modeling.PRECISION_DTYPES[precision]).eval()
        stock.save_pretrained(str(out))
    save_tokenizer(artifact_dir, out, meta["max_length"])
    import transformers

    details = {"architecture": type(stock).__name__, "layers": config.num_hidden_layers,
               "dtype": str(stock.dtype).removeprefix("torch."),
               "runtime": f"transformers {transformers.__version__} (AutoModelForSequenceClassification)",
               "tokenizer": f"truncates at {meta['max_length']} tokens (model_max_length)"}
    if hasattr(config, _ffn_attr(config)):
        details["FFN width"] = getattr(config, _ffn_attr(config))
    return {"loader": LOADER.format(out=out.name), "details": details}


def load_logits(out: Path) -> Callable:
    """transformers alone: the directory loaded as the card's snippet loads it."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()

    def logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result = model(input_ids=torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
                           attention_mask=torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)))
        return result.logits.float().numpy()

    return logits
