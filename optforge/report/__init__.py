"""Results -> report.md / report.html / results.json. No torch: jinja2 only.

Public entry point: `render_reports(recipe, recipe_path, graph, results, env, out_dir, compare=None)`.
Pieces: `results` (pure assembly), `verdict` (the readiness rule), `notes` (honest notes), `compare`
(vs a previous report), `svg` and `serving` (the two charts, on `chart`'s axes), `render` (the
templates, from `templates.search_path()`).

`render_reports` is imported on first use, so what only needs a piece (the template search path in a
no-op build's render memo, the verdict rule in a stage) does not load the renderer.
"""

from __future__ import annotations

__all__ = ["render_reports"]


def __getattr__(name: str):
    if name == "render_reports":
        from optforge.report.render import render_reports

        return render_reports
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
