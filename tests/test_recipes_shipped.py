"""Every shipped recipe validates on every device, through what `optforge validate` runs (load_recipe,
then the graph per device). Data files are not needed: their check is the loader's `check_data`, turned
off here, so this test never skips."""

from __future__ import annotations

import pytest

from optforge_testing import REPO
from optforge.recipe import DEVICES
from optforge.recipe_io import load_recipe

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_recipes_are_found():
    assert RECIPES, f"no recipes/*.yaml under {REPO}"  # else every case below would be skipped, unseen


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates(recipe, device):
    loaded = load_recipe(recipe, str(recipe.relative_to(REPO)))
    graph = loaded.graph(device, check_data=False)
    rows = loaded.recipe.for_device(device).configs
    assert [n for n in graph.names() if n.startswith("evaluate:")] == [f"evaluate:{c.name}" for c in rows]
