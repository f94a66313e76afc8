"""The shape of the package: the pure modules stay torch-free, the import graph has no cycle, and the
graph in docs/ARCHITECTURE.md is the generated one (optforge/_modgraph.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optforge import _modgraph
from optforge_testing import TESTS

REPO = TESTS.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"

# Modules a no-op `build`, `plan`, `validate` or `report` loads: no torch, no transformers (jinja is fine).
PURE = [
    "optforge.errors", "optforge.recipe", "optforge.recipe_io", "optforge.graph", "optforge.fingerprint",
    "optforge.device", "optforge.plan", "optforge.cache", "optforge.lockfile", "optforge.session",
    "optforge.run", "optforge.stages.base", "optforge.bench", "optforge.hardware", "optforge.batching",
    "optforge.metrics", "optforge.prune_counts", "optforge.report", "optforge.cli", "optforge.artifacts",
    "optforge.methods.quantize", "optforge.methods.compile", "optforge.datasets", "optforge.cache_entry",
    "optforge.stages.registry", "optforge.model_source", "optforge.procs", "optforge.serve.options",
    "optforge.labels", "optforge.arch",
    # imported by the registry and by `optforge export` before anything runs: onnxruntime inside functions only
    "optforge.stages.onnxruntime", "optforge.artifacts.onnx", "optforge.export.onnx",
    "optforge.export", "optforge.export.command", "optforge.export.card",
    "optforge.export.publish",
    "optforge.progress", "optforge.timings", "optforge.paired",
    # the remote cache: fsspec (and s3fs, botocore) only once a remote is used
    "optforge.remote_url", "optforge.remote", "optforge.sync",
]
HEAVY = ("torch", "transformers", "torchao", "onnxruntime", "onnx")


def test_pure_modules_import_no_torch():
    """Each module imported in turn in a fresh interpreter; the first one that brings in a heavy library
    is named."""
    script = textwrap.dedent(f"""
        import importlib, json, sys
        pulled = {{}}
        for name in {PURE!r}:
            importlib.import_module(name)
            heavy = [m for m in {HEAVY!r} if m in sys.modules]
            if heavy:
                pulled[name] = heavy
                break
        print(json.dumps(pulled))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


# `python -m optforge._modgraph --cycles` prints any cycle with the kind of each edge.
KNOWN_CYCLES: set[str] = set()


def _cycles(root=_modgraph.ROOT, package=_modgraph.PACKAGE) -> set[str]:
    nodes, edges = _modgraph.collect_edges(root, package)
    short = _modgraph._short
    return {" -> ".join(short(m) for m in cycle + cycle[:1])
            for comp in _modgraph.strongly_connected(nodes, edges)
            for cycle in _modgraph.shortest_cycles(comp, edges)}


def test_no_import_cycle():
    assert _cycles() == KNOWN_CYCLES, "\n" + _modgraph.describe_cycles()


def test_the_graph_is_read_for_real():
    """Guards the checker against passing vacuously: edges it must see in the real package."""
    _, edges = _modgraph.collect_edges()
    found = {(e.source, e.target, e.kind) for e in edges}
    for edge in [("optforge.session", "optforge.plan", "import"),
                 ("optforge.stages.evaluate", "optforge.artifacts", "lazy"),
                 ("optforge.report", "optforge.report.render", "lazy"),
                 ("optforge.training", "optforge.tokens", "import")]:
        assert edge in found, edge
    assert len(edges) > 100


def test_docs_show_the_generated_graph():
    doc = DOC.read_text(encoding="utf-8")
    block = _modgraph.doc_block(doc)
    if block is None:
        pytest.skip(f"{DOC.name} has no {_modgraph.BEGIN} block yet: add the markers and run "
                    "`python -m optforge._modgraph --write docs/ARCHITECTURE.md`")
    assert block == _modgraph.mermaid(), ("docs/ARCHITECTURE.md's module graph is stale: run "
                                          "`python -m optforge._modgraph --write docs/ARCHITECTURE.md`")


# --------------------------------------------------------------------------- the checker itself


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_on_a_toy_package(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": """
            from typing import TYPE_CHECKING
            from pkg import b                      # a submodule through its package
            from pkg.sub import c as _c           # a submodule through a subpackage
            import pkg.sub.d
            if TYPE_CHECKING:
                from pkg import e                  # never runs: no edge
            def f():
                from pkg.e import thing            # a name inside a module: edge to the module
            """,
        "b.py": "from . import c_helper\n",
        "c_helper.py": 'LOADERS = {"x": "pkg.a:f"}\n',     # names a by registry string
        "e.py": "thing = 1\n",
        "sub/__init__.py": "from .c import C\n",          # a package importing its own submodule
        "sub/c.py": "C = 1\nimport os\n",
        "sub/d.py": "from ..e import thing\n",
    })
    nodes, edges = _modgraph.collect_edges(root, "pkg")
    assert nodes == ["pkg", "pkg.a", "pkg.b", "pkg.c_helper", "pkg.e", "pkg.sub", "pkg.sub.c", "pkg.sub.d"]
    assert {(e.source, e.target, e.kind) for e in edges} == {
        ("pkg.a", "pkg.b", "import"), ("pkg.a", "pkg.sub.c", "import"), ("pkg.a", "pkg.sub.d", "import"),
        ("pkg.a", "pkg.e", "lazy"),
        ("pkg.b", "pkg.c_helper", "import"),
        ("pkg.c_helper", "pkg.a", "name"),
        ("pkg.sub", "pkg.sub.c", "import"),
        ("pkg.sub.d", "pkg.e", "import"),
    }
    assert _cycles(root, "pkg") == {"a -> b -> c_helper -> a"}
    assert "a -import-> b -import-> c_helper -name-> a" in _modgraph.describe_cycles(root, "pkg")


def test_one_component_several_cycles():
    E = _modgraph.Edge
    edges = [E("x", "y", "import"), E("y", "x", "lazy"), E("y", "z", "import"), E("z", "y", "import"),
             E("z", "w", "import")]
    comps = _modgraph.strongly_connected(["w", "x", "y", "z"], edges)
    assert comps == [["x", "y", "z"]]
    assert _modgraph.shortest_cycles(comps[0], edges) == [["x", "y"], ["y", "z"]]
    assert _modgraph.strongly_connected(["a"], [E("a", "a", "lazy")]) == [["a"]]
    assert _modgraph.strongly_connected(["a", "b"], [E("a", "b", "import")]) == []


def test_doc_block_round_trip():
    doc = f"# title\n\n{_modgraph.BEGIN}\nold\n{_modgraph.END}\n\nafter\n"
    assert _modgraph.doc_block(doc) == "old"
    new = _modgraph.replace_block(doc, "```mermaid\nflowchart LR\n```")
    assert _modgraph.doc_block(new) == "```mermaid\nflowchart LR\n```" and new.endswith("\n\nafter\n")
    assert _modgraph.doc_block("no markers") is None
