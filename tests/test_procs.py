"""Children die with their build: SIGKILL the parent, and a child started the optforge way goes too."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PARENT = r"""
import subprocess, sys, time
from optforge.procs import child_env
child = subprocess.Popen([sys.executable, "-c",
                          "from optforge.procs import die_with_parent; die_with_parent(); import time; time.sleep(120)"],
                         env=child_env())
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_when_its_build_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_every_child_process_optforge_starts_is_tied_to_its_parent():
    """Each `subprocess` call that starts a Python child passes env=child_env(...), and each child entry
    point (a module run with -m) calls die_with_parent() first."""
    root = Path(__file__).resolve().parents[1] / "optforge"
    spawns, entries = [], []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("Popen", "run") and getattr(node.func.value, "id", "") == "subprocess"):
                text = ast.unparse(node)
                if "sys.executable" in text or "self.args" in text:
                    spawns.append((path.name, "child_env(" in text))
        if 'if __name__ == "__main__"' in path.read_text() and path.name != "_modgraph.py":
            main = path.read_text().split('if __name__ == "__main__"', 1)[1]
            entries.append((path.relative_to(root).as_posix(), "die_with_parent()" in main))
    assert spawns and all(ok for _, ok in spawns), spawns
    children = {"stages/compile.py", "serve/server.py"}
    assert children <= {p for p, _ in entries}
    assert all(ok for p, ok in entries if p in children), entries
