"""`optforge export`: a built row's model in a form other tools load without optforge installed.

Each format is a module (named in `FORMATS`, imported when used) with one contract:

  NAME = "hf"
  check(meta: dict, artifact_dir: Path) -> Optional[str]
      None when the artifact can be written in this format, else a one-line reason. `meta` is the
      artifact's optforge_model.json, with "precision" set to the row's precision (a float artifact is
      saved in fp32 and cast when loaded: a bf16 row of it computes in bf16).
  write(artifact_dir: Path, out: Path) -> {"loader": str, "details": dict}
      writes into `out` (an existing, empty directory); "loader" is a Python snippet that loads the
      export with that format's runtime alone (no optforge), naming the directory by `out.name` (`out`
      is a staging directory: the exporter puts the destination's name in its place), and "details"
      what the model card lists ({label: value}).
      A format that can cast a float artifact to the row's precision takes a keyword `precision`
      (hf does); the exporter passes it only when the row's precision is not the artifact's, and a
      format without it cannot take such a row.
  load_logits(out: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]
      (input_ids int64 [B, T], attention_mask int64 [B, T]) -> float32 logits [B, num_labels], through
      the target runtime alone: what the round trip compares with the cached artifact.
  TOKENIZER = "tokenizer"   (optional) where in `out` the Hugging Face tokenizer files are ("." : `out`
      itself); the round trip then also checks that `AutoTokenizer.from_pretrained` of it, called plainly
      (`tokenizer(texts, truncation=True)`), gives the token ids optforge gives (`save_tokenizer` writes
      it so: it truncates at the row's max_length).

`optforge.export.command.export_row` resolves the row, verifies its cache entry, writes the export into
a temporary directory beside the destination, runs the round trip, writes the model card and MANIFEST,
and only then renames the directory into place. Pure: no torch until a format's functions run.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from types import ModuleType
from typing import Optional

from optforge.errors import OptforgeError, one_line

FORMATS: dict[str, str] = {  # --format -> the module that writes it
    "hf": "optforge.export.hf",
    "onnx": "optforge.export.onnx",
    "pt2": "optforge.export.pt2",
}


class ExportError(OptforgeError):
    """An export that cannot be made (a row a format cannot describe, an occupied destination, a round
    trip whose predictions differ): nothing was written at the destination."""


def format_module(name: str) -> ModuleType:
    """The module of export format `name`; ExportError when it is unknown or not installed."""
    if name not in FORMATS:
        raise ExportError(f"unknown export format {name!r} (known: {', '.join(FORMATS)})")
    module = FORMATS[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise ExportError(f"export format {name!r} is not available in this installation of optforge "
                              f"(its module {module} is missing)") from None
        raise ExportError(f"export format {name!r} needs the Python package {e.name!r}, which is not "
                          f"installed ({one_line(e)})") from None


def installed() -> list[str]:
    """The formats whose module imports here, in registry order."""
    out = []
    for name in FORMATS:
        try:
            format_module(name)
        except ExportError:
            continue
        out.append(name)
    return out


def casts(module: ModuleType) -> bool:
    """Whether a format's `write` takes `precision` (writes a float artifact at the row's precision)."""
    return "precision" in inspect.signature(module.write).parameters


def refusal(module: ModuleType, meta: dict, artifact_dir: Path) -> Optional[str]:
    """Why format `module` cannot take this row (None: it can). `meta` carries the row's precision and,
    as "saved_precision", the precision the artifact's weights are stored in."""
    reason = module.check(meta, Path(artifact_dir))
    if reason is None and meta.get("precision") != meta.get("saved_precision", meta.get("precision")) \
            and not casts(module):
        reason = (f"the row computes in {meta['precision']} and this format writes the artifact's "
                  f"{meta['saved_precision']} weights as they are")
    return reason


def available(meta: dict, artifact_dir: Path) -> list[str]:
    """The installed formats that can take this row."""
    return [name for name in installed() if refusal(format_module(name), meta, artifact_dir) is None]


def save_tokenizer(artifact_dir: Path, out: Path, max_length: int) -> None:
    """The artifact's tokenizer saved into `out`, truncating at `max_length` by default (model_max_length):
    the row's inputs, as a plain `tokenizer(texts, truncation=True)` call makes them."""
    from transformers import AutoTokenizer

    from optforge import modeling

    with modeling._quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(Path(artifact_dir) / modeling.TOKENIZER_DIR),
                                                  model_max_length=int(max_length))
        tokenizer.save_pretrained(str(out))


def not_exportable(fmt: str, reason: str, others: list[str]) -> str:
    """The one message for a format that cannot take a row."""
    return f"not exportable as {fmt}: {reason}; available for this row: {', '.join(others) or 'none'}"
