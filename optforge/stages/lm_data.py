"""lm_data (the `data` stage of a causal-lm recipe): a plain-text corpus -> train.jsonl + eval.jsonl ({"text"}).

Sources: a .txt file (one document per non-blank line), a .tsv/.csv column or a .jsonl field (`data.text`),
or an `hf:` dataset's column. The eval split is `data.eval` or, with `data.eval_fraction`, a seeded share of
`train` (taken before any subsetting, so no eval text is trained on). `max_*_samples` keep a seeded random
subset. No torch here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

from optforge.errors import DataError, one_line
from optforge.recipe import DataSpec
from optforge.stages.base import StageContext, StageKind
from optforge.stages.data import EVAL_FILE, TRAIN_FILE


def run(ctx: StageContext) -> dict:
    spec: DataSpec = ctx.params
    train = _read(ctx, spec, "train")
    if spec.eval_fraction is not None:
        train, evals = split(train, spec.eval_fraction, spec.seed)
    else:
        evals = _read(ctx, spec, "eval")
    for role, rows in (("train", train), ("eval", evals)):
        if not rows:
            raise DataError(f"{spec.dataset}: the {role} split has no text")
    if spec.max_train_samples is not None:
        train = subset(train, spec.max_train_samples, spec.seed)
    if spec.max_eval_samples is not None:
        evals = subset(evals, spec.max_eval_samples, spec.seed)
    digest = hashlib.sha256()
    for name, rows in ((TRAIN_FILE, train), (EVAL_FILE, evals)):
        text = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
        (ctx.out / name).write_text(text, encoding="utf-8")
        digest.update(text.encode("utf-8"))
    ctx.log(f"data: {len(train)} train / {len(evals)} eval texts")
    return {"train_size": len(train), "eval_size": len(evals), "train_chars": sum(map(len, train)),
            "eval_chars": sum(map(len, evals)), "max_length": spec.max_length, "fingerprint": digest.hexdigest()}


KIND = StageKind(kind="lm_data", version="1", params_model=DataSpec, run=run, uses_torch=False, task="causal-lm")


def split(rows: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, eval): a seeded `fraction` of the rows (at least one) for eval, the rest for train, both in
    file order."""
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DataError(f"eval_fraction {fraction} of {len(rows)} text(s) leaves nothing to train on")
    chosen = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return [r for i, r in enumerate(rows) if i not in chosen], [r for i, r in enumerate(rows) if i in chosen]


def subset(rows: list[str], n: int, seed: int) -> list[str]:
    if n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _read(ctx: StageContext, spec: DataSpec, role: str) -> list[str]:
    name = spec.train if role == "train" else spec.eval
    if spec.dataset.startswith("hf:"):
        return read_hf_texts(spec.dataset, name, spec.text)
    if role in ctx.data_files:
        path = Path(ctx.data_files[role])
    else:
        from optforge.datasets import resolve_dataset_dir

        path = resolve_dataset_dir(spec.dataset) / name
    return read_texts(path, spec.text)


def read_texts(path: Path, column: str) -> list[str]:
    """The texts of a .txt (lines), .tsv/.csv (column `column`, GLUE-style TSV: no quoting) or .jsonl
    (field `column`) file; blank lines and blank texts are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f if line.strip()]
    if suffix in (".jsonl", ".json"):
        return _jsonl(path, column)
    if suffix not in (".tsv", ".csv"):
        raise DataError(f"{path}: unknown text file type {suffix!r} (use .txt lines, .tsv/.csv or .jsonl)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f) if suffix == ".csv" else csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected a header row)")
        if column not in header:
            raise DataError(f"{path}:1: missing column {column!r} (columns: {', '.join(header)}); set data.text")
        i = header.index(column)
        out = []
        for fields in reader:
            if not fields or fields == [""]:
                continue
            if len(fields) != len(header):
                raise DataError(f"{path}:{reader.line_num}: expected {len(header)} fields like the header, got "
                                f"{len(fields)}")
            if fields[i].strip():
                out.append(fields[i].strip())
        return out


def _jsonl(path: Path, field: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(obj) if isinstance(obj, dict) else "not an object"
                raise DataError(f"{path}:{n}: no field {field!r} ({keys}); set data.text")
            if not isinstance(obj[field], str):
                raise DataError(f"{path}:{n}: field {field!r} is not a string")
            if obj[field].strip():
                out.append(obj[field].strip())
    return out


def read_hf_texts(dataset: str, split_name: str, column: str) -> list[str]:
    """A `hf:<path>[:<config>]` dataset split's `column` through `datasets.load_dataset` (network or the
    local datasets cache)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset}: reading hf: datasets needs the `datasets` package (pip install datasets), "
                        f"or download the text and point data.dataset at its folder") from None
    path, _, config = dataset[3:].partition(":")
    split_name = split_name.rsplit(".", 1)[0] if split_name.endswith((".tsv", ".csv", ".jsonl", ".txt")) else split_name
    try:
        ds = datasets.load_dataset(path, config or None, split=split_name)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, unknown split: one clear line
        raise DataError(f"{dataset} split {split_name!r}: cannot load ({one_line(e)}); offline? download the "
                        f"text and point data.dataset at its folder") from None
    if column not in ds.column_names:
        raise DataError(f"{dataset} split {split_name!r}: missing column {column!r} "
                        f"(columns: {', '.join(ds.column_names)}); set data.text")
    return [t.strip() for t in ds[column] if isinstance(t, str) and t.strip()]
