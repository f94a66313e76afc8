"""Export format "pt2": the AOTInductor package of a row compiled on CPU (`compile:` gave it format "aoti"),
as it is, plus its tokenizer and a config.json with the labels and the shapes the package accepts.

  model.pt2      the package (generated C++ compiled into a shared library, plus the weights);
                 `torch._inductor.aoti_load_package` loads it: torch alone, no compiler, no optforge
  tokenizer/     the Hugging Face tokenizer files (`AutoTokenizer.from_pretrained`), truncating at max_length
  config.json    {"id2label", "label2id", "num_labels", "max_length", "max_batch", "precision",
                  "inputs", "torch": the version that compiled it, "cpu": the CPU it was compiled on}

The package runs batches of 1..max_batch sequences of 2..max_length tokens (its dynamic dims) on a CPU
with the instruction set it was compiled for, under the torch version that compiled it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

NAME = "pt2"
PACKAGE = "model.pt2"  # optforge.artifacts.compiled.PACKAGE, spelt here: load_logits must not import optforge
TOKENIZER = "tokenizer"
CONFIG = "config.json"

WHAT = "pt2 is the AOTInductor package of a row compiled with `compile:` on CPU"
FORMAT_WORDS = {
    "float": "an uncompiled float model (format float); give the row `compile: default` and build it on CPU",
    "torch-int8-dynamic": "an uncompiled quantized model (format torch-int8-dynamic); give the row "
                          "`compile: default` and build it on CPU",
    "torchao": "an uncompiled quantized model (format torchao); give the row `compile: default` and build it on CPU",
    "compiled": "compiled with torch.compile (format compiled: Inductor cache artifacts that only optforge "
                "reloads; the compile stage falls back to it on CUDA and where AOTInductor failed)",
}

LOADER = '''import json, torch
from transformers import AutoTokenizer

path = {out!r}
model = torch._inductor.aoti_load_package(f"{{path}}/model.pt2")
tokenizer = AutoTokenizer.from_pretrained(f"{{path}}/tokenizer")
config = json.load(open(f"{{path}}/config.json"))
batch = tokenizer(["a gripping, funny film"], padding=True, truncation=True, return_tensors="pt")
with torch.inference_mode():
    logits = model(batch["input_ids"], batch["attention_mask"]).float()
print([config["id2label"][str(i)] for i in logits.argmax(-1).tolist()])
'''


def check(meta: dict, artifact_dir: Path) -> Optional[str]:
    fmt = meta.get("format")
    if fmt == "aoti":
        if not (Path(artifact_dir) / PACKAGE).is_file():
            return f"the artifact has no {PACKAGE}"
        return None
    return f"{WHAT}; this row is {FORMAT_WORDS.get(fmt, f'format {fmt}')}"


def write(artifact_dir: Path, out: Path) -> dict:
    import torch

    from optforge import modeling
    from optforge.device import probe_cpu
    from optforge.export import save_tokenizer

    artifact_dir, out = Path(artifact_dir), Path(out)
    meta = modeling.read_meta(artifact_dir)
    shutil.copy2(artifact_dir / PACKAGE, out / PACKAGE)
    save_tokenizer(artifact_dir, out / TOKENIZER, meta["max_length"])
    # the compile stage is hardware-bound: its entry is fresh only on a machine with this CPU and ISA
    probe = probe_cpu()
    cpu = f"{probe['name']} ({' '.join(probe['isa']) or 'no AVX2/AVX-512 flags'})"
    labels = list(meta.get("label_names") or [str(i) for i in range(int(meta["num_labels"]))])
    inputs = [{"name": name, "dtype": "int64", "shape": ["batch", "seq"]} for name in ("input_ids", "attention_mask")]
    config = {"id2label": {str(i): name for i, name in enumerate(labels)},
              "label2id": {name: i for i, name in enumerate(labels)},
              "num_labels": len(labels), "max_length": int(meta["max_length"]), "max_batch": int(meta["max_batch"]),
              "min_length": 2, "precision": meta["precision"], "inputs": inputs,
              "torch": torch.__version__.split("+")[0], "cpu": cpu}
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"loader": LOADER.format(out=out.name),
            "details": {"runtime": f"torch {torch.__version__} (torch._inductor.aoti_load_package)",
                        "batch sizes": f"1..{config['max_batch']}",
                        "sequence lengths": f"2..{config['max_length']} tokens",
                        "precision": meta["precision"],
                        "compiled on": config["cpu"],
                        "compile mode": meta.get("mode", "default"),
                        "inner format": meta.get("inner_format", "float"),
                        "requires": (f"torch {config['torch']} and a CPU with the instruction set of the one it "
                                     "was compiled on (the package holds native code)")}}


def load_logits(out: Path) -> Callable:
    """torch alone: the package loaded as the card's snippet loads it."""
    import numpy as np
    import torch

    model = torch._inductor.aoti_load_package(str(Path(out) / PACKAGE))

    def logits(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            result = model(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
                           torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)))
        return result.float().numpy()

    return logits
