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

    def located(self) -> str:
        """`FILE:LINE:COL: error: <path>: message`, the first line the CLI prints."""
        where = self.file or "<recipe>"
        if self.line is not None:
            where += f":{self.line}:{self.col or 1}"
        what = f"{self.dotted}: {self.message}" if self.path else self.message
        return f"{where}: error: {what}"

    def __str__(self) -> str:
        return self.located()


class DataError(OptforgeError):
    """A data file that is missing, unreadable or malformed."""


class CacheError(OptforgeError):
    """The cache cannot be used (locked by another build, unwritable...)."""


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
            out += ("." if out else "") + str(part)
    return out
