"""Thin Click commands: each translates flags into one call and prints its result.

Errors a user can fix (OptforgeError) become one clear line on stderr and exit 2 -- `FILE:LINE:COL:
error: ...` for a recipe. Anything else is our bug and keeps its traceback (exit 1). A build interrupted
(Ctrl-C) says so in one line and exits 130.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from optforge import __version__
from optforge.errors import OptforgeError, RecipeError
from optforge.export import FORMATS as EXPORT_FORMATS
from optforge.serve.options import DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S

DEVICE_HELP = ("auto: cuda when an NVIDIA driver is present, CUDA_VISIBLE_DEVICES does not hide the GPUs "
               "and torch is a CUDA build (checked without importing torch), else cpu.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True, help=DEVICE_HELP)
REMOTE_HELP = ("A remote cache (an fsspec URL: s3://bucket/prefix, gs://..., file:///abs/path, ssh://host/path; "
               "credentials from the backend's usual places, never the URL); `none` turns a configured one off. "
               "Default: $OPTFORGE_REMOTE, else the recipe's cache.remote.")
remote_option = click.option("--remote", metavar="URL", default=None, help=REMOTE_HELP)
INTERRUPTED = ("interrupted: the stages that finished are in the lock file; building again goes on from "
               "them")  # exit 130, as a shell reports SIGINT


def echo_error(e: OptforgeError) -> None:
    """A user's error on stderr: every located line of a recipe's, else `error: ...`."""
    if isinstance(e, RecipeError):
        lines = e.lines() if hasattr(e, "lines") else [e.located()]
    else:
        lines = [f"error: {e}"]
    for line in lines:
        click.echo(line, err=True)


def user_errors(fn):
    """OptforgeError -> its message on stderr (every located line for a multi-error recipe), exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OptforgeError as e:
            echo_error(e)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="optforge")
@click.option("--verbose", is_flag=True,
              help="Also show the warnings third-party libraries print when imported (torchao's optional "
                   "CUDA kernels that did not load, torch deprecations); hidden by default.")
def main(verbose):
    """optforge: a make-style build that turns a trained model into a small, fast one."""
    from optforge.quiet import quiet_imports

    quiet_imports(verbose)


@main.command()
@click.argument("recipes", nargs=-1, required=True)
def validate(recipes):
    """Check recipes without running anything (schema, references, data files), for every device. Every
    file is checked and gets its line; exit 2 if any failed."""
    from optforge.recipe import DEVICES
    from optforge.recipe_io import load_recipe, remote_code_notice

    failed = False
    for recipe in recipes:
        try:
            loaded = load_recipe(recipe, recipe)
            n = {device: len(loaded.graph(device).nodes) for device in DEVICES}
        except OptforgeError as e:
            echo_error(e)
            failed = True
            continue
        notice = remote_code_notice(loaded)
        if notice is not None:
            click.echo(notice.located("warning"), err=True)
        click.echo(f"ok: {recipe} ({loaded.recipe.name}: {n['cpu']} stages on cpu, {n['cuda']} on cuda)")
    if failed:
        sys.exit(2)


@main.command()
@click.argument("recipe")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object {stages: [...], expected: {seconds, stale, no_estimate}}.")
@click.option("--verify", is_flag=True, help="Hash every cached file (slower) instead of size+mtime.")
@device_option
@user_errors
def plan(recipe, as_json, verify, device):
    """Stages in execution order, fresh or stale, and why; for a stale stage, how long its last run on
    this machine took (else the last run of its kind here), and the total."""
    from optforge.run import verify_all
    from optforge.session import open_session
    from optforge.timings import expected, machine_name, plan_estimates, total_line

    session = open_session(recipe, device, display=recipe)
    plans = session.plan()
    if verify:
        verify_all(session, plans)
    session.save_hashes()
    estimates = plan_estimates(session.cache.root, machine_name(session.device_fp), session.name, plans)
    if as_json:
        stages = [{**p.to_json(), "expected_s": e.seconds if e else None, "expected_from": e.source if e else None}
                  for p in plans for e in [estimates.get(p.name)]]
        click.echo(json.dumps({"stages": stages, "expected": expected(plans, estimates)}, indent=1))
        return
    width = max(len(p.name) for p in plans)
    labels = {name: e.label() for name, e in estimates.items()}
    label_width = max(map(len, labels.values()), default=0)
    for p in plans:
        columns = [f"{p.status:<6} {p.name:<{width}}"]
        if label_width:
            columns.append(f"{labels.get(p.name, ''):<{label_width}}")
        click.echo("  ".join(columns + ["; ".join(p.reasons)]).rstrip())
    stale = sum(p.status == "stale" for p in plans)
    click.echo(f"{stale} stale, {len(plans) - stale} fresh")
    total = total_line(plans, estimates)
    if total:
        click.echo(total)


@main.command()
@click.argument("recipe")
@device_option
@click.option("--force", multiple=True, metavar="STAGE", help="Rebuild STAGE even if cached (repeatable).")
@click.option("--until", metavar="STAGE", help="Build only STAGE and what it depends on.")
@click.option("--dry-run", is_flag=True, help="Show what would run; run nothing.")
@click.option("--keep-going/--stop", default=False, show_default=True,
              help="After a crashing stage: build what does not depend on it, or stop.")
@click.option("--wait", is_flag=True, help="Wait for another build of this recipe instead of failing.")
@click.option("--trust-remote-code", is_flag=True,
              help="Let a teacher with `trust_remote_code: true` run the Python code that comes with its model.")
@remote_option
@click.option("--push/--no-push", default=None,
              help="Upload every stage this build runs to the remote cache (default: the recipe's cache.push, "
                   "else no). A failed upload is a warning and exit status 2; the results stay in the local cache.")
@click.option("--executor", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="local: this process runs the stale stages one at a time. dask: independent stages run at "
                   "once as tasks on a Dask cluster (pip install 'optforge[dask]'); benchmarks never share "
                   "a machine with another stage.")
@click.option("--address", metavar="ADDR", default=None,
              help="The Dask scheduler to use (tcp://host:8786); its workers may be on other machines, so "
                   "entries travel through the remote cache. Default: a local cluster for this build.")
@user_errors
def build(recipe, device, force, until, dry_run, keep_going, wait, trust_remote_code, remote, push, executor,
          address):
    """Run the stale stages, then render the report. With a remote cache, a stale stage whose key the
    remote has is downloaded and checked (size and sha256 of every file) instead of run."""
    from optforge.run import build as run_build

    try:
        result = run_build(recipe, device=device, force=force, until=until, dry_run=dry_run,
                           keep_going=keep_going, wait=wait, display=recipe, remote=remote, push=push,
                           executor=executor, address=address,
                           trust_remote_code=trust_remote_code or dry_run)  # a dry run loads no model
    except KeyboardInterrupt:  # the executor has stopped what ran (a local cluster closed with its stages)
        click.echo(INTERRUPTED, err=True)
        sys.exit(130)
    sys.exit(result.exit_code)


def _sync(verb: str, recipe: str, device: str, remote_url, until):
    """push / pull: the session, the remote it names (or a one-line error), the loop, the summary line."""
    from optforge import sync
    from optforge.errors import RemoteError
    from optforge.remote import Remote
    from optforge.session import open_session

    session = open_session(recipe, device, display=recipe)
    setting = sync.remote_setting(session.recipe, remote_url)
    if setting is None:
        raise RemoteError(f"no remote cache to {verb}: set cache.remote in {recipe}, OPTFORGE_REMOTE, or --remote URL")
    remote = Remote(setting.url)
    if verb == "push":
        result = sync.push(session, remote, until, echo=click.echo)
    else:
        result = sync.pull(session, remote, until, echo=click.echo,
                           note=lambda msg: click.echo(f"warning: {msg}", err=True))
    click.echo(sync.summary(verb, result, remote))


def sync_command(fn):
    """push and pull: `RECIPE [--remote URL] [--until STAGE] [--device ...]`, user errors as one line."""
    for decorate in (user_errors, device_option,
                     click.option("--until", metavar="STAGE", help="Only STAGE and what it depends on."),
                     remote_option, click.argument("recipe"), main.command()):
        fn = decorate(fn)
    return fn


@sync_command
def push(recipe, remote, until, device):
    """Upload the recipe's stages built here (and verified here in full) that the remote cache lacks:
    files first, each stored under its sha256, then the entry's manifest, which makes it visible.
    A key another machine already published is left as it is."""
    _sync("push", recipe, device, remote, until)


@sync_command
def pull(recipe, remote, until, device):
    """Download the recipe's stages that the local cache lacks and the remote cache has, each file checked
    against its sha256; a damaged or incomplete remote entry is skipped with a warning. Entries of
    hardware-bound stages come only from this device; compiled code only when the lock file records it."""
    _sync("pull", recipe, device, remote, until)


@main.command()
@click.argument("recipe")
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Whose graph to draw (the rows and overrides of that device); needs no GPU.")
@user_errors
def dag(recipe, fmt, device):
    """The stage graph as Mermaid or Graphviz dot."""
    from optforge.graph import to_dot, to_mermaid
    from optforge.recipe_io import load_recipe

    graph = load_recipe(recipe, recipe).graph(device, check_data=False)
    click.echo((to_dot if fmt == "dot" else to_mermaid)(graph), nl=False)


@main.command()
@click.argument("recipe")
@click.option("--compare", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A previous report.md to compare against.")
@device_option
@user_errors
def report(recipe, compare, device):
    """Re-render the report from cached results (runs no stage)."""
    from optforge.session import open_session, render, stage_results

    session = open_session(recipe, device, display=recipe)
    plans = session.plan()
    session.save_hashes()

    for f in render(session, stage_results(session, plans), compare=compare):
        click.echo(f"report: {f}")


@main.command()
@click.option("--dry-run", is_flag=True, help="List what would be removed.")
@click.option("--forget", multiple=True, metavar="LOCKFILE",
              help="First take this lock file out of the registry (a project that is gone; repeatable).")
@click.option("--forget-missing", is_flag=True, help="First forget every registered lock file that no longer exists.")
@user_errors
def gc(dry_run, forget, forget_missing):
    """Remove cache entries that no known recipe's lock file refers to. Refuses (removing nothing)
    while a build runs or a registered lock file is missing or unreadable."""
    from optforge.cache import Cache

    result = Cache().gc(dry_run=dry_run, forget=forget, forget_missing=forget_missing)
    for path in result.forgotten:
        click.echo(f"{'would forget' if dry_run else 'forgot'} {path}")
    for key in result.removed:
        click.echo(f"{'would remove' if dry_run else 'removed'} {key}")
    click.echo(f"gc: {len(result.removed)} {'to remove' if dry_run else 'removed'}, {len(result.kept)} kept")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@user_errors
def clean(recipe):
    """Forget a recipe's build state (its lock files, one per device); its cache entries become gc-able.
    Deletes only lock files optforge wrote for this recipe, and only for a recipe that loads."""
    from optforge.cache import Cache
    from optforge.fingerprint import read_json
    from optforge.lockfile import is_optforge_lock, lock_path
    from optforge.recipe import DEVICES
    from optforge.recipe_io import load_recipe

    loaded = load_recipe(recipe, str(recipe))  # not a recipe (poetry.toml, flake.nix): touch nothing
    name = loaded.recipe.name
    cache = Cache()
    forgot, problems = [], []
    for lock_file in [lock_path(loaded.path, device) for device in DEVICES]:
        if lock_file.exists():
            data = read_json(lock_file)
            if not is_optforge_lock(data, name):
                whose = (f"the lock file of recipe {data['recipe']!r}, not of {name!r}" if is_optforge_lock(data)
                         else f"not an optforge lock file of recipe {name!r}")
                problems.append(f"{lock_file} is {whose}; left it alone (delete it yourself if it is stale)")
                continue
            with cache.recipe_lock(name):  # never pull the state from under a running build
                lock_file.unlink(missing_ok=True)
            forgot.append(str(lock_file))
        if cache.unregister(lock_file) and str(lock_file) not in forgot:
            forgot.append(str(lock_file))
    if forgot:
        click.echo(f"clean: forgot {', '.join(forgot)}; run `optforge gc` to free their cache entries")
    elif not problems:
        click.echo(f"clean: nothing recorded for {recipe}")
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    if problems:
        sys.exit(2)


@main.command("serve")
@click.argument("recipe")
@click.option("--config", default="best", show_default=True,
              help="A config name, or best (the report's best ready one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to bind (0: any free port).")
@click.option("--max-batch", type=int, default=32, show_default=True,
              help="Largest batch per forward pass (1: no batching).")
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True,
              help="Longest a request waits for its batch to fill (0..10000).")
@click.option("--header-timeout-s", type=float, default=DEFAULT_HEADER_TIMEOUT_S, show_default=True,
              help="A connection whose request head is not complete this long after it opened (or after "
                   "the head's first byte, on a kept-alive connection) is closed.")
@click.option("--body-timeout-s", type=float, default=DEFAULT_BODY_TIMEOUT_S, show_default=True,
              help="A request whose whole body has not arrived this long after its head is answered 408.")
@click.option("--max-connections", type=int, default=None,
              help="Open connections beyond this are answered 503 and closed at once. Default: what the "
                   "file-descriptor limit (ulimit -n) leaves after the server's own files and a margin, "
                   "at most 1024.")
@device_option
@user_errors
def serve(recipe, config, host, port, max_batch, max_wait_ms, header_timeout_s, body_timeout_s, max_connections,
          device):
    """Serve a built configuration over HTTP: POST /predict, GET /healthz, GET /metrics."""
    from optforge.serve.launch import serve_recipe

    serve_recipe(recipe, config, host, port, max_batch, max_wait_ms, device, echo=click.echo,
                 header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
                 max_connections=max_connections)


@main.command("export")
@click.argument("recipe")
@click.option("--config", default="best", show_default=True,
              help="A config name, or best (the report's best ready one).")
@click.option("--format", "fmt", type=click.Choice(list(EXPORT_FORMATS)), required=True,
              help="hf: a save_pretrained directory (transformers); onnx: an ONNX model (onnxruntime); "
                   "pt2: the AOTInductor package of a row compiled on CPU (torch).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The directory to write (must not exist or be empty, unless --force).")
@click.option("--force", is_flag=True, help="Replace --out when it holds a previous export.")
@device_option
@user_errors
def export(recipe, config, fmt, out, force, device):
    """Write a built configuration's model in a form other tools load without optforge, after checking
    that it predicts what the cached artifact predicts on the whole eval split."""
    from optforge.export.command import export_row

    done = export_row(recipe, config, fmt, out, force=force, device=device,
                      err=lambda line: click.echo(line, err=True, nl=False), tty=sys.stderr.isatty())
    if done.why:
        click.echo(f"config {done.config!r}: {done.why}")
    click.echo(done.summary())


if __name__ == "__main__":
    main()
