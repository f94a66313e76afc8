"""data: read train/eval examples (TSV/CSV/JSONL or hf:<dataset>), subsample, write train.jsonl + eval.jsonl.

GLUE TSVs are tab-separated with a header and *no quoting* (sentences contain `"`), so .tsv files are
read with csv.QUOTE_NONE; .csv files use standard CSV quoting. Subsets are stratified by label and
seeded: the GLUE dev file is grouped by label, so "the first N rows" would be one class.
No torch here.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections import Counter
from pathlib import Path
from optforge.errors import DataError, one_line
from optforge.recipe import DataSpec
from optforge.stages.base import StageContext, StageKind

TRAIN_FILE = "train.jsonl"
EVAL_FILE = "eval.jsonl"


def run(ctx: StageContext) -> dict:
    spec: DataSpec = ctx.params
    if spec.dataset.startswith("hf:"):
        train = _read_hf(spec, spec.train)
        evals = _read_hf(spec, spec.eval)
    else:
        train = read_table(_data_file(ctx, spec, "train"), spec.text, spec.label)
        evals = read_table(_data_file(ctx, spec, "eval"), spec.text, spec.label)

    for role, rows in (("train", train), ("eval", evals)):
        if not rows:
            raise DataError(f"{spec.dataset}: the {role} split has no examples")
    label_names, to_id = label_mapping(train, evals)
    train_rows = [(text, to_id(label, where)) for text, label, where in train]
    eval_rows = [(text, to_id(label, where)) for text, label, where in evals]
    if spec.max_train_samples is not None:
        train_rows = stratified_subset(train_rows, spec.max_train_samples, spec.seed)
    if spec.max_eval_samples is not None:
        eval_rows = stratified_subset(eval_rows, spec.max_eval_samples, spec.seed)

    digest = hashlib.sha256()
    for name, rows in ((TRAIN_FILE, train_rows), (EVAL_FILE, eval_rows)):
        text = "".join(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n" for t, y in rows)
        (ctx.out / name).write_text(text, encoding="utf-8")
        digest.update(text.encode("utf-8"))
    counts = Counter(y for _, y in train_rows)
    ctx.log(f"data: {len(train_rows)} train / {len(eval_rows)} eval examples, labels "
            + ", ".join(f"{label_names[c]}={counts[c]}" for c in sorted(counts)))
    return {"num_labels": len(label_names), "train_size": len(train_rows), "eval_size": len(eval_rows),
            "label_names": label_names, "max_length": spec.max_length, "fingerprint": digest.hexdigest()}


KIND = StageKind(kind="data", version="1", params_model=DataSpec, run=run, uses_torch=False)


# --------------------------------------------------------------------------- reading


Row = tuple[str, str, str]  # (text, raw label, "file:line")


def _data_file(ctx: StageContext, spec: DataSpec, role: str) -> Path:
    if role in ctx.data_files:
        return Path(ctx.data_files[role])
    from optforge.datasets import resolve_dataset_dir

    return resolve_dataset_dir(spec.dataset) / (spec.train if role == "train" else spec.eval)


def read_table(path: Path, text_col: str, label_col: str) -> list[Row]:
    """Rows of a .tsv/.csv/.jsonl file as (text, raw label string, "file:line")."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json":
        return _read_jsonl(path, text_col, label_col)
    if suffix not in (".tsv", ".csv", ".txt"):
        raise DataError(f"{path}: unknown data file type {suffix!r} (use .tsv, .csv or .jsonl)")
    rows: list[Row] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        if suffix == ".csv":
            reader = csv.reader(f)
        else:  # GLUE style: tabs, no quoting at all
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected a header row)")
        text_i = _column(header, text_col, path)
        label_i = _column(header, label_col, path)
        for fields in reader:
            where = f"{path}:{reader.line_num}"
            if not fields or fields == [""]:
                continue  # blank line
            if len(fields) != len(header):
                raise DataError(f"{where}: expected {len(header)} fields like the header, got {len(fields)}"
                                + (" (a tab inside the text?)" if suffix != ".csv" else ""))
            rows.append(_row(fields[text_i], fields[label_i], where))
    return rows


def _read_jsonl(path: Path, text_col: str, label_col: str) -> list[Row]:
    rows: list[Row] = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object per line")
            for col in (text_col, label_col):
                if col not in obj:
                    raise DataError(f"{where}: missing key {col!r} (keys: {', '.join(obj)})")
            label = obj[label_col]
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f"{where}: label {label!r} must be an integer or a string")
            rows.append(_row(obj[text_col], str(label), where))
    return rows


def _row(text, label: str, where: str) -> Row:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: empty text")
    if not label.strip():
        raise DataError(f"{where}: empty label")
    return text, label.strip(), where


def _column(header: list[str], name: str, path: Path) -> int:
    if name not in header:
        raise DataError(f"{path}:1: missing column {name!r} (columns: {', '.join(header)}); "
                        f"set data.text / data.label in the recipe")
    return header.index(name)


def _read_hf(spec: DataSpec, split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec.dataset}: reading hf: datasets needs the `datasets` package "
                        f"(pip install 'optforge[hf]'), or download the files and point data.dataset "
                        f"at their folder") from None
    name = spec.dataset[3:]
    split = split.rsplit(".", 1)[0] if split.endswith((".tsv", ".csv", ".jsonl")) else split
    path, _, config = name.partition(":")  # "hf:nyu-mll/glue:sst2" names a config explicitly
    try:
        try:
            ds = datasets.load_dataset(path, config or None, split=split)
        except Exception:  # noqa: BLE001 - "glue/sst2" means dataset "glue", config "sst2"
            if config or "/" not in path:
                raise
            head, _, tail = path.rpartition("/")
            ds = datasets.load_dataset(head, tail, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, unknown split: one clear line
        reason = one_line(e)
        raise DataError(f"{spec.dataset} split {split!r}: cannot load ({reason}); offline? download the "
                        f"files and point data.dataset at their folder") from None
    for col in (spec.text, spec.label):
        if col not in ds.column_names:
            raise DataError(f"{spec.dataset} split {split!r}: missing column {col!r} "
                            f"(columns: {', '.join(ds.column_names)})")
    return [_row(r[spec.text], str(r[spec.label]), f"{spec.dataset}[{split}]:{i}")
            for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- labels & subsets


def label_mapping(train: list[Row], evals: list[Row]):
    """(label_names, to_id). Integer labels keep their values (names "0", "1", ...); string labels map to
    ids in sorted order. A label of the other type, a negative id, or an eval label that train never
    uses is a DataError naming its file:line."""
    _, first, first_where = train[0] if train else ("", "0", "")
    int_labels = _is_int(first)
    if int_labels:
        for _, label, where in train + evals:
            if not _is_int(label) or int(label) < 0:
                raise DataError(f"{where}: label {label!r} is not a non-negative integer like the others "
                                f"(e.g. {first!r} at {first_where})")
        n = max(int(label) for _, label, _ in train) + 1
        names = [str(i) for i in range(n)]
    else:
        for _, label, where in train + evals:
            if _is_int(label):
                raise DataError(f"{where}: label {label!r} is an integer but {first_where} has the string "
                                f"label {first!r}; use one kind")
        names = sorted({label for _, label, _ in train})
    ids = {name: i for i, name in enumerate(names)}

    def to_id(label: str, where: str) -> int:
        key = str(int(label)) if int_labels else label
        if key not in ids:
            raise DataError(f"{where}: label {label!r} never occurs in the training file "
                            f"(train labels: {', '.join(names)})")
        return ids[key]

    return names, to_id


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


def stratified_subset(rows: list, n: int, seed: int, label=lambda r: r[1]) -> list:
    """A seeded subset of `n` rows (all rows if fewer) whose label proportions match the full set's
    (largest-remainder rounding), in shuffled order."""
    if n >= len(rows):
        return list(rows)
    rng = random.Random(seed)
    by_label: dict = {}
    for r in rows:
        by_label.setdefault(label(r), []).append(r)
    keys = sorted(by_label)
    exact = {k: n * len(by_label[k]) / len(rows) for k in keys}
    take = {k: int(exact[k]) for k in keys}
    rest = n - sum(take.values())
    for k in sorted(keys, key=lambda k: (-(exact[k] - take[k]), k))[:rest]:
        take[k] += 1
    chosen = []
    for k in keys:
        members = list(by_label[k])
        rng.shuffle(members)
        chosen += members[:take[k]]
    rng.shuffle(chosen)
    return chosen


class Splits:
    """A data-stage artifact read back: texts and label ids of both splits, plus the stage's metrics."""

    def __init__(self, data_dir, metrics: dict | None = None):
        self.train_texts, self.train_labels = read_examples(Path(data_dir) / TRAIN_FILE)
        self.eval_texts, self.eval_labels = read_examples(Path(data_dir) / EVAL_FILE)
        metrics = metrics or {}
        self.num_labels = int(metrics.get("num_labels") or max(self.train_labels + self.eval_labels) + 1)
        self.label_names = list(metrics.get("label_names") or [str(i) for i in range(self.num_labels)])
        self.max_length = int(metrics.get("max_length") or 64)


def read_examples(path) -> tuple[list[str], list[int]]:
    """texts, labels of a data-stage jsonl file."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            texts.append(obj["text"])
            labels.append(int(obj["label"]))
    return texts, labels
