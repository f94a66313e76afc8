"""data stage: parsing (GLUE TSV without quoting, CSV, JSONL), errors with file:line, stratified subsets."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from optforge.errors import DataError
from optforge.stages.data import label_mapping, read_examples, read_table, stratified_subset


def test_tsv_quotes_are_text_not_quoting(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('sentence\tlabel\n'
                 '"the emperor \'s new clothes " is a fine film\t1\n'
                 'a " half-quoted mess\t0\n'
                 '""\t1\n')
    rows = read_table(f, "sentence", "label")
    assert [r[0] for r in rows] == ['"the emperor \'s new clothes " is a fine film', 'a " half-quoted mess', '""']
    assert [r[1] for r in rows] == ["1", "0", "1"]
    assert rows[1][2] == f"{f}:3"


def test_bad_row_names_file_and_line(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("sentence\tlabel\ngood\t1\nbad\t0\nstray\ttab\t1\nok\t0\n")
    with pytest.raises(DataError, match=rf"{f}:4: expected 2 fields like the header, got 3"):
        read_table(f, "sentence", "label")


def test_missing_column_lists_the_columns(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(DataError, match=r"missing column 'sentence' \(columns: text, label\)"):
        read_table(f, "sentence", "label")


def test_bad_label_names_its_line(tmp_path):
    train = read_table(_write(tmp_path / "t.tsv", "sentence\tlabel\na\t0\nb\t1\nc\tpositive\n"), "sentence", "label")
    with pytest.raises(DataError, match=r"t\.tsv:4: label 'positive' is not a non-negative integer"):
        label_mapping(train, [])
    with pytest.raises(DataError, match=r"t\.tsv:3: empty label"):
        read_table(_write(tmp_path / "t.tsv", "sentence\tlabel\na\t0\nb\t\n"), "sentence", "label")


def test_string_labels_map_sorted_and_eval_must_use_known_labels(tmp_path):
    train = read_table(_write(tmp_path / "t.jsonl", "".join(
        json.dumps({"text": t, "y": y}) + "\n" for t, y in [("a", "pos"), ("b", "neg"), ("c", "neu")])),
        "text", "y")
    names, to_id = label_mapping(train, [])
    assert names == ["neg", "neu", "pos"] and to_id("pos", "x") == 2
    evals = read_table(_write(tmp_path / "e.jsonl", json.dumps({"text": "d", "y": "meh"}) + "\n"), "text", "y")
    _, to_id = label_mapping(train, evals)
    with pytest.raises(DataError, match=r"e\.jsonl:1: label 'meh' never occurs in the training file"):
        to_id(evals[0][1], evals[0][2])


def test_csv_uses_standard_quoting(tmp_path):
    f = _write(tmp_path / "d.csv", 'label,sentence\n1,"good, really ""good"""\n0,bad\n')
    assert [(r[0], r[1]) for r in read_table(f, "sentence", "label")] == [('good, really "good"', "1"), ("bad", "0")]


def test_stratified_subset_keeps_proportions_and_is_seeded():
    # grouped by label like the GLUE dev file: 300 of class 0, then 100 of class 1
    rows = [(f"s{i}", 0 if i < 300 else 1) for i in range(400)]
    sub = stratified_subset(rows, 40, seed=0)
    assert Counter(y for _, y in sub) == {0: 30, 1: 10}
    assert sub == stratified_subset(rows, 40, seed=0)
    assert sub != stratified_subset(rows, 40, seed=1)
    assert len(set(sub)) == 40 and set(sub) <= set(rows)
    assert {y for _, y in sub[:10]} == {0, 1}  # shuffled, not grouped
    # largest remainder: 7 of 3 classes sized 5/3/2 -> exact 3.5/2.1/1.4 -> 4/2/1
    rows3 = [("a", 0)] * 5 + [("b", 1)] * 3 + [("c", 2)] * 2
    assert Counter(y for _, y in stratified_subset(rows3, 7, seed=0)) == {0: 4, 1: 2, 2: 1}
    assert stratified_subset(rows, 1000, seed=0) == rows


def test_data_stage_writes_jsonl_and_metrics(tmp_path, run_stage):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "train.tsv", "sentence\tlabel\n" + "".join(f'nice " {i}\t{i % 2}\n' for i in range(100)))
    _write(src / "validation.tsv", "sentence\tlabel\n" + "".join(f"x{i}\t{int(i >= 30)}\n" for i in range(40)))
    params = {"dataset": str(src), "max_train_samples": 20, "max_eval_samples": 8, "max_length": 32}
    m = run_stage("data", params, tmp_path / "a")
    assert m == {"num_labels": 2, "train_size": 20, "eval_size": 8, "label_names": ["0", "1"], "max_length": 32,
                 "fingerprint": m["fingerprint"]}
    texts, labels = read_examples(tmp_path / "a" / "eval.jsonl")
    assert Counter(labels) == {0: 6, 1: 2}  # 30:10 in the grouped dev file
    texts, labels = read_examples(tmp_path / "a" / "train.jsonl")
    assert all(t == f'nice " {t.split()[-1]}' and labels[i] == int(t.split()[-1]) % 2 for i, t in enumerate(texts))
    again = run_stage("data", params, tmp_path / "b")
    assert again["fingerprint"] == m["fingerprint"]
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    other = run_stage("data", params | {"seed": 1}, tmp_path / "c")
    assert other["fingerprint"] != m["fingerprint"]


def test_hf_dataset_without_the_datasets_package_is_a_clear_error(tmp_path, monkeypatch, run_stage):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails even where it is installed
    with pytest.raises(DataError, match=r"needs the `datasets` package"):
        run_stage("data", {"dataset": "hf:glue/sst2"}, tmp_path / "out")


def _write(path, text):
    path.write_text(text)
    return path
