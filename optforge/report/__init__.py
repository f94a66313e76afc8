"""Results -> report.md / report.html / results.json. No torch: jinja2 only.

Public entry point: `render_reports(recipe, recipe_path, graph, results, env, out_dir, compare=None)`.
Pieces: `results` (pure assembly and verdicts), `notes` (honest notes), `compare` (vs a previous
report), `svg` (the accuracy-vs-latency chart), `render` (templates in reports/templates/).
"""

from optforge.report.render import render_reports

__all__ = ["render_reports"]
