"""Launch a server for a built configuration: what `optforge serve RECIPE` runs (the command itself is
in optforge/cli.py).

Nothing is built here: the artifact comes from the cache entry that the last build recorded for the
configuration's model stage (quantize:<c> / compile:<c> / the model stage), found through the same
plan `optforge plan` prints. "best" is the report's best ready configuration (serve/choose.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from optforge.errors import OptforgeError
from optforge.serve.options import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S, checked


def resolve_artifact(session, plans, config: str, display: str, action: str = "serve"
                     ) -> tuple[str, Path, str, Optional[str]]:
    """(config name, artifact dir, precision, why) for `config` (a name or "best") of a built recipe.
    `action` ("serve", "export") is the verb the errors use."""
    recipe, graph = session.recipe, session.graph
    if recipe.is_lm:
        raise OptforgeError(f"{display} is a causal-LM recipe: optforge {action} handles classifiers only. Its rows "
                            f"are in the cache as transformers directories (float rows: AutoModelForCausalLM."
                            f"from_pretrained) or torchao-quantized state dicts; serve them with a generation "
                            f"server (README, \"Causal LMs\")")
    names = [c.name for c in recipe.configs]
    why = None
    if config == "best":
        from optforge.session import stage_results

        config, why = best_config(recipe, graph, stage_results(session, plans), display, action)
    elif config not in names:
        from optforge.recipe import _unknown

        raise OptforgeError(_unknown("config", config, names))
    by_name = {p.name: p for p in plans}
    model_stage = graph[f"evaluate:{config}"].inputs["model"]
    p = by_name[model_stage]
    if p.status != "fresh" or p.entry.status == "missing":
        raise OptforgeError(f"config {config!r} is not built ({model_stage}: {'; '.join(p.reasons) or 'stale'}); "
                            f"run optforge build {display} first")
    if p.entry.status == "failed":
        raise OptforgeError(f"config {config!r} failed to build ({model_stage}: {p.entry.reason}); "
                            f"nothing to {action}")
    precision = next(c.precision for c in recipe.configs if c.name == config)
    return config, session.cache.entry_dir(p.key), precision, why


def best_config(recipe, graph, results: dict, display: str, action: str = "serve") -> tuple[str, str]:
    """(name, why) of the report's best ready configuration, from the stage `results` the report reads.
    OptforgeError when none is ready: the row `--config` would serve anyway when one was built, "run
    optforge build" only when none was."""
    from optforge.report.results import judged_rows
    from optforge.serve.choose import choose_row

    rows = judged_rows(recipe, graph, results)
    row, _, fallback = choose_row(rows, recipe.baseline_config, recipe.gates)
    if row is None and all(r["status"] == "missing" for r in rows):
        raise OptforgeError(f"no configuration of {display} is built; run optforge build {display} first")
    if row is None:
        raise OptforgeError(f"no configuration of {display} was built successfully (its report says why); "
                            f"nothing to {action}")
    if fallback is not None:
        raise OptforgeError(f"no configuration of {display} passed the gates (its report gives each row's "
                            f"verdict); --config {row['name']} {action}s {fallback} anyway")
    return row["name"], "the report's best ready configuration"


def serve_recipe(recipe_path, config: str = "best", host: str = "127.0.0.1", port: int = 8000,
                 max_batch: int = 32, max_wait_ms: float = 5.0, device: str = "auto",
                 max_queue: Optional[int] = None, echo: Callable[[str], None] = print, *,
                 header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S, body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 max_connections: Optional[int] = None) -> None:
    """Serve until interrupted (Ctrl-C). Options are checked (as the CLI spells them) before anything
    loads; `max_connections` defaults to what the file-descriptor limit allows (serve/guards.py)."""
    if max_batch < 1:
        raise OptforgeError(f"--max-batch must be >= 1, got {max_batch}")
    max_wait_ms = checked("max_wait_ms", max_wait_ms, flag=True)
    header_timeout_s = checked("header_timeout_s", header_timeout_s, flag=True)
    body_timeout_s = checked("body_timeout_s", body_timeout_s, flag=True)
    if max_connections is not None:
        max_connections = checked("max_connections", max_connections, flag=True)
    if not 0 <= port <= 65535:
        raise OptforgeError(f"--port must be in 0..65535, got {port}")
    from optforge.session import open_session

    display = str(recipe_path)
    session = open_session(recipe_path, device, display=display)
    plans = session.plan()
    session.save_hashes()
    name, artifact, precision, why = resolve_artifact(session, plans, config, display)

    from optforge.serve.app import create_app
    from optforge.serve.model import load_for_serving
    from optforge.serve.server import serve_forever

    runnable, run = load_for_serving(artifact, session.device, precision)
    app = create_app(run, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
                     info={"config": name, "model": runnable.description, "recipe": session.name},
                     body_timeout_s=body_timeout_s)

    def ready(bound_host, bound_port):
        echo(f"serving {name!r}{f' ({why})' if why else ''}: {runnable.description} on {session.device}, "
             f"max batch {max_batch}, window {max_wait_ms:g} ms")
        echo(f"listening on http://{bound_host}:{bound_port}  (POST /predict, GET /healthz, GET /metrics; "
             "Ctrl-C stops)")
        if bound_host not in ("127.0.0.1", "::1", "localhost"):
            echo(f"warning: {bound_host} is reachable from other machines; this server has no authentication")

    try:
        serve_forever(app, host, port, log_level="info", on_ready=ready, header_timeout_s=header_timeout_s,
                      max_connections=max_connections)
    except OSError as e:
        raise OptforgeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
