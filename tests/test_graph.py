"""The stage graph, on small hand-made graphs and on a recipe (pure: no files are read)."""

from __future__ import annotations

import pytest

from optforge.errors import OptforgeError
from optforge.graph import Graph, Node, build_graph, to_dot, to_mermaid, toposort
from optforge.recipe import Recipe


def n(name, *deps):
    return Node(name, "k", {}, {f"in{i}": d for i, d in enumerate(deps)})


def test_toposort_keeps_declaration_order_among_ready_nodes():
    nodes = [n("d", "b", "c"), n("a"), n("b", "a"), n("c", "a")]
    assert [x.name for x in toposort(nodes)] == ["a", "b", "c", "d"]


def test_toposort_names_the_cycle():
    with pytest.raises(OptforgeError, match=r"cycle: (a -> c -> b -> a|b -> a -> c -> b|c -> b -> a -> c)"):
        toposort([n("a", "c"), n("b", "a"), n("c", "b"), n("x")])


def test_unknown_input_is_named():
    with pytest.raises(OptforgeError, match="'b' input 'in0' names unknown stage 'zz'"):
        toposort([n("a"), n("b", "zz")])


def test_upstream_and_downstream():
    g = Graph(toposort([n("a"), n("b", "a"), n("c", "a"), n("d", "b"), n("e")]))
    assert g.upstream("d") == {"a", "b", "d"}
    assert g.downstream("a") == {"a", "b", "c", "d"}
    assert g.downstream("e") == {"e"}


def test_require_suggests_a_close_name():
    g = Graph([n("distill"), n("teacher")])
    with pytest.raises(OptforgeError, match="did you mean 'distill'"):
        g.require("distil")


RECIPE = {
    "name": "r", "data": {"dataset": "sst2"},
    "teacher": {"model": "pkg:m/model"}, "student": {"from_teacher": {"layers": [0]}}, "distill": {},
    "prune": [{"name": "p2", "model": "p1", "method": "unstructured", "amount": 0.5},
              {"name": "p1", "method": "structured", "heads": 0.5}],
    "quantize": [{"name": "q", "method": "int8-dynamic"}],
    "configs": [{"name": "base"}, {"name": "fast", "model": "p2", "quantize": "q", "compile": "default"}],
}


def test_build_graph_stage_names_and_wiring(tmp_path):
    g = build_graph(Recipe.model_validate(RECIPE), tmp_path)
    assert g.names() == ["data", "teacher", "student", "teacher_logits", "distill", "prune:p1", "prune:p2",
                         "evaluate:base", "benchmark:base", "quantize:fast", "compile:fast",
                         "evaluate:fast", "benchmark:fast"]
    assert g["prune:p1"].inputs == {"model": "distill", "data": "data"}  # "student" means the distilled one
    assert g["distill"].inputs == {"student": "student", "logits": "teacher_logits", "data": "data"}
    assert g["teacher_logits"].inputs == {"teacher": "teacher", "data": "data"}
    assert g["prune:p2"].inputs["model"] == "prune:p1"
    assert g["benchmark:fast"].inputs["model"] == "compile:fast"
    assert g["data"].data_files["train"].endswith("sst2/train.tsv")
    assert g["evaluate:fast"].config == "fast"


def test_hf_datasets_have_no_local_files(tmp_path):
    g = build_graph(Recipe.model_validate(RECIPE | {"data": {"dataset": "hf:glue/sst2"}}), tmp_path)
    assert g["data"].data_files == {}


def test_mermaid_and_dot_list_every_edge(tmp_path):
    g = build_graph(Recipe.model_validate(RECIPE), tmp_path)
    edges = sum(len(x.inputs) for x in g.nodes)
    mermaid, dot = to_mermaid(g), to_dot(g)
    assert mermaid.startswith("flowchart TD") and mermaid.count("-->") == edges
    assert dot.startswith("digraph") and dot.count(" -> ") == edges and '"prune:p1" -> "prune:p2"' in dot


def test_onnxruntime_rows_export_instead_of_quantizing(tmp_path):
    """A `runtime: onnxruntime` row runs the onnxruntime stage on the float model (it quantizes itself);
    torch-int8-dynamic and int8-dynamic entries both mean ONNX Runtime dynamic int8 there, so two such rows
    on one model share one stage key."""
    recipe = RECIPE | {"quantize": [{"name": "q", "method": "int8-dynamic"}, {"name": "d", "method": "torch-int8-dynamic"}],
                       "configs": [{"name": "base"},
                                   {"name": "ort", "runtime": "onnxruntime"},
                                   {"name": "ort8", "model": "p1", "quantize": "q", "runtime": "onnxruntime"},
                                   {"name": "ortd", "model": "p1", "quantize": "d", "runtime": "onnxruntime"},
                                   {"name": "torch8", "model": "p1", "quantize": "q"}]}
    g = build_graph(Recipe.model_validate(recipe), tmp_path)
    assert [x for x in g.names() if x.endswith(":ort8")] == ["onnxruntime:ort8", "evaluate:ort8", "benchmark:ort8"]
    assert g["onnxruntime:ort8"].inputs == {"model": "prune:p1", "data": "data"}
    assert g["onnxruntime:ort8"].params == g["onnxruntime:ortd"].params == {
        "precision": "fp32", "quantization": "int8-dynamic"}
    assert g["onnxruntime:ort"].params == {"precision": "fp32", "quantization": None}
    assert g["benchmark:ort8"].inputs["model"] == "onnxruntime:ort8"
    assert "quantize:torch8" in g.names() and "onnxruntime:torch8" not in g.names()


def test_the_default_runtime_stays_out_of_dumps():
    """Recipes written before `runtime` existed keep their recipe hash (session.env dumps the recipe)."""
    r = Recipe.model_validate(RECIPE)
    assert all("runtime" not in c for c in r.model_dump(mode="json")["configs"])
    ort = Recipe.model_validate(RECIPE | {"configs": [{"name": "base", "runtime": "onnxruntime"}]})
    dumped = ort.model_dump(mode="json")
    assert dumped["configs"][0]["runtime"] == "onnxruntime" and Recipe.model_validate(dumped) == ort


def test_every_benchmark_but_the_baselines_reads_the_baseline_rows_model(tmp_path):
    """Speedups are measured in one run: a row's benchmark gets the baseline row's final artifact (input
    `baseline`) and its name and precision in its params (so they enter its key); the baseline's doesn't."""
    g = build_graph(Recipe.model_validate(RECIPE), tmp_path)
    assert g["benchmark:fast"].inputs == {"model": "compile:fast", "data": "data", "baseline": "teacher"}
    assert g["benchmark:fast"].params["baseline_config"] == "base"
    assert g["benchmark:fast"].params["baseline_precision"] == "fp32"
    assert "baseline" not in g["benchmark:base"].inputs and "baseline_config" not in g["benchmark:base"].params
    assert "baseline" not in g["evaluate:fast"].inputs
    # a baseline later in the recipe, with its own artifact-making steps: its final artifact is the input
    g = build_graph(Recipe.model_validate(RECIPE | {"baseline": "fast"}), tmp_path)
    assert g["benchmark:base"].inputs["baseline"] == "compile:fast"
    assert g["benchmark:base"].params["baseline_config"] == "fast"
    assert "baseline" not in g["benchmark:fast"].inputs
    assert g.names().index("compile:fast") < g.names().index("benchmark:base")
