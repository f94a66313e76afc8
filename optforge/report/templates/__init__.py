"""The report's Jinja templates, shipped inside the package (so a plain `pip install` can render), and
where a user's own versions of them are read from.

`search_path()` is the one rule: `reports/templates/` in the working directory -- beside the
`reports/<recipe>/` folders a build writes there -- comes first, so a file of the same name there
(say a copy of `report.md.j2`, edited) overrides the packaged one; every template it does not
override (the `_serving.*.j2` partials, for example) still comes from this folder. The renderer
loads through it and the build's render memo stamps every file on it, so an edited override
re-renders the report.
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent
OVERRIDES = Path("reports") / "templates"


def search_path() -> list[Path]:
    """Template folders, first match wins: the working directory's overrides (when that folder
    exists), then the packaged templates."""
    return [d for d in (OVERRIDES, PACKAGED) if d.is_dir()]
