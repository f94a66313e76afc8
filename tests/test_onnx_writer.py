"""The `onnx` export writer (optforge/export/onnx.py): check() says which artifacts it can export and why
not; write() produces a folder that onnxruntime and the tokenizer libraries run without optforge, with the
logits of the row it came from; load_logits() is that path as a function."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optforge.artifacts import load_runnable
from optforge.errors import OptforgeError
from optforge.export import onnx as writer
from optforge.modeling import read_meta
from optforge.stages.base import StageContext
from optforge.stages.registry import get_kind
from optforge_testing import save_random_classifier

TEXTS = ["a gripping , funny film", "dull", "the second half drags on and on and on", "superb"]


def _stage(kind: str, params: dict, out: Path, inputs: dict) -> dict:
    k = get_kind(kind)
    out.mkdir(parents=True)
    ctx = StageContext(name=kind, kind=kind, params=k.params_model.model_validate(params), inputs=inputs,
                       input_metrics={}, out=out, device="cpu", log=lambda s: None)
    return k.run(ctx)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-src")
    float_dir, _, _ = save_random_classifier(root / "float", seed=4, max_length=32)
    _stage("onnxruntime", {"precision": "fp32", "quantization": "int8-dynamic"}, root / "ort-int8",
           {"model": float_dir})
    _stage("quantize", {"method": "torch-int8-dynamic"}, root / "dyn8", {"model": float_dir})
    return {"float": float_dir, "ort-int8": root / "ort-int8", "dyn8": root / "dyn8"}


def _ids(out: Path, texts):
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(out))(list(texts), padding=True, truncation=True, max_length=32,
                                                  return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


@pytest.mark.parametrize("source", ["float", "ort-int8"])
def test_write_then_load_logits_reproduces_the_row(artifacts, tmp_path, source):
    src = artifacts[source]
    assert writer.check(read_meta(src), src) is None
    out = tmp_path / "out"
    out.mkdir()
    info = writer.write(src, out)
    assert info["opset"] == 17 and isinstance(info["details"], dict)
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["num_labels"] == 2 and config["max_length"] == 32

    ids, mask = _ids(out, TEXTS)
    logits = writer.load_logits(out)(ids, mask)
    assert logits.dtype == np.float32 and logits.shape == (len(TEXTS), 2)
    row = load_runnable(src, "cpu").forward({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    tol = 0 if source == "ort-int8" else 1e-5  # the same file, or the float model re-exported
    np.testing.assert_allclose(logits, row.numpy(), rtol=0, atol=tol)
    if source == "ort-int8":
        assert (out / "model.onnx").read_bytes() == (src / "model.onnx").read_bytes()
        assert info["details"]["quantization"] == "int8-dynamic"
        assert "com.microsoft" in info["details"]["operators"]
    else:
        assert info["details"]["operators"].startswith("standard ONNX")


def test_tokenizers_alone_read_the_exported_tokenizer(artifacts, tmp_path):
    from tokenizers import Tokenizer

    out = tmp_path / "out"
    out.mkdir()
    writer.write(artifacts["ort-int8"], out)
    texts = TEXTS + ["a very long review " * 20]  # past max_length (32): truncated
    ids, mask = _ids(out, texts)
    encodings = Tokenizer.from_file(str(out / "tokenizer.json")).encode_batch(texts)
    assert [e.ids for e in encodings] == ids.tolist() and [e.attention_mask for e in encodings] == mask.tolist()
    assert ids.shape[1] == 32


def test_the_loader_snippet_runs_without_optforge(artifacts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    snippet = writer.write(artifacts["ort-int8"], out)["loader"]
    # optforge made unimportable: the snippet must need onnxruntime and the tokenizer alone
    code = "import sys\nsys.modules['optforge'] = None\n" + snippet
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    runnable = load_runnable(artifacts["ort-int8"], "cpu")
    assert printed == [p["label_name"] for p in runnable.predict(writer.EXAMPLE_TEXTS)]


def test_pytorch_int8_is_refused_with_the_way_out(artifacts, tmp_path):
    src = artifacts["dyn8"]
    reason = writer.check(read_meta(src), src)
    assert reason == ("PyTorch dynamic int8 packed weights have no ONNX operator "
                      "mapping; export the row's float model, or add a `runtime: onnxruntime` row with the same "
                      "quantize entry (ONNX int8)")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OptforgeError, match="not exportable as onnx"):
        writer.write(src, out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("fmt, words", [("torchao", "torchao tensor subclasses"),
                                        ("aoti", "compiled code"), ("compiled", "compiled code"),
                                        ("mystery", "unknown artifact format 'mystery'")])
def test_other_formats_are_refused_in_one_line(tmp_path, fmt, words):
    reason = writer.check({"format": fmt}, tmp_path)
    assert words in reason and "not exportable" not in reason and "\n" not in reason  # the registry prefixes it


def test_name_is_onnx():
    assert writer.NAME == "onnx"
