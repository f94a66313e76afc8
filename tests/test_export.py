"""`optforge export`: a built row's model in a form other tools load without optforge.

On recipes/tiny.yaml built once per session (conftest's `built_tiny`), copied once for this module: the
pt2 export of its compiled row (an AOTInductor package on this CPU), the refusals, the destination rules
and the MANIFEST. The hf format's stock-head path runs on an artifact saved by modeling.save_classifier of
a `HFSeqClassifier`. Loading an export "without optforge" is checked in a fresh interpreter in which
`import optforge` raises (an import hook; `python -I` alone would still find the installed package).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from optforge_testing import copy_built, shared_data_root
from optforge.export.card import MANIFEST, code, fenced, read_manifest, text
from optforge.lockfile import read_lock

sys.path.insert(0, str(Path(__file__).parent / "stages"))  # tiny_models, as tests/test_byom.py does
pytestmark = pytest.mark.skipif(not (shared_data_root() / "sst2" / "train.tsv").is_file(), reason="no SST-2 data")

COMPILED = "student-compiled"
TEXTS = ["a gripping , funny film", "dull , lifeless and far too long", "it 's not bad", "a masterpiece"]
EVAL_N = 256  # recipes/tiny.yaml: max_eval_samples


@pytest.fixture(scope="module")
def tiny(built_tiny, tmp_path_factory):
    return copy_built(built_tiny, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def pt2_export(tiny):
    """The compiled row exported as pt2 once: (CompletedProcess, out dir)."""
    out = tiny.root / "exports" / "student-pt2"
    result = tiny.run("export", tiny.recipe, "--config", COMPILED, "--format", "pt2", "--out", out, "--device", "cpu")
    return result, out


def export(t, *args):
    return t.run("export", t.recipe, *args, "--device", "cpu")


def one_error_line(result) -> str:
    """A CLI error: exit 2, and stderr is exactly one `error: ...` line (no traceback)."""
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def entry_key(t, stage: str) -> str:
    return read_lock(t.recipe.with_suffix(".lock"))["stages"][stage]["key"]


# --------------------------------------------------------------------------- running an export "without optforge"

NO_OPTFORGE = textwrap.dedent("""
    import sys

    class NoOptforge:
        def find_spec(self, name, path=None, target=None):
            if name == "optforge" or name.startswith("optforge."):
                raise ImportError(f"optforge cannot be imported here ({name})")
            return None

    sys.meta_path.insert(0, NoOptforge())
    try:
        import optforge
    except ImportError:
        pass
    else:
        raise SystemExit("optforge was importable")
""")


def run_without_optforge(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """`script` in `python -I` (no PYTHONPATH, no user site, cwd outside the repo) where importing optforge
    raises; its stdout's last line is returned parsed as JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OPTFORGE"))}
    result = subprocess.run([sys.executable, "-I", "-c", NO_OPTFORGE + script], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def card_snippet(out: Path) -> str:
    """The loading snippet of an export's model card."""
    card = (out / "README.md").read_text()
    start = card.index("```python\n") + len("```python\n")
    return card[start:card.index("\n```", start)]


def cached_labels(artifact: Path, texts: list[str]) -> list[int]:
    from optforge.artifacts import load_runnable

    return [p["label"] for p in load_runnable(artifact, "cpu").predict(texts)]


# --------------------------------------------------------------------------- pt2


def test_pt2_export_of_the_compiled_row_round_trips_on_the_whole_eval_split(pt2_export, tiny):
    result, out = pt2_export
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith(
        f"exported '{COMPILED}' as pt2 to {out}: round trip on {EVAL_N} eval examples: argmax identical "
        f"{EVAL_N}/{EVAL_N}, max |logit diff| 0 (allowed "), result.stdout
    assert "round trip: 8/8 batches" in result.stderr  # progress lines on a stderr that is not a terminal
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model.pt2", "config.json", "README.md", MANIFEST, "tokenizer/tokenizer.json"} <= files
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["max_length"] == 64
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging dir left


def test_pt2_card_reports_the_row_the_key_and_the_round_trip(pt2_export, tiny):
    _, out = pt2_export
    card = (out / "README.md").read_text()
    results = json.loads((tiny.root / "reports" / "tiny" / "results.json").read_text())
    row = next(r for r in results["configs"] if r["name"] == COMPILED)
    assert f"`{entry_key(tiny, f'compile:{COMPILED}')}` (stage `compile:{COMPILED}`, artifact format `aoti`)" in card
    assert f"| recipe hash | `{results['recipe_hash']}` |" in card
    assert f"| {row['accuracy'] * 100:.2f}% (n = {EVAL_N}) | {row['accuracy_delta']:+.2f} pts |" in card
    for b, lat in row["latency_ms"].items():
        assert f"| {b} | {lat['p50']:.3f} | {row['e2e_latency_ms'][b]['p50']:.3f} | {row['speedup'][b]:.2f}x |" in card
    assert "Measured on cpu: " in card
    assert f"| {EVAL_N} / {EVAL_N} | 0 | " in card and f"| {EVAL_N} / {EVAL_N} |\n" in card  # argmax, token ids
    assert "torch._inductor.aoti_load_package" in card_snippet(out)


def test_pt2_export_loads_with_torch_alone_and_predicts_what_optforge_predicts(pt2_export, tiny):
    _, out = pt2_export
    script = card_snippet(out) + textwrap.dedent(f"""
        import json
        batch = tokenizer({TEXTS!r}, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            labels = model(batch["input_ids"], batch["attention_mask"]).argmax(-1).tolist()
        print(json.dumps(labels))
    """)
    labels = run_without_optforge(script, cwd=out.parent)
    from optforge.cache import Cache

    assert labels == cached_labels(Cache(tiny.cache).entry_dir(entry_key(tiny, f"compile:{COMPILED}")), TEXTS)


def test_manifest_lists_every_other_file_with_its_sha256_and_size(pt2_export):
    _, out = pt2_export
    entries = read_manifest(out / MANIFEST)
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert [e["path"] for e in entries] == on_disk
    for e in entries:
        data = (out / e["path"]).read_bytes()
        assert (e["sha256"], e["size"]) == (hashlib.sha256(data).hexdigest(), len(data)), e["path"]


# --------------------------------------------------------------------------- refusals


def test_hf_refuses_an_optforge_head_row_with_the_reason(tiny, tmp_path):
    out = tmp_path / "hf"
    line = one_error_line(export(tiny, "--config", "baseline", "--format", "hf", "--out", out))
    prefix = ("error: not exportable as hf: the row uses optforge's mean-pooling head, which no stock transformers "
              "*ForSequenceClassification head computes; export as onnx or pt2, or give the teacher its stock head "
              "(`pooling: stock`); available for this row: ")
    assert line.startswith(prefix), line
    assert "hf" not in line[len(prefix):].split(", ") and "pt2" not in line[len(prefix):].split(", ")
    assert not out.exists()


def test_hf_refuses_a_compiled_row_and_names_pt2(tiny, tmp_path):
    line = one_error_line(export(tiny, "--config", COMPILED, "--format", "hf", "--out", tmp_path / "hf"))
    assert line.startswith("error: not exportable as hf: the row is compiled (format aoti), which no stock "
                           "transformers config describes; export the float row it was compiled from (the same "
                           "model without `compile:`) as hf, or this row as pt2; available for this row: "), line
    assert "pt2" in line.rpartition("available for this row: ")[2].split(", ")


def test_pt2_refuses_an_uncompiled_row(tiny, tmp_path):
    line = one_error_line(export(tiny, "--config", "student-dyn8", "--format", "pt2", "--out", tmp_path / "p"))
    assert line.startswith("error: not exportable as pt2: pt2 is the AOTInductor package of a row compiled with "
                           "`compile:` on CPU; this row is an uncompiled quantized model (format "
                           "torch-int8-dynamic); "), line


def test_onnx_refuses_pytorch_int8_once_prefixed_and_hf_names_onnx_for_an_ort_row(tiny, tmp_path):
    line = one_error_line(export(tiny, "--config", "student-dyn8", "--format", "onnx", "--out", tmp_path / "o"))
    assert line == ("error: not exportable as onnx: PyTorch dynamic int8 packed weights have no ONNX operator "
                    "mapping; export the row's float model, or add a `runtime: onnxruntime` row with the same "
                    "quantize entry (ONNX int8); available for this row: none"), line
    line = one_error_line(export(tiny, "--config", "student-ort-int8", "--format", "hf", "--out", tmp_path / "h"))
    assert line == ("error: not exportable as hf: an ONNX Runtime row is an ONNX graph, not PyTorch weights a "
                    "transformers config can describe; export it as onnx, or the float row it was built from as "
                    "hf; available for this row: onnx"), line


def test_unknown_and_unbuilt_rows_are_clear_errors(tiny, tmp_path):
    line = one_error_line(export(tiny, "--config", "nosuch", "--format", "pt2", "--out", tmp_path / "x"))
    assert line == ("error: unknown config 'nosuch' (known: baseline, student, pruned, sparse, student-dyn8, "
                    "student-compiled, student-ort, student-ort-int8)")
    more = tiny.recipe.with_name("more.yaml")  # the same recipe with two rows nobody built
    more.write_text(tiny.recipe.read_text().replace(
        "configs:\n", "configs:\n  - {name: later-bf16, model: teacher, precision: bf16}\n"
                      "  - {name: later-ao8, model: student, quantize: ao8}\n"))
    result = tiny.run("export", more, "--config", "later-ao8", "--format", "pt2", "--out", tmp_path / "x",
                      "--device", "cpu")
    line = one_error_line(result)
    assert line.startswith("error: config 'later-ao8' is not built (quantize:later-ao8: ") and \
        line.endswith(f"); run optforge build {more} first"), line
    result = tiny.run("export", more, "--config", "later-bf16", "--format", "hf", "--out", tmp_path / "x",
                      "--device", "cpu")
    assert one_error_line(result) == (
        f"error: config 'later-bf16' is not built (not built: evaluate:later-bf16, benchmark:later-bf16); run "
        f"optforge build {more} first (the export's model card reports the row's measurements)")
    assert not (tmp_path / "x").exists()


def test_a_damaged_entry_is_refused_naming_the_file(built_tiny, tmp_path):
    from optforge.cache import Cache

    t = copy_built(built_tiny, tmp_path / "copy")
    package = Cache(t.cache).entry_dir(entry_key(t, f"compile:{COMPILED}")) / "model.pt2"
    st = package.stat()
    data = bytearray(package.read_bytes())
    data[len(data) // 2] ^= 0xFF
    package.write_bytes(bytes(data))
    os.utime(package, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime kept: only a hash sees it
    line = one_error_line(export(t, "--config", COMPILED, "--format", "pt2", "--out", tmp_path / "out"))
    assert "model.pt2 sha256 mismatch" in line and f"--force compile:{COMPILED}" in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the destination


def test_a_non_empty_out_is_refused_without_force_and_replaced_with_it(tiny, pt2_export, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    args = ("--config", COMPILED, "--format", "pt2", "--out")
    assert one_error_line(export(tiny, *args, foreign)) == (
        f"error: --out {foreign} is not empty; pass --force to replace it (a previous export), or choose another --out")
    assert one_error_line(export(tiny, *args, foreign, "--force")) == (
        f"error: --out {foreign} is not empty and is not an optforge export (no optforge MANIFEST): --force replaces "
        "only a previous export; remove it yourself or choose another --out")
    assert (foreign / "notes.txt").read_text() == "mine"

    _, previous = pt2_export
    out = tmp_path / "again"
    shutil.copytree(previous, out)
    (out / "stale.txt").write_text("from an older export")
    refused = export(tiny, *args, out)
    assert one_error_line(refused).startswith(f"error: --out {out} is not empty; pass --force")
    assert (out / "stale.txt").exists()
    replaced = export(tiny, *args, out, "--force")
    assert replaced.returncode == 0, replaced.stderr
    assert not (out / "stale.txt").exists()
    assert [e["path"] for e in read_manifest(out / MANIFEST)] == sorted(
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "foreign"]  # nothing left beside it


def test_an_interrupted_export_leaves_nothing_at_out_and_is_swept(tmp_path):
    """A staging directory of a dead export (SIGKILL) is removed by the next export of that destination;
    a live one's is not; an old export renamed aside by a dead --force is kept while --out is missing."""
    from optforge.export.publish import staging_dir, sweep

    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".model.export-{dead_pid}-0a0b").mkdir()
    (tmp_path / f".model.old-{dead_pid}-0c0d").mkdir()
    (tmp_path / f".model.export-{os.getpid()}-0e0f").mkdir()
    assert sweep(out) == [tmp_path / f".model.export-{dead_pid}-0a0b"]
    out.mkdir()
    staged = staging_dir(out)
    assert staged.parent == tmp_path and staged.name.startswith(f".model.export-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model", staged.name, f".model.export-{os.getpid()}-0e0f"])


# --------------------------------------------------------------------------- hf, stock head


def stock_artifact(out: Path, *, layers: int = 2, ffn=None, heads_pruned: bool = False) -> Path:
    """A float artifact of a tiny random BertForSequenceClassification (MiniLM's tokenizer, labels neg/pos)
    saved by modeling.save_classifier, optionally with the FFN of each layer cut to `ffn[i]` channels or
    layer 0's attention cut to one head."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig

    from optforge import modeling
    from optforge_testing import MINILM

    tok = modeling.load_tokenizer(MINILM)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(3)
    model = modeling.HFSeqClassifier(AutoModelForSequenceClassification.from_config(config), ["neg", "pos"]).eval()
    bert_layers = model.hf.bert.encoder.layer
    for i, width in enumerate(ffn or []):
        bert_layers[i].intermediate.dense = torch.nn.Linear(32, width)
        bert_layers[i].output.dense = torch.nn.Linear(width, 32)
    if heads_pruned:
        attn = bert_layers[0].attention
        for name in ("query", "key", "value"):
            setattr(attn.self, name, torch.nn.Linear(32, 16))
        attn.output.dense = torch.nn.Linear(16, 32)
    modeling.save_classifier(model, tok, {"max_length": 32}, out)
    return out


def float_meta(artifact: Path) -> dict:
    from optforge.modeling import read_meta

    return dict(read_meta(artifact))


def test_hf_export_of_a_stock_head_model_loads_with_stock_transformers_alone(tmp_path):
    from optforge.export import hf

    artifact = stock_artifact(tmp_path / "artifact", ffn=[48, 48])
    assert hf.check(float_meta(artifact), artifact) is None
    out = tmp_path / "exported"
    out.mkdir()
    written = hf.write(artifact, out)
    config = json.loads((out / "config.json").read_text())
    assert (config["id2label"], config["label2id"]) == ({"0": "neg", "1": "pos"}, {"neg": 0, "pos": 1})
    assert (config["intermediate_size"], config["num_hidden_layers"]) == (48, 2)
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    script = written["loader"] + textwrap.dedent(f"""
        import json
        batch = tokenizer({TEXTS!r}, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        print(json.dumps(logits.argmax(-1).tolist()))
    """)
    assert run_without_optforge(script, cwd=tmp_path) == cached_labels(artifact, TEXTS)


def test_hf_bf16_export_saves_bf16_weights(tmp_path):
    from optforge.export import hf

    artifact = stock_artifact(tmp_path / "artifact")
    out = tmp_path / "exported"
    out.mkdir()
    assert hf.write(artifact, out, precision="bf16")["details"]["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "electra"])
def test_hf_writes_each_stock_family_with_its_ffn_width(tmp_path, family):
    """Every family the teacher takes as a classifier checkpoint; each layer's FFN cut to 48 channels, which
    the config's intermediate_size (DistilBERT: hidden_dim) must then say."""
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from optforge import modeling
    from optforge.export import hf
    from optforge_testing import MINILM
    from tiny_models import tiny_hf_config

    torch.manual_seed(0)
    model = modeling.HFSeqClassifier(AutoModelForSequenceClassification.from_config(tiny_hf_config(family))).eval()
    for layer in modeling.encoder_layers(model.encoder):
        if family == "distilbert":
            layer.ffn.lin1, layer.ffn.lin2 = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)
        else:
            layer.intermediate.dense, layer.output.dense = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)
    artifact, out = tmp_path / "artifact", tmp_path / "out"
    modeling.save_classifier(model, modeling.load_tokenizer(MINILM), {"max_length": 32}, artifact)
    assert hf.check(float_meta(artifact), artifact) is None
    out.mkdir()
    hf.write(artifact, out)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_dim" if family == "distilbert" else "intermediate_size"] == 48
    ids = np.array([[101, 2000, 2001, 102], [101, 2003, 102, 0]])
    mask = (ids != 0).astype(np.int64)
    with torch.inference_mode():
        expected = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(hf.load_logits(out)(ids, mask) - expected).max() <= 1e-6


def test_hf_refuses_head_pruning_and_uneven_ffn_widths(tmp_path):
    from optforge.export import hf

    uneven = stock_artifact(tmp_path / "uneven", ffn=[48, 40])
    assert hf.check(float_meta(uneven), uneven) == (
        "FFN pruning left the layers different widths (48, 40), and a stock config has one intermediate size; "
        "use onnx or pt2")
    heads = stock_artifact(tmp_path / "heads", heads_pruned=True)
    assert hf.check(float_meta(heads), heads) == (
        "transformers 5 has no pruned_heads: a head-pruned model does not fit a stock config; use onnx or pt2")


# --------------------------------------------------------------------------- hf, a recipe whose teacher has its stock head

STOCK_RECIPE = """\
name: stock
data: {{dataset: sst2, max_train_samples: 64, max_eval_samples: 128, max_length: 32}}
teacher: {{model: {ckpt}}}
student: {{from_teacher: {{layers: [0, 2]}}}}
prune:
  - {{name: narrow, model: teacher, method: structured, ffn: 0.5}}
  - {{name: fewer-heads, model: teacher, method: structured, heads: 0.5}}
configs:
  - {{name: baseline, model: teacher}}
  - {{name: teacher-bf16, model: teacher, precision: bf16}}
  - {{name: student, model: student}}
  - {{name: narrow, model: narrow}}
  - {{name: fewer-heads, model: fewer-heads}}
benchmark: {{batch_sizes: [1], warmup: 1, min_runs: 3, max_seconds: 0.2}}
"""


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    """A tiny random BertForSequenceClassification checkpoint (save_pretrained, 3 layers) as the teacher,
    used as is: rows of the teacher in fp32 and bf16, a 2-layer student, a uniformly FFN-pruned and a
    head-pruned teacher; built on CPU (about a minute, no training)."""
    from optforge_testing import run_cli
    from tiny_models import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("stock")
    ckpt = save_tiny_checkpoint(root / "ckpt", "bert", seed=1)
    (root / "recipes").mkdir()
    recipe = root / "recipes" / "stock.yaml"
    recipe.write_text(STOCK_RECIPE.format(ckpt=ckpt))
    built = run_cli("build", recipe, "--device", "cpu", cwd=root, cache=root / "cache")
    assert built.returncode == 0, built.stdout + built.stderr
    return SimpleNamespace(root=root, recipe=recipe, cache=root / "cache",
                           run=lambda *a: run_cli(*a, cwd=root, cache=root / "cache"))


# end to end for the layer-subset student (about 20 s of CI a row); one-width FFN pruning and bf16 weights
# are written by hf.write in test_hf_writes_each_stock_family_with_its_ffn_width / test_hf_bf16_export_saves_bf16_weights
@pytest.mark.parametrize("config, layers, ffn, dtype", [
    ("student", 2, 64, "float32"),       # a subset of the teacher's layers: the config's layer count
])
def test_hf_export_of_a_stock_head_row_round_trips_and_loads_with_transformers_alone(stock, config, layers, ffn,
                                                                                     dtype):
    from optforge.cache import Cache

    out = stock.root / "exports" / config
    result = export(stock, "--config", config, "--format", "hf", "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        f"exported '{config}' as hf to {out}: round trip on 128 eval examples: argmax identical 128/128, max "
        f"|logit diff| 0 (allowed {0.03 if dtype == 'bfloat16' else 0.001:.3g})")
    hf_config = json.loads((out / "config.json").read_text())
    assert (hf_config["num_hidden_layers"], hf_config["intermediate_size"], hf_config["dtype"]) == (layers, ffn, dtype)
    assert (hf_config["id2label"], hf_config["architectures"]) == ({"0": "0", "1": "1"},
                                                                   ["BertForSequenceClassification"])
    script = card_snippet(out) + textwrap.dedent(f"""
        import json
        batch = tokenizer({TEXTS!r}, padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        print(json.dumps(logits.tolist()))
    """)
    logits = run_without_optforge(script, cwd=out.parent)
    model_stage = {"student": "student", "narrow": "prune:narrow", "teacher-bf16": "teacher"}[config]
    from optforge.artifacts import load_runnable

    runnable = load_runnable(Cache(stock.cache).entry_dir(entry_key(stock, model_stage)), "cpu",
                             "bf16" if dtype == "bfloat16" else "fp32")
    expected = runnable.forward(runnable.encode(TEXTS)).tolist()
    assert [max(range(2), key=row.__getitem__) for row in logits] == \
        [max(range(2), key=row.__getitem__) for row in expected]
    from optforge.methods.compile import allowed_difference

    scale = max(abs(x) for row in expected for x in row)
    allowed = allowed_difference("float", "bf16" if dtype == "bfloat16" else "fp32", scale, None)
    assert max(abs(a - b) for r, e in zip(logits, expected) for a, b in zip(r, e)) <= allowed


def test_hf_refuses_a_head_pruned_stock_row(stock, tmp_path):
    line = one_error_line(export(stock, "--config", "fewer-heads", "--format", "hf", "--out", tmp_path / "h"))
    assert line.startswith("error: not exportable as hf: transformers 5 has no pruned_heads: a head-pruned model "
                           "does not fit a stock config; use onnx or pt2; available for this row: "), line


# --------------------------------------------------------------------------- the card's escaping


def test_user_strings_in_the_card_cannot_inject_html_or_markup():
    hostile = "<img src=x onerror=alert(1)> | *bold* `tick` [link](javascript:x)\nnext"
    assert "<" not in text(hostile) and "\n" not in text(hostile)
    assert text(hostile).count("|") == text(hostile).count("\\|")
    assert code("a `b` c") == "``a `b` c``" and code("`") == "`` ` ``"
    assert fenced("x = '```'\n", "python") == "````python\nx = '```'\n````"
