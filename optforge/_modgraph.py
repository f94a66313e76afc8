"""The import graph of the optforge package, read from its source with `ast` (nothing is imported, so
it runs in milliseconds and without torch): its edges, its cycles, and the block docs/ARCHITECTURE.md
shows between `<!-- modgraph:begin -->` and `<!-- modgraph:end -->`.

    python -m optforge._modgraph                # the Mermaid block for the docs
    python -m optforge._modgraph --text         # one line per module: what it imports
    python -m optforge._modgraph --cycles       # every cycle; exit status 1 if there is one
    python -m optforge._modgraph --write docs/ARCHITECTURE.md   # regenerate the block in place

An edge A -> B means A needs B loaded. Three kinds, all of which count for cycles:
  - import: a module-level `import optforge.B` / `from optforge.B import x` (`from optforge import B`
    and `from optforge.P import B` name the submodule B when there is one);
  - lazy:   the same inside a function or method body (runs when called, still a dependency);
  - name:   a string constant "optforge.B:attr", the form in which a registry names what it will hand
    to importlib (runtime.FORMATS, stages.base's kinds): a dependency the import statements hide.
Imports under `if TYPE_CHECKING:` are left out (they never run). A module's implicit dependency on its
parent package's __init__ is left out too: a package __init__ that imports its own submodules is no cycle.

It lives inside the package (private, stdlib only, imports nothing from optforge) so the test imports it
directly and `python -m optforge._modgraph` works wherever optforge is installed.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

PACKAGE = "optforge"
ROOT = Path(__file__).resolve().parent
BEGIN, END = "<!-- modgraph:begin -->", "<!-- modgraph:end -->"
KINDS = ("import", "lazy", "name")


@dataclass(frozen=True, order=True)
class Edge:
    source: str
    target: str
    kind: str  # "import" | "lazy" | "name"


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every .py file under `root` (packages by their __init__),
    but this module."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if "__pycache__" in parts or path.resolve() == Path(__file__).resolve():  # not this dev tool
            continue
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: set[str], top: str):
        self.module, self.modules, self.depth, self.top = module, modules, 0, top
        self.package = module if is_package else module.rpartition(".")[0]
        self.name_ref = re.compile(rf"^({re.escape(top)}(?:\.\w+)*):\w+$")
        self.found: list[tuple[str, str]] = []  # (target, kind)

    # ---- where we are
    def _scoped(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scoped

    def visit_If(self, node: ast.If):
        if _is_type_checking(node):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    # ---- what it needs
    def _add(self, target: Optional[str], kind: Optional[str] = None):
        if target is None:
            return
        while target not in self.modules and "." in target:  # optforge.x.attr -> optforge.x
            target = target.rpartition(".")[0]
        if target in self.modules and target != self.module:
            self.found.append((target, kind or ("lazy" if self.depth else "import")))

    def _ours(self, name: str) -> bool:
        return name == self.top or name.startswith(self.top + ".")

    def visit_Import(self, node: ast.Import):
        for alias in node.names:
            if self._ours(alias.name):
                self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom):
        if node.level:
            base = self.package.split(".")
            base = base[:len(base) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        if not self._ours(source):
            return
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            self._add(sub if sub in self.modules else source)

    def visit_Constant(self, node: ast.Constant):
        if isinstance(node.value, str):
            m = self.name_ref.match(node.value)
            if m and m.group(1) in self.modules:
                self._add(m.group(1), "name")


def collect_edges(root: Path = ROOT, package: str = PACKAGE) -> tuple[list[str], list[Edge]]:
    """(every module, every edge), sorted. One edge per (source, target): the strongest kind wins
    (import over lazy over name)."""
    files = module_files(root, package)
    modules = set(files)
    best: dict[tuple[str, str], str] = {}
    for name, path in files.items():
        c = _Collector(name, path.name == "__init__.py", modules, package)
        c.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for target, kind in c.found:
            old = best.get((name, target))
            if old is None or KINDS.index(kind) < KINDS.index(old):
                best[(name, target)] = kind
    return sorted(modules), sorted(Edge(s, t, k) for (s, t), k in best.items())


# --------------------------------------------------------------------------- cycles


def strongly_connected(nodes: Iterable[str], edges: Iterable[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (or one that needs itself), each
    sorted, the list sorted."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for e in edges:
        succ.setdefault(e.source, []).append(e.target)
        succ.setdefault(e.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str):  # recursion depth <= number of modules (~60): fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in succ[v]:
                out.append(sorted(comp))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(out)


def shortest_cycles(component: list[str], edges: Iterable[Edge]) -> list[list[str]]:
    """For each module of a strongly connected component, a shortest cycle through it (breadth-first,
    inside the component), each rotated to start at its smallest name; duplicates dropped."""
    members = set(component)
    succ: dict[str, list[str]] = {n: [] for n in component}
    for e in sorted(edges):
        if e.source in members and e.target in members:
            succ[e.source].append(e.target)
    cycles = set()
    for start in component:
        parent: dict[str, str] = {}
        frontier, found = [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in succ[v]:
                    if w == start:
                        found = v
                        break
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        if found is None:
            continue
        path = [found]
        while path[-1] != start:
            path.append(parent[path[-1]])
        path.reverse()  # start ... found
        i = path.index(min(path))
        cycles.add(tuple(path[i:] + path[:i]))
    return [list(c) for c in sorted(cycles, key=lambda c: (len(c), c))]


def find_cycles(root: Path = ROOT, package: str = PACKAGE) -> list[list[str]]:
    """Every strongly connected component of the package's import graph (empty: no cycle)."""
    nodes, edges = collect_edges(root, package)
    return strongly_connected(nodes, edges)


def describe_cycles(root: Path = ROOT, package: str = PACKAGE) -> str:
    nodes, edges = collect_edges(root, package)
    kind = {(e.source, e.target): e.kind for e in edges}
    lines = []
    for comp in strongly_connected(nodes, edges):
        lines.append(f"cycle among {len(comp)} modules: {', '.join(_short(m) for m in comp)}")
        for cyc in shortest_cycles(comp, edges):
            steps = [f"{_short(a)} -{kind[(a, b)]}-> " for a, b in zip(cyc, cyc[1:] + cyc[:1])]
            lines.append("  " + "".join(steps) + _short(cyc[0]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- rendering


def _short(module: str) -> str:
    return module.partition(".")[2] or module


def _node_id(module: str) -> str:
    return "m_" + _short(module).replace(".", "_")


def mermaid(root: Path = ROOT, package: str = PACKAGE) -> str:
    """The graph as a fenced Mermaid flowchart: one node per module (subpackages boxed), a solid arrow
    per module-level import, a dotted one per lazy import, a dotted one labelled "by name" per registry
    string. Deterministic (sorted), so the docs can be checked against it."""
    nodes, edges = collect_edges(root, package)
    lines = ["```mermaid", "flowchart LR"]
    groups: dict[str, list[tuple[str, str]]] = {}  # subpackage ("" at the top) -> (module, label)
    for m in nodes:
        short = _short(m)
        if m != package and any(n.startswith(m + ".") for n in nodes):  # a subpackage's __init__
            groups.setdefault(short, []).append((m, "__init__"))
        else:
            group, _, label = short.rpartition(".")
            groups.setdefault(group, []).append((m, label))
    for group in sorted(groups):
        indent = "  "
        if group:
            lines.append(f"  subgraph {group.replace('.', '_')}[\"{group}/\"]")
            indent = "    "
        for m, label in groups[group]:
            lines.append(f"{indent}{_node_id(m)}[\"{label}\"]")
        if group:
            lines.append("  end")
    arrows = {"import": "-->", "lazy": "-.->", "name": "-. by name .->"}
    for e in edges:
        lines.append(f"  {_node_id(e.source)} {arrows[e.kind]} {_node_id(e.target)}")
    lines.append("```")
    return "\n".join(lines)


def text(root: Path = ROOT, package: str = PACKAGE) -> str:
    """One line per module: `module: target, lazy-target (lazy), named-target (by name)`."""
    nodes, edges = collect_edges(root, package)
    suffix = {"import": "", "lazy": " (lazy)", "name": " (by name)"}
    out = []
    for m in nodes:
        targets = [f"{_short(e.target)}{suffix[e.kind]}" for e in edges if e.source == m]
        out.append(f"{_short(m)}: {', '.join(targets) if targets else '-'}")
    return "\n".join(out)


def doc_block(doc_text: str) -> Optional[str]:
    """What stands between the markers in a document (stripped), or None when it has no marker block."""
    if BEGIN not in doc_text:
        return None
    start = doc_text.index(BEGIN) + len(BEGIN)
    end = doc_text.index(END, start)
    return doc_text[start:end].strip()


def replace_block(doc_text: str, block: str) -> str:
    start = doc_text.index(BEGIN) + len(BEGIN)
    end = doc_text.index(END, start)
    return doc_text[:start] + "\n" + block + "\n" + doc_text[end:]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m optforge._modgraph", description=__doc__.split("\n\n")[0])
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--text", action="store_true", help="one line per module instead of Mermaid")
    how.add_argument("--cycles", action="store_true", help="list the cycles; exit 1 if there is one")
    how.add_argument("--write", type=Path, metavar="DOC", help="replace the Mermaid block between the markers")
    args = ap.parse_args(argv)
    if args.cycles:
        report = describe_cycles()
        print(report or "no import cycle")
        return 1 if report else 0
    if args.write:
        doc = args.write.read_text(encoding="utf-8")
        if doc_block(doc) is None:
            print(f"{args.write}: no {BEGIN} ... {END} block to replace", file=sys.stderr)
            return 2
        args.write.write_text(replace_block(doc, mermaid()), encoding="utf-8")
        return 0
    print(text() if args.text else mermaid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
