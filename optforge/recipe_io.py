"""Read a recipe file into a validated `Recipe`, turning every problem into a located `RecipeError`.

YAML is composed into a node tree first (nodes keep their line/column), then constructed with the
safe constructor; pydantic error `loc` tuples are walked through that tree to find the node to blame:
an unknown key points at the key, a bad value at the value, a missing key at the parent mapping.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import types
import typing
import weakref
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from optforge.errors import RecipeError, shown
from optforge.recipe import PartialOf, Recipe, RecipeCheckErrors

MAX_RECIPE_BYTES = 1 << 20  # said as "1 MiB" in messages; a recipe is a few KB
MAX_ERRORS_SHOWN = 50  # located lines printed for one recipe


class RecipeErrors(RecipeError):
    """Several located errors at once (like torchtune's ConfigError). Behaves as the first one; the CLI
    prints all of them, first line first."""

    def __init__(self, errors: list[RecipeError]):
        first = errors[0]
        super().__init__(first.message, first.path, first.file, first.line, first.col)
        self.errors = errors

    def lines(self) -> list[str]:
        """Every located line, up to MAX_ERRORS_SHOWN, then one line counting the rest."""
        shown_errors = self.errors[:MAX_ERRORS_SHOWN]
        rest = len(self.errors) - len(shown_errors)
        more = [RecipeError(f"{rest} more errors not shown", (), self.file).located()] if rest else []
        return [e.located() for e in shown_errors] + more


# --------------------------------------------------------------------------- reading the file


def read_recipe(path: Path, display: str) -> str:
    """The text of a recipe file: a regular file (not a FIFO, a device or a directory, which could block
    or never end) of at most MAX_RECIPE_BYTES, in UTF-8. Anything else is a RecipeError for the file."""

    def refuse(message: str) -> RecipeError:
        return RecipeError(message, (), display)

    raw = b""
    try:
        before = os.stat(path)  # a device is never opened: opening one can block or act
        if stat.S_ISREG(before.st_mode) and before.st_size <= MAX_RECIPE_BYTES:
            # O_NONBLOCK: should a FIFO take the file's place after the stat, the open does not wait
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            with open(fd, "rb") as f:
                before = os.fstat(fd)
                raw = f.read(MAX_RECIPE_BYTES + 1) if stat.S_ISREG(before.st_mode) else b""
    except FileNotFoundError:
        raise refuse(f"recipe file not found: {path}") from None
    except OSError as e:
        raise refuse(f"cannot read recipe: {e.strerror or e}") from None
    if not stat.S_ISREG(before.st_mode):
        raise refuse(f"not a regular file ({_file_kind(before.st_mode)}); a recipe is a YAML file")
    if before.st_size > MAX_RECIPE_BYTES or len(raw) > MAX_RECIPE_BYTES:
        size = max(before.st_size, len(raw))
        raise refuse(f"the recipe file is {size / (1 << 20):.1f} MiB; the limit is 1 MiB (a recipe is a few KB "
                     f"of YAML)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise refuse(f"cannot read recipe: {e}") from None


def _file_kind(mode: int) -> str:
    kinds = [(stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a file")


class RecipeLoader(yaml.SafeLoader):
    """A SafeLoader that keeps the composed node tree (every node carries its start mark), so errors
    found after construction can still be located, and that refuses duplicate keys."""

    def __init__(self, stream, filename: str):
        super().__init__(stream)
        self.filename = filename
        self.root: yaml.Node | None = None

    def load_document(self):
        self.root = self.get_single_node()
        if self.root is None:
            raise RecipeError("the recipe is empty; it needs at least `name`, `data`, `teacher`, `configs`",
                              (), self.filename, 1, 1)
        self._check_duplicates(self.root, ())
        return self.construct_document(self.root)

    def _check_duplicates(self, node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    continue
                k = key.value if isinstance(key, yaml.ScalarNode) else id(key)
                if k in seen:
                    raise RecipeError(f"duplicate key {k!r} (first defined on line {seen[k].start_mark.line + 1})",
                                      path + (k,), self.filename, *_pos(key))
                seen[k] = key
                self._check_duplicates(value, path + (k,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_duplicates(item, path + (i,))


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load_yaml(path: Path, display: str | None = None):
    """(data, root node). YAML syntax errors become located RecipeErrors."""
    display = display or str(path)
    text = read_recipe(Path(path), display)
    loader = RecipeLoader(text, display)
    try:
        data = loader.load_document()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise RecipeError(f"invalid YAML: {problem}", (), display,
                          mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
    finally:
        loader.dispose()
    return data, loader.root


# --------------------------------------------------------------------------- locating a key path


def locate(root: yaml.Node, path: tuple, want: str = "value") -> tuple[int, int]:
    """Line/col of the node at `path` ("key" node or "value" node; a block mapping/list value is
    located at its key). Parts that are not in the file (defaults, merged keys) fall back to the
    deepest node that is."""
    node, key_node = root, None
    for part in path:
        found = None
        if isinstance(node, yaml.MappingNode):
            found = _keys(node).get(str(part))
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            found = (None, node.value[part])
        if found is None:
            want = "value"  # the part is not written: blame the section that would hold it
            break
        key_node, node = found
    if key_node is not None and (want == "key" or _is_block(node)):
        return _pos(key_node)  # a whole block section is best named by its key's line
    return _pos(node)


_KEYS: "weakref.WeakKeyDictionary[yaml.MappingNode, dict]" = weakref.WeakKeyDictionary()


def _keys(node: yaml.MappingNode) -> dict:
    """key text -> (key node, value node) of a mapping, the last one written winning (as after a merge);
    kept per node, so locating every error of a recipe stays linear in its size."""
    if node not in _KEYS:
        _KEYS[node] = {k.value: (k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    return _KEYS[node]


def _is_block(node: yaml.Node) -> bool:
    return isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style


def _unwrap(annotation):
    """Optional[X] / Union[X, None] -> X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return annotation


def model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at `path` (for "did you mean" on unknown keys)."""
    current = Recipe
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            # a partial mapping (a device override) has the keys of the section it is merged over
            partial = [m.model for m in field.metadata if isinstance(m, PartialOf)]
            current = partial[0] if partial else _unwrap(field.annotation)
        elif typing.get_origin(current) is list and isinstance(part, int):
            current = _unwrap(typing.get_args(current)[0])
        else:
            return None
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _show(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return shown(value)


def _message(err: dict) -> str:
    kind, loc, msg = err["type"], tuple(err["loc"]), err["msg"]
    if kind == "extra_forbidden":
        model = model_at(loc[:-1])
        valid = list(model.model_fields) if model else []
        out = f"unknown key {shown(loc[-1])}"
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        if close:
            out += f"; did you mean {close[0]!r}?"
        return out + (f" (valid keys: {', '.join(valid)})" if valid else "")
    if kind == "missing":
        return "required key is missing"
    msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        msg += f", got {_show(err.get('input'))}"
        close = difflib.get_close_matches(str(err.get("input")), options, n=1)
        return msg + (f"; did you mean {close[0]!r}?" if close else "")
    if kind.endswith("_type") or kind.startswith(("greater", "less", "string_", "too_", "int_", "float_",
                                                  "bool_", "list_")):
        msg += f", got {_show(err.get('input'))}"
    return msg


def validation_errors(errors: list[dict], root: yaml.Node, display: str) -> RecipeError:
    """pydantic error dicts -> one located RecipeError, or RecipeErrors (in file order) for several."""
    out = []
    for err in errors:
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            line, col = locate(root, loc, "key")
        elif err["type"] == "missing":
            line, col = locate(root, loc[:-1], "value")
        else:
            line, col = locate(root, loc, "value")
        out.append(RecipeError(_message(err), loc, display, line, col))
    out.sort(key=lambda r: (r.line or 0, r.col or 0))
    return RecipeErrors(out) if len(out) > 1 else out[0]


# --------------------------------------------------------------------------- the public entry points


@dataclass
class LoadedRecipe:
    recipe: Recipe
    path: Path  # the recipe file
    display: str  # how the user named it (used in error positions)
    root: yaml.Node  # composed YAML, to locate later errors (e.g. missing data files)

    @property
    def dir(self) -> Path:
        return self.path.parent

    def error(self, message: str, path: tuple, want: str = "value") -> RecipeError:
        line, col = locate(self.root, path, want)
        return RecipeError(message, path, self.display, line, col)

    def graph(self, device: str, check_data: bool = True):
        """The stage graph a build on `device` runs (from `recipe.for_device(device)`); with
        `check_data`, its local data files must exist."""
        from optforge.errors import OptforgeError
        from optforge.graph import build_graph

        try:
            graph = build_graph(self.recipe.for_device(device), self.dir)
        except RecipeError as e:
            raise _relocate(e, self.root, self.display) from None
        except OptforgeError as e:  # a graph cycle the schema did not catch: still the recipe's fault
            raise RecipeError(str(e), (), self.display, 1, 1) from None
        if check_data:
            check_data_files(self, graph)
        return graph


def load_recipe(path: Path | str, display: str | None = None) -> LoadedRecipe:
    """Parse and validate (schema + cross-references). Raises RecipeError/RecipeErrors, located."""
    path = Path(path)
    display = display or str(path)
    data, root = load_yaml(path, display)
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of `key: value` lines, got {_show(data)}",
                          (), display, *_pos(root))
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise validation_errors(e.errors(), root, display) from None
    except RecipeCheckErrors as e:  # references; a device override that does not validate once merged
        raise validation_errors(e.details, root, display) from None
    except RecipeError as e:
        # the device checks run inside Recipe's model validator; pydantic lets non-ValueErrors through
        # unchanged, so the key path survives and only the position is missing
        raise _relocate(e, root, display) from None
    return LoadedRecipe(recipe, path, display, root)


def _relocate(e: RecipeError, root: yaml.Node, display: str) -> RecipeError:
    line, col = locate(root, e.path, "value")
    return RecipeError(e.message, e.path, display, line, col)


def check_data_files(loaded: LoadedRecipe, graph) -> None:
    """Local data files must exist; the error points at `data.dataset` (folder missing) or at
    `data.train` / `data.eval` (file missing)."""
    from optforge.graph import data_root

    data = loaded.recipe.data
    for role, file in graph["data"].data_files.items():
        p = Path(file)
        if p.is_file():
            continue
        if not p.parent.is_dir():
            raise loaded.error(
                f"dataset folder {data.dataset!r} not found (looked beside the recipe in {loaded.dir}, "
                f"in the current directory and under the data root {data_root()}); fix the path or set "
                f"OPTFORGE_DATA_ROOT", ("data", "dataset"))
        raise loaded.error(f"data file {getattr(data, role)!r} not found in {p.parent}"
                           f" (files there: {', '.join(sorted(x.name for x in p.parent.iterdir())[:8]) or 'none'})",
                           ("data", role))


def load_and_check(path: Path | str, display: str | None = None, device: str = "cpu"):
    """What `validate` checks and what every other command starts from: (LoadedRecipe, the Graph a
    build on `device` runs). `loaded.recipe` is the whole recipe; `.for_device(device)` its view."""
    loaded = load_recipe(path, display)
    return loaded, loaded.graph(device)


__all__ = ["RecipeLoader", "RecipeErrors", "LoadedRecipe", "load_yaml", "load_recipe", "load_and_check",
           "locate", "model_at"]
