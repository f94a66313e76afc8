"""Read a recipe file into a validated `Recipe`, turning every problem into a located `RecipeError`.

YAML is composed into a node tree first (nodes keep their line/column), then constructed with the
safe constructor; pydantic error `loc` tuples are walked through that tree to find the node to blame:
an unknown key points at the key, a bad value at the value, a missing key at the parent mapping.

A recipe is read in bounded time and memory whatever the file holds: only a regular file of at most
MAX_RECIPE_BYTES is read; composing visits each YAML node once and refuses nesting deeper than
MAX_DEPTH, more than MAX_VALUES values once aliases are expanded (an alias counts as every value it
repeats, so an "alias bomb" is refused after composing a few hundred nodes), and integers of more than
MAX_INT_DIGITS digits. Scalars resolve by the YAML 1.2 core schema: only true/false are booleans, and
`1:04` (sexagesimal in YAML 1.1), `yes`, `on` or a date are strings.
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
from typing import Optional

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.parser import Parser
from yaml.reader import Reader, ReaderError
from yaml.resolver import BaseResolver
from yaml.scanner import Scanner

from optforge.errors import RecipeError, shown
from optforge.recipe import PartialOf, Recipe, RecipeCheckErrors

MAX_RECIPE_BYTES = 1 << 20  # said as "1 MiB" in messages; a recipe is a few KB
MAX_DEPTH = 64  # nesting levels; a recipe uses about 5
MAX_VALUES = 10_000  # scalars and collections, counting what aliases repeat; a recipe has a few hundred
MAX_INT_DIGITS = 32  # the largest number a recipe takes is a seed below 2**32
MAX_ERRORS_SHOWN = 50  # located lines printed for one recipe

INT_TAG = "tag:yaml.org,2002:int"
MERGE_TAG = "tag:yaml.org,2002:merge"


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


# --------------------------------------------------------------------------- YAML: the 1.2 core schema


class CoreResolver(BaseResolver):
    """Implicit tags of the YAML 1.2 core schema, plus `<<` merge keys (PyYAML's default is YAML 1.1:
    `yes`/`on` are booleans, `1:04` is 64, `0755` is octal, dates are dates)."""


for _tag, _pattern, _first in [
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    (INT_TAG, r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("tag:yaml.org,2002:float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", list("-+.0123456789")),
    (MERGE_TAG, r"<<", ["<"]),
]:
    CoreResolver.add_implicit_resolver(_tag, re.compile(rf"(?:{_pattern})\Z"), _first)


class CoreConstructor(SafeConstructor):
    """SafeConstructor with the core schema's readings of int, float and bool (also for explicit tags)."""

    def construct_core_int(self, node):
        value = self.construct_scalar(node)
        sign, digits = (-1, value[1:]) if value[:1] == "-" else (1, value.removeprefix("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        try:
            return sign * int(digits[2:] if base != 10 else digits, base)
        except ValueError:
            raise ConstructorError(None, None, f"not an integer: {shown(value)}", node.start_mark) from None

    def construct_core_float(self, node):
        value = self.construct_scalar(node)
        special = {".inf": float("inf"), "+.inf": float("inf"), "-.inf": float("-inf"), ".nan": float("nan")}
        if value.lower() in special:
            return special[value.lower()]
        try:
            return float(value)
        except ValueError:
            raise ConstructorError(None, None, f"not a number: {shown(value)}", node.start_mark) from None

    def construct_core_bool(self, node):
        value = self.construct_scalar(node)
        if value.lower() not in ("true", "false"):
            raise ConstructorError(None, None, f"not a boolean: {shown(value)} (use true or false)", node.start_mark)
        return value.lower() == "true"


CoreConstructor.add_constructor(INT_TAG, CoreConstructor.construct_core_int)
CoreConstructor.add_constructor("tag:yaml.org,2002:float", CoreConstructor.construct_core_float)
CoreConstructor.add_constructor("tag:yaml.org,2002:bool", CoreConstructor.construct_core_bool)


class RecipeLoader(Reader, Scanner, Parser, Composer, CoreConstructor, CoreResolver):
    """A safe, YAML 1.2 core-schema loader that keeps the composed node tree (every node carries its start
    mark), so errors found after construction can still be located. While composing, where each node is
    visited once, it refuses duplicate keys, nesting deeper than MAX_DEPTH, more than MAX_VALUES values
    once aliases are expanded, a recursive alias and an integer of more than MAX_INT_DIGITS digits."""

    def __init__(self, stream, filename: str):
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        Composer.__init__(self)
        CoreConstructor.__init__(self)
        CoreResolver.__init__(self)
        self.filename = filename
        self.root: yaml.Node | None = None
        self._path: list = []  # key path of the node being composed (None for a key or the root)
        self._sizes: dict[yaml.Node, int] = {}  # node -> how many values it stands for, aliases expanded
        self._values = 0  # values composed so far, aliases expanded

    def load_document(self):
        self.root = self.get_single_node()
        if self.root is None:
            raise RecipeError("the recipe is empty; it needs at least `name`, `data`, `teacher`, `configs`",
                              (), self.filename, 1, 1)
        return self.construct_document(self.root)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if node not in self._sizes:  # still being composed: the alias is inside its own anchor
                raise self._error("this alias refers to a collection that contains it (a recursive alias)",
                                  event.start_mark, index)
            self._count(self._sizes[node], event.start_mark, index)
            return node
        self._path.append(_part(index))
        if len(self._path) > MAX_DEPTH:  # named by its top-level key: the whole path is as deep as the nesting
            raise self._error(f"nested deeper than {MAX_DEPTH} levels; a recipe needs a handful", event.start_mark,
                              path=self._key_path()[:1])
        before = self._values
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self._sizes[node] = self._values - before
        self._path.pop()
        return node

    def compose_scalar_node(self, anchor):
        node = super().compose_scalar_node(anchor)
        digits = len(node.value.lstrip("+-")) if node.tag == INT_TAG else 0
        if digits > MAX_INT_DIGITS:  # int() of 4301+ digits is a ValueError, and no recipe number is near
            raise self._error(f"an integer of {digits} digits; a recipe's numbers have at most {MAX_INT_DIGITS}",
                              node.start_mark)
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        seen: dict[str, yaml.Node] = {}
        for key, _ in node.value:
            if key.tag == MERGE_TAG or not isinstance(key, yaml.ScalarNode):
                continue
            if key.value in seen:
                raise self._error(f"duplicate key {shown(key.value)} (first defined on line "
                                  f"{seen[key.value].start_mark.line + 1})", key.start_mark,
                                  path=self._key_path() + (key.value,))
            seen[key.value] = key
        return node

    def _count(self, n: int, mark, index=None) -> None:
        self._values += n
        if self._values > MAX_VALUES:
            raise self._error(f"more than {MAX_VALUES} values, counting what aliases repeat; a recipe needs "
                              "far fewer", mark, index)

    def _key_path(self) -> tuple:
        return tuple(p for p in self._path if p is not None)

    def _error(self, message: str, mark, index=None, path: Optional[tuple] = None) -> RecipeError:
        """A RecipeError at `mark`: at `path`, else at the node being composed (or its child `index`)."""
        if path is None:
            part = _part(index)
            path = self._key_path() + ((part,) if part is not None else ())
        return RecipeError(message, path, self.filename, mark.line + 1, mark.column + 1)


def _part(index) -> object:
    """The key path part of the node composed at `index` (a list position, or the node of its key)."""
    if isinstance(index, yaml.ScalarNode):
        return index.value
    return index if isinstance(index, int) else None


def _pos(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def load_yaml(path: Path, display: str | None = None):
    """(data, root node). YAML syntax errors become located RecipeErrors."""
    display = display or str(path)
    text = read_recipe(Path(path), display)
    loader = None
    try:
        loader = RecipeLoader(text, display)  # the reader checks every character here
        data = loader.load_document()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = " ".join(p for p in (e.context, e.problem) if p)
        raise RecipeError(f"invalid YAML: {problem}", (), display,
                          mark.line + 1 if mark else None, mark.column + 1 if mark else None) from None
    except ReaderError as e:
        code = e.character if isinstance(e.character, int) else ord(e.character)
        line = text.count("\n", 0, e.position) + 1
        col = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        raise RecipeError(f"invalid YAML: unacceptable character #x{code:04x}: {e.reason}", (), display,
                          line, col) from None
    finally:
        if loader is not None:
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
                                                  "bool_", "list_", "finite_")):
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

    def view(self, device: str) -> Recipe:
        """The recipe a build on `device` runs: `recipe.for_device(device)`, its unset training precisions
        set to the device's default (`device.default_train_precision`)."""
        from optforge.device import default_train_precision

        return self.recipe.for_device(device).with_train_precision(default_train_precision(device))

    def graph(self, device: str, check_data: bool = True):
        """The stage graph a build on `device` runs (from `view(device)`); with `check_data`, its local
        data files must exist."""
        from optforge.errors import OptforgeError
        from optforge.graph import build_graph

        try:
            graph = build_graph(self.view(device), self.dir)
        except RecipeError as e:
            raise _relocate(e, self.root, self.display) from None
        except OptforgeError as e:  # a graph cycle the schema did not catch: still the recipe's fault
            raise RecipeError(str(e), (), self.display, 1, 1) from None
        if check_data:
            check_data_files(self, graph)
        return graph


def load_recipe(path: Path | str, display: str | None = None) -> LoadedRecipe:
    """Parse and validate (schema, cross-references, the teacher's architecture where a student from its
    layers or a prune needs one optforge.arch knows, student layers against the teacher's config).
    Raises RecipeError/RecipeErrors, located."""
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
    loaded = LoadedRecipe(recipe, path, display, root)
    check_teacher_head(loaded)
    check_architectures(loaded)
    check_student_layers(loaded)
    return loaded


def _relocate(e: RecipeError, root: yaml.Node, display: str) -> RecipeError:
    line, col = locate(root, e.path, "value")
    return RecipeError(e.message, e.path, display, line, col)


def check_data_files(loaded: LoadedRecipe, graph) -> None:
    """Local data files must exist; the error points at `data.dataset` (folder missing) or at
    `data.train` / `data.eval` (file missing), and names the file it looked for, never what else is in
    the folder (which may be any folder: `dataset: ~/`)."""
    from optforge.datasets import data_root

    data = loaded.recipe.data
    for role, file in graph["data"].data_files.items():
        p = Path(file)
        if p.is_file():
            continue
        if not p.parent.is_dir():
            raise loaded.error(
                f"dataset folder {shown(data.dataset)} not found (looked beside the recipe in {loaded.dir}, "
                f"in the current directory and under the data root {data_root()}); fix the path or set "
                f"OPTFORGE_DATA_ROOT", ("data", "dataset"))
        problem = "is not a regular file" if p.exists() else "does not exist"
        raise loaded.error(f"data file {shown(getattr(data, role))} not found: {p} {problem}", ("data", role))


def check_teacher_head(loaded: LoadedRecipe) -> None:
    """A classifier checkpoint keeps its own head (no `pooling: mean|cls`); a bare encoder gets a new one
    (no `label_map`). Checked from the teacher's config.json when it is on this machine; the teacher stage
    checks again when it loads the model (an hf: id outside the local cache)."""
    from optforge.model_source import cached_config

    teacher = loaded.recipe.teacher
    if loaded.recipe.is_lm:  # a causal LM has no classification head (recipe._task_problems refuses pooling)
        return
    config = cached_config(teacher.model) if teacher.model is not None else None
    if config is None:
        return
    archs = [str(a) for a in config.get("architectures") or []]
    classifier = [a for a in archs if a.endswith("ForSequenceClassification")]
    if classifier and teacher.pooling in ("mean", "cls"):
        raise loaded.error(f"{shown(teacher.model)} is already a classifier ({classifier[0]}): pooling "
                           f"{shown(teacher.pooling)} would replace its trained head; remove `pooling` to use it "
                           f"as is, or point `model` at a bare encoder", ("teacher", "pooling"))
    if not classifier and teacher.label_map is not None:
        raise loaded.error(f"{shown(teacher.model)} is a bare encoder: it gets a new head trained on the data's "
                           f"labels, so there is nothing for `label_map` to match", ("teacher", "label_map"))


def check_architectures(loaded: LoadedRecipe) -> None:
    """A student made of teacher layers and every prune entry of a model made from the teacher need an
    encoder optforge.arch knows, checked before anything runs from the teacher's config.json (a random-init
    teacher or student is BERT; a teacher whose config is not on this machine is checked by the stage).
    Every such entry is one located error. A causal-lm recipe: its structured prune entries need a GPT-2
    (optforge.lm.structure; every model of such a recipe has the teacher's type, a random-init one is GPT-2);
    a student of teacher layers is checked by its stage (optforge.lm.model.LAYER_LISTS)."""
    from optforge import arch
    from optforge.model_source import cached_config

    recipe = loaded.recipe
    config = cached_config(recipe.teacher.model) if recipe.teacher.model is not None else None
    if recipe.is_lm:
        check_lm_architecture(loaded, config)
        return
    if config is None or arch.model_type(config) is None or arch.find_adapter(config) is not None:
        return
    prunes = {p.name: p for p in recipe.prune}

    def from_teacher(ref: str, seen: frozenset = frozenset()) -> bool:
        if ref == "teacher":
            return True
        if ref == "student":
            return recipe.student is not None and recipe.student.from_teacher is not None
        entry = prunes.get(ref)
        return entry is not None and ref not in seen and from_teacher(entry.model, seen | {ref})

    def refused(operation: str, path: tuple) -> RecipeError:
        reason = arch.UnsupportedArchitecture(arch.model_type(config), operation, where="teacher.model").reason
        return loaded.error(reason, path)

    errors = []
    if recipe.student is not None and recipe.student.from_teacher is not None:
        errors.append(refused("a student made of teacher layers", ("student", "from_teacher")))
    errors += [refused(f"{p.method} pruning", ("prune", i)) for i, p in enumerate(recipe.prune)
               if from_teacher(p.model)]
    raise_all(errors)


def raise_all(errors: list[RecipeError]) -> None:
    """Nothing for no errors, the error itself for one, RecipeErrors for several."""
    if errors:
        raise errors[0] if len(errors) == 1 else RecipeErrors(errors)


def check_lm_architecture(loaded: LoadedRecipe, config: dict | None) -> None:
    from optforge import arch
    from optforge.lm.structure import supports_structured, unsupported

    model_type = arch.model_type(config) if config is not None else None
    if model_type is None or supports_structured(model_type):
        return
    reason = unsupported(model_type, where="teacher.model").reason
    errors = [loaded.error(reason, ("prune", i)) for i, p in enumerate(loaded.recipe.prune) if p.method == "structured"]
    raise_all(errors)


def check_student_layers(loaded: LoadedRecipe) -> None:
    """A student made of teacher layers names layers the teacher has, checked before anything runs from
    what the recipe or the teacher's config.json says (a teacher whose config is not on this machine, an
    hf: id outside the local cache, is not checked here)."""
    from optforge.model_source import cached_config, layer_count

    recipe = loaded.recipe
    if recipe.student is None or recipe.student.from_teacher is None:
        return
    teacher = recipe.teacher
    if teacher.config is not None:
        n, source = teacher.config.num_layers, "teacher.config.num_layers"
    else:
        config = cached_config(teacher.model)
        n, source = (layer_count(config) if config else None), f"config.json of {shown(teacher.model)}"
    missing = [i for i in recipe.student.from_teacher.layers if n is not None and i >= n]
    if missing:
        raise loaded.error(f"layers {shown(missing)} are not in the teacher: it has {n} layers ({source}), "
                           f"numbered 0..{n - 1}", ("student", "from_teacher", "layers"))


REMOTE_CODE_FLAG = "--trust-remote-code"


def remote_code_notice(loaded: LoadedRecipe) -> Optional[RecipeError]:
    """For a recipe whose teacher asks to run the Python code that comes with the model: the located
    notice (`validate` prints it as a warning; a build without REMOTE_CODE_FLAG refuses with it:
    session.open_session(trust_remote_code=False))."""
    if not loaded.recipe.teacher.trust_remote_code:
        return None
    return loaded.error(f"true runs the Python code that comes with the model, on this machine; build with "
                        f"{REMOTE_CODE_FLAG} if you trust it", ("teacher", "trust_remote_code"))


def load_and_check(path: Path | str, display: str | None = None, device: str = "cpu"):
    """What `validate` checks and what every other command starts from: (LoadedRecipe, the Graph a
    build on `device` runs). `loaded.recipe` is the whole recipe; `.for_device(device)` its view."""
    loaded = load_recipe(path, display)
    return loaded, loaded.graph(device)


__all__ = ["RecipeLoader", "RecipeErrors", "LoadedRecipe", "load_yaml", "load_recipe", "load_and_check",
           "locate", "model_at", "remote_code_notice"]
