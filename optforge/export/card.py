"""An export directory's README.md (the model card, from the packaged Jinja template `card.md.j2`) and its
MANIFEST. Pure: plain dicts in, text out; no torch.

MANIFEST lists every other file of the directory, one line each, sorted by path:

    <sha256 hex>  <size in bytes>  <path relative to the directory, '/'-separated>

after comment lines starting with "#". `awk '!/^#/ {print $1"  "$3}' MANIFEST | sha256sum -c` checks it.

The card is Markdown, which a renderer passes raw HTML through: every value that comes from a user (a
label name, a path, a reason) goes through the `text` filter (HTML-escaped, Markdown punctuation
backslashed, one line), the `code` filter (a code span no backtick in the value can close) or `fenced`
(a code block no line of the value can close).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from optforge.fingerprint import file_sha256

MANIFEST = "MANIFEST"
CARD = "README.md"
TEMPLATE = "card.md.j2"
MANIFEST_HEADER = "# optforge export manifest v1: <sha256>  <size in bytes>  <path>, every file but this one\n"

_MD_PUNCT = re.compile(r"([\\`*\[\]|])")  # what can start markup inside a line (and table cells)


def text(value) -> str:
    """A user's value as Markdown text: one line, no raw HTML, no Markdown markup."""
    one = " ".join(str(value).split())
    return _MD_PUNCT.sub(r"\\\1", html.escape(one, quote=False))


def code(value) -> str:
    """A user's value as a Markdown code span (shown literally; raw HTML is not interpreted there)."""
    one = " ".join(str(value).split())
    longest = max((len(run) for run in re.findall(r"`+", one)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if one.startswith("`") or one.endswith("`") else ""
    return f"{fence}{pad}{one}{pad}{fence}"


def fenced(value, lang: str = "") -> str:
    """A fenced code block holding `value` verbatim, fenced by more backticks than any run inside it."""
    body = str(value).rstrip("\n")
    longest = max((len(run) for run in re.findall(r"`{3,}", body)), default=2)
    fence = "`" * (longest + 1)
    return f"{fence}{lang}\n{body}\n{fence}"


def write_manifest(directory: Path) -> list[dict]:
    """Write MANIFEST for every file under `directory` (but itself); returns its entries."""
    directory = Path(directory)
    entries = []
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            raise ValueError(f"{rel} is a symlink: an export holds plain files only")
        if path.is_file() and rel != MANIFEST:
            entries.append({"path": rel, "size": path.stat().st_size, "sha256": file_sha256(path)})
    lines = [f"{e['sha256']}  {e['size']}  {e['path']}\n" for e in entries]
    (directory / MANIFEST).write_text(MANIFEST_HEADER + "".join(lines), encoding="utf-8")
    return entries


def read_manifest(path: Path) -> list[dict]:
    """The entries of a MANIFEST file."""
    entries = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        sha, size, rel = line.split("  ", 2)
        entries.append({"path": rel, "size": int(size), "sha256": sha})
    return entries


def render_card(context: dict) -> str:
    """The model card for `context` (see `optforge.export.command.card_context` for its keys)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).resolve().parent)),
                             autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["text"] = text
    env.filters["code"] = code
    env.filters["fenced"] = fenced
    return env.get_template(TEMPLATE).render(**context, manifest_name=MANIFEST)
