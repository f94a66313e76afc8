"""Recipe -> DAG of stage nodes. Pure: no torch, no file reads (paths are only resolved as strings).

Stage names are what users type (`--force distill`, `--until evaluate:baseline`):
  data, teacher, student, teacher_logits, distill, prune:<name>, then per configuration <kind>:<config> for every stage
  kind with a row step (optforge.stages.base.RowStep, in row order: quantize, compile, evaluate,
  benchmark), and serve_benchmark when the recipe asks for it. Every benchmark but the baseline row's
  also reads the baseline row's final artifact (input role `baseline`): speedups are measured in one run.
Configurations that share a (model, precision, quantization) path get equal keys, so the cache
computes each distinct artifact once however many rows use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from optforge.errors import OptforgeError
from optforge.datasets import resolve_dataset_dir
from optforge.recipe import Recipe, model_stage_name
from optforge.stages.registry import MODEL_KINDS, row_steps


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    params: dict  # JSON-able; validated by the kind's params_model when keyed
    inputs: dict[str, str] = field(default_factory=dict)  # role -> upstream stage name
    data_files: dict[str, str] = field(default_factory=dict)  # role -> file path (fingerprinted)
    config: Optional[str] = None  # the configuration (report row) this node belongs to, if any


@dataclass
class Graph:
    nodes: list[Node]  # topological order

    def __post_init__(self):
        self.by_name = {n.name: n for n in self.nodes}

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def require(self, name: str) -> Node:
        if name not in self.by_name:
            import difflib

            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise OptforgeError(f"no stage named {name!r}{hint} (stages: {', '.join(self.names())})")
        return self.by_name[name]

    def upstream(self, name: str) -> set[str]:
        """`name` and everything it depends on."""
        seen, todo = set(), [name]
        while todo:
            cur = todo.pop()
            if cur not in seen:
                seen.add(cur)
                todo.extend(self.by_name[cur].inputs.values())
        return seen

    def downstream(self, name: str) -> set[str]:
        """`name` and everything that depends on it."""
        out = {name}
        for n in self.nodes:  # topological order: one pass suffices
            if any(i in out for i in n.inputs.values()):
                out.add(n.name)
        return out


def build_graph(recipe: Recipe, recipe_dir: Path | None = None) -> Graph:
    nodes: list[Node] = []
    add = nodes.append

    data = recipe.data
    files: dict[str, str] = {}
    if not data.dataset.startswith("hf:"):
        base = resolve_dataset_dir(data.dataset, recipe_dir)
        files = {"train": str(base / data.train), "eval": str(base / data.eval)}
        if data.eval_fraction is not None:  # the eval split is carved out of train
            del files["eval"]
    kinds = MODEL_KINDS[recipe.task]
    add(Node("data", kinds["data"], data.model_dump(mode="json"), {}, files))
    add(Node("teacher", kinds["teacher"], recipe.teacher.model_dump(mode="json"), {"data": "data"}))
    if recipe.student is not None:
        add(Node("student", kinds["student"], recipe.student.model_dump(mode="json"), {"teacher": "teacher"}))
    # classifiers: the teacher's logits over the train split, computed once, are the soft targets of
    # `distill` and of every prune's `recover` (in the first of their training precisions; all share the
    # device default unless set). A causal LM's are per token over the vocabulary: its distill and recover
    # run the teacher alongside (input `teacher`).
    soft = [s for s in [recipe.distill] + [p.recover for p in recipe.prune] if s is not None]
    stored = "teacher_logits" in kinds and bool(soft)
    if stored:
        add(Node("teacher_logits", kinds["teacher_logits"], {"precision": soft[0].precision or "fp32", "batch_size": 128},
                 {"teacher": "teacher", "data": "data"}))
    soft_input = {"logits": "teacher_logits"} if stored else {"teacher": "teacher"}
    if recipe.distill is not None:
        add(Node("distill", kinds["distill"], recipe.distill.model_dump(mode="json"),
                 {"student": "student"} | soft_input | {"data": "data"}))
    # prune entries may prune each other; recipe validation guarantees the chain is acyclic
    pending = list(recipe.prune)
    while pending:
        ready = [p for p in pending if p.model in ("teacher", "student")
                 or f"prune:{p.model}" in {n.name for n in nodes}]
        for p in ready:
            params = p.model_dump(mode="json", exclude={"name", "model"})
            inputs = {"model": model_stage_name(recipe, p.model), "data": "data"}
            if p.recover is not None:
                inputs |= soft_input
            add(Node(f"prune:{p.name}", kinds["prune"], params, inputs))
            pending.remove(p)
        if not ready:  # unreachable after recipe validation; kept so a bug cannot loop forever
            raise OptforgeError(f"prune entries form a cycle: {[p.name for p in pending]}")

    # each configuration (report row): its model stage, then every registered row step that applies to it
    # (stages.base.RowStep: quantize, compile, ... make the next artifact; evaluate, benchmark measure it)
    steps = row_steps(recipe.task)
    config_model = {c.name: final_model(recipe, c, steps) for c in recipe.configs}  # the artifact a row runs
    baseline = next((c for c in recipe.configs if c.name == recipe.baseline_config), None)
    for c in recipe.configs:
        src = model_stage_name(recipe, c.model)
        for kind in steps:
            step = kind.row
            if not step.applies(recipe, c):
                continue
            inputs = {"model": src} | ({"data": "data"} if step.needs_data else {})
            params = step.params(recipe, c)
            if step.compares and baseline is not None and c.name != baseline.name:
                # measured in the same run as the baseline row's final artifact (benchmark: paired speedups)
                inputs["baseline"] = config_model[baseline.name]
                params = params | {"baseline_config": baseline.name, "baseline_precision": baseline.precision}
            add(Node(f"{_stage(kind)}:{c.name}", kind.kind, params, inputs, config=c.name))
            if not step.measure:
                src = f"{_stage(kind)}:{c.name}"
    sb = recipe.serve_benchmark
    if sb is not None:
        # "best" is decided from the evaluate/benchmark results at run time, so every row is an input
        chosen = [c.name for c in recipe.configs] if sb.config == "best" else [sb.config]
        inputs = {"data": "data"}
        for name in chosen:
            inputs |= {f"model:{name}": config_model[name], f"evaluate:{name}": f"evaluate:{name}",
                       f"benchmark:{name}": f"benchmark:{name}"}
        params = sb.model_dump(mode="json") | {
            "baseline": recipe.baseline_config, "gates": recipe.gates.model_dump(mode="json")}
        add(Node("serve_benchmark", "serve_benchmark", params, inputs))
    return Graph(toposort(nodes))


def _stage(kind) -> str:
    """The stage-name prefix of a row kind's stages (`quantize` for both quantize and lm_quantize)."""
    return kind.row.stage or kind.kind


def final_model(recipe: Recipe, c, steps) -> str:
    """The stage whose artifact configuration `c` runs: its model stage, then each artifact-making row
    step (`measure=False`) that applies to it."""
    src = model_stage_name(recipe, c.model)
    for kind in steps:
        if not kind.row.measure and kind.row.applies(recipe, c):
            src = f"{_stage(kind)}:{c.name}"
    return src


def toposort(nodes: Iterable[Node]) -> list[Node]:
    """Stable topological order (declaration order among ready nodes). A cycle is named in the error."""
    nodes = list(nodes)
    by_name = {n.name: n for n in nodes}
    for n in nodes:
        for role, dep in n.inputs.items():
            if dep not in by_name:
                raise OptforgeError(f"stage {n.name!r} input {role!r} names unknown stage {dep!r}")
    order: list[Node] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(n: Node, path: list[str]):
        if state.get(n.name) == 2:
            return
        if state.get(n.name) == 1:
            cycle = path[path.index(n.name):] + [n.name]
            raise OptforgeError("stage graph has a cycle: " + " -> ".join(cycle))
        state[n.name] = 1
        for dep in n.inputs.values():
            visit(by_name[dep], path + [n.name])
        state[n.name] = 2
        order.append(n)

    for n in nodes:
        visit(n, [])
    return order


def to_mermaid(g: Graph) -> str:
    ids = {n.name: f"n{i}" for i, n in enumerate(g.nodes)}
    lines = ["flowchart TD"]
    for n in g.nodes:
        lines.append(f'    {ids[n.name]}["{n.name}"]')
    for n in g.nodes:
        for role, dep in n.inputs.items():
            lines.append(f"    {ids[dep]} -->|{role}| {ids[n.name]}")
    return "\n".join(lines) + "\n"


def to_dot(g: Graph) -> str:
    lines = ["digraph optforge {", "    rankdir=TB;", "    node [shape=box];"]
    for n in g.nodes:
        lines.append(f'    "{n.name}" [label="{n.name}\\n({n.kind})"];')
    for n in g.nodes:
        for role, dep in n.inputs.items():
            lines.append(f'    "{dep}" -> "{n.name}" [label="{role}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"
