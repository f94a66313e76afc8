"""One error hierarchy. The CLI turns any OptforgeError into one clear line and exit 2.

Unexpected exceptions are *not* OptforgeErrors: they keep their traceback, because they are our bugs.
"""

from __future__ import annotations


class OptforgeError(Exception):
    """Base of every error that a user can cause and fix."""


class RecipeError(OptforgeError):
    """A recipe that cannot be used. `path` is the key path inside the recipe (e.g. ("quantize", 1, "group_size")),
    `line`/`col` (1-based) locate the YAML node when known."""

    def __init__(self, message: str, path: tuple = (), file: str | None = None,
                 line: int | None = None, col: int | None = None):
        super().__init__(message)
        self.message = message
        self.path = tuple(path)
        self.file = file
        self.line = line
        self.col = col

    @property
    def dotted(self) -> str:
        return format_path(self.path)

    def located(self, severity: str = "error") -> str:
        """`FILE:LINE:COL: error: <path>: message`, the first line the CLI prints. A message that quotes
        a long value through something other than `shown` is still cut to MESSAGE_LIMIT."""
        where = self.file or "<recipe>"
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        what = f"{self.dotted}: {self.message}" if self.path else self.message
        return f"{where}: {severity}: {clip(what, MESSAGE_LIMIT)}"

    def __str__(self) -> str:
        return self.located()


class DataError(OptforgeError):
    """A data file that is missing, unreadable or malformed."""


class CacheError(OptforgeError):
    """The cache cannot be used (locked by another build, unwritable...)."""


class RemoteError(CacheError):
    """The remote cache cannot be used: a URL that is not one, a backend that is not installed, a store that
    cannot be reached or refuses the credentials (optforge.remote). Its message names the remote without
    credentials (optforge.remote_url.redact)."""


class ExecutorError(OptforgeError):
    """`--executor` / `--address`: an engine that is not installed, a scheduler that does not answer, a
    cluster whose workers cannot run a stage (optforge.executors)."""


class StageFailure(OptforgeError):
    """An *expected*, deterministic failure of one stage (e.g. a quantization method that does not
    support this shape or device). It is recorded in the cache like a result, so a rebuild does not
    retry it, and the configuration gets a `failed: <reason>` row in the report; the rest of the build
    goes on."""


def format_path(path: tuple) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + clip(str(part), VALUE_LIMIT)
    return out


# --------------------------------------------------------------------------- quoting what the user wrote

VALUE_LIMIT = 80  # characters of a user's value (or key) an error message quotes
MESSAGE_LIMIT = 1000  # characters of one error line after its location


def clip(text: str, limit: "int | None") -> str:
    """`text`, cut to `limit` characters (ending in "...") when longer; None: no limit. The one truncation
    rule: a 2 MB value must not become a 2 MB error line."""
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def shown(value) -> str:
    """A user's value as an error message quotes it: its repr, at most VALUE_LIMIT characters."""
    return clip(repr(value), VALUE_LIMIT)


# --------------------------------------------------------------------------- one rule for each of these

# Library errors a kernel raises when a method, dtype, shape or device combination is not supported here
# (torch: RuntimeError/NotImplementedError; torchao: AssertionError/ValueError for shapes it rejects,
# ImportError for a kernel library that is absent). Inside a `kernel_failure` block they mean "this
# configuration cannot run here": a deterministic StageFailure, recorded, and the build goes on.
KERNEL_ERRORS = (RuntimeError, NotImplementedError, AssertionError, ImportError, ValueError)


def one_line(error, limit: "int | None" = 200) -> str:
    """An exception (as `Type: message`) or a text, whitespace collapsed to one line, at most `limit` chars
    (None: no limit)."""
    if isinstance(error, BaseException):
        msg = " ".join(str(error).split())
        msg = f"{type(error).__name__}: {msg}" if msg else type(error).__name__
    else:
        msg = " ".join(str(error or "").split())
    return clip(msg, limit)


class kernel_failure:
    """Context manager: a `KERNEL_ERRORS` exception inside the block -> StageFailure("<what>: <one line>").
    OptforgeErrors pass through unchanged; anything else is a bug and keeps its traceback."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, OptforgeError) or not isinstance(exc, KERNEL_ERRORS):
            return False
        raise StageFailure(f"{self.what}: {one_line(exc)}") from exc
