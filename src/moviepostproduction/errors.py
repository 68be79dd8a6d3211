"""User-facing errors.

Every error a user can cause by bad input is an `MppError`: its message is one line that names the field
(or path) and the offending value. The CLI prints it and exits with code 2, without a traceback.

Parser and pydantic errors of scene files become one-line `Problem`s with our field paths (`refs[3].bbox`):
pydantic's own text is multi-line and names its internals (`Input should be a valid dictionary or instance of
Reference`); users of a scene file should read the key they wrote and what is expected.
`parse_structured` reads JSON / YAML text as plain data within bounds (nesting, values with YAML aliases counted
in full, integer digits; no YAML tag, no key twice, no lone surrogate), each refusal one `Problem`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import reprlib
from dataclasses import dataclass

import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError


class MppError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


# At most this many characters of a value the user gave are shown (a secret in a file read by mistake shows
# only its head); fields and messages, which may embed a key or a path the user wrote, are capped too.
SHOWN_VALUE = 40
SHOWN_PATH = 200
SHOWN_FIELD = 80
SHOWN_MESSAGE = 500


class _Withheld:
    """The value of a Problem that must not be shown (an unknown key's value: it may be anything, a password
    included); its line then ends without `(got ...)`."""

    def __repr__(self) -> str:
        return "withheld"


WITHHELD = _Withheld()


@dataclass(frozen=True)
class Problem:
    """One validation problem: `field` is a path such as `refs[3].bbox`."""

    field: str
    value: object
    message: str

    def __str__(self) -> str:
        line = f"{one_line(self.field, SHOWN_FIELD)}: {one_line(self.message, SHOWN_MESSAGE)}"
        return line if self.value is WITHHELD else f"{line} (got {shown(self.value)})"


class _HeadRepr(reprlib.Repr):
    """reprlib's bounded repr (a few entries per level, a few levels: constant work for huge or aliased data),
    but a string shows its head only, never its end."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 4, 4
        self.maxstring = self.maxother = self.maxlong = SHOWN_VALUE + 1

    def repr_str(self, x: str, level: int) -> str:
        return repr(x[: self.maxstring])

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an int past 4300 digits raises, and is quadratic below that
        return repr(x) if x.bit_length() <= 128 else f"<an integer of {x.bit_length()} bits>"


_REPR = _HeadRepr()


def shown(value: object) -> str:
    """`value` as a message shows it: its repr on one line, at most SHOWN_VALUE characters (`...` marks a cut); a
    path (a Path object: a name the user gave to find a file) as its quoted string, up to SHOWN_PATH."""
    if isinstance(value, os.PathLike):
        return one_line(repr(os.fsdecode(value)), SHOWN_PATH)
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails must not hide the problem being reported
        text = f"<{type(value).__name__}>"
    return one_line(text, SHOWN_VALUE)


def one_line(text: object, limit: int | None = None) -> str:
    """Line breaks and other control characters (from a key or a path the user wrote) shown escaped, so that one
    problem is always one line; cut to `limit` characters, `...` marking the cut."""
    line = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    return line if limit is None or len(line) <= limit else line[: limit - 3] + "..."


class ValidationError(MppError):
    """One or more problems in a scene or request; str() gives one line per problem."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        prefix = f"{one_line(source, SHOWN_MESSAGE)}: " if source else ""
        super().__init__("\n".join(prefix + str(p) for p in self.problems))


class WeightsError(MppError):
    """Missing, truncated, corrupt or unsafe weights; the message names the path and what was expected."""


class FileProblem(MppError):
    """A file a user named, refused before (or instead of) being read (`files.open_regular`): `{path}: {reason}`."""

    def __init__(self, path: object, reason: str):
        self.path, self.reason, self.missing = str(path), reason, reason == "not found"
        super().__init__(f"{shown_path(path)}: {reason}")


def shown_path(path: object) -> str:
    """A path as a message shows it: one line, at most 200 characters."""
    return one_line(str(path), SHOWN_PATH)


# ------------------------------------------------------------------------- scene-file parser errors
# Messages for pydantic's built-in error types; anything else falls back to pydantic's one-line `msg`.
_MESSAGES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping of keys to values",
    "missing": "required key is missing",
}


class _Nothing:
    """Shown as the value of a missing key: `(got nothing)`."""

    def __repr__(self) -> str:
        return "nothing"


NOTHING = _Nothing()


def field_path(loc: tuple[int | str, ...]) -> str:
    """('refs', 3, 'bbox') -> 'refs[3].bbox'; the empty location is the whole scene."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _unknown_key(loc: tuple[int | str, ...], scene: type[BaseModel], ref: type[BaseModel]) -> str:
    model = ref if len(loc) > 1 and loc[0] == "refs" else scene
    known = sorted(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed: {', '.join(known)})"


def problems_from_pydantic(err: PydanticValidationError, scene: type[BaseModel], ref: type[BaseModel]) -> list[Problem]:
    """One `Problem` per pydantic error, in the order pydantic found them."""
    problems = []
    for item in err.errors(include_url=False):
        loc, kind, ctx = item["loc"], item["type"], item.get("ctx") or {}
        value = ctx.get("shown", item.get("input"))
        if kind == "missing":
            value = NOTHING
        if kind == "extra_forbidden":  # the key is named; its value (a password in a credentials file?) is not
            message, value = _unknown_key(loc, scene, ref), WITHHELD
        elif kind == "literal_error":
            message = f"must be one of {ctx['expected']}"
        else:
            message = _MESSAGES.get(kind, item["msg"].splitlines()[0])
        problems.append(Problem(field_path(loc), value, message))
    return problems


def syntax_problem(err: json.JSONDecodeError | yaml.YAMLError, text: str) -> Problem:
    """A parse error as a Problem whose field is `line L, column C` and whose value is that line."""
    if isinstance(err, json.JSONDecodeError):
        return located_problem(text, err.pos, f"invalid JSON: {err.msg}")
    if isinstance(err, yaml.reader.ReaderError):  # a control character: its offset is known, not its line
        return located_problem(text, err.position, f"invalid YAML: {str(err).splitlines()[0]}")
    mark = getattr(err, "problem_mark", None)
    reason = "; ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None))))
    reason = reason or str(err).splitlines()[0]
    if mark is None:
        return Problem("(file)", None, f"invalid YAML: {reason}")
    return located_problem(text, mark.index, reason if isinstance(err, _Refused) else f"invalid YAML: {reason}")


def located_problem(text: str, offset: int, message: str) -> Problem:
    """A Problem at character `offset` of `text`: its field is `line L, column C` and its value that line."""
    start, end = text.rfind("\n", 0, offset) + 1, text.find("\n", offset)
    line = text[start : end if end >= 0 else None].strip()
    return Problem(f"line {text.count(chr(10), 0, offset) + 1}, column {offset - start + 1}", line, message)


# ------------------------------------------------------------------ structured text (JSON / YAML) to plain data
# Bounds on a scene file or a recipe, checked before anything walks its data (pydantic, repr and json.dumps
# recurse; a YAML alias bomb of a few hundred bytes names 10^9 values).
MAX_DEPTH = 64
MAX_VALUES = 100_000  # in all, each alias counted at its full size (a scene with 50 refs holds ~600)
INT_DIGITS = 4300  # Python's own limit on int <-> str conversion
_INT_BOUND = 10**INT_DIGITS
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Refused(yaml.MarkedYAMLError):
    """A YAML document over a bound of `_BoundedLoader`; `problem` is the whole message."""


class _Flagged:
    """A JSON number or object refused where it was parsed; `data_problem` reports it with its field path."""

    def __init__(self, key: str, value: object, message: str):
        self.key, self.value, self.message = key, value, message


def _json_pairs(pairs: list[tuple[str, object]]) -> dict | _Flagged:
    data, seen = dict(pairs), set()
    if len(data) < len(pairs):
        return _Flagged(next(k for k, _ in pairs if k in seen or seen.add(k)), WITHHELD, "duplicate key")
    return data


def _json_int(text: str) -> int | _Flagged:
    digits = len(text.lstrip("-"))
    return int(text) if digits <= INT_DIGITS else _Flagged("", text, f"integer of more than {INT_DIGITS} digits")


def _json_float(text: str) -> float | _Flagged:
    value = float(text)
    return _Flagged("", text, "number too large for a float") if math.isinf(value) else value


def _json_too_deep(text: str, max_depth: int) -> int | None:
    """Offset of the first `[` / `{` nested deeper than `max_depth`, strings skipped (before json.loads recurses)."""
    depth, in_string, escaped = 0, False, -1
    for match in re.finditer(r'[\\"\[\]{}]', text) if text.count("[") + text.count("{") > max_depth else ():
        at, ch = match.start(), match.group()
        if at == escaped:
            continue
        if in_string:
            escaped, in_string = (at + 1, True) if ch == "\\" else (escaped, ch != '"')
        elif ch == '"':
            in_string = True
        elif (depth := depth + (ch in "[{") - (ch in "]}")) > max_depth:
            return at
    return None


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader bounded as it composes, before any value is built: no tag at all (`!!python/...`, even
    `!!str`), nesting and values (each alias counted at the size of what it names, so an alias bomb stops at
    `max_values`) bounded, no alias inside what it names, no key twice, no integer past INT_DIGITS, no float literal
    that overflows (`.inf` itself is left for validation to name its field). Dates stay strings."""

    def __init__(self, text: str, max_depth: int, max_values: int):
        super().__init__(text)
        self.max_depth, self.max_values, self.depth, self.values = max_depth, max_values, 0, 0
        self.sizes: dict[int, int] = {}  # id(anchored node) -> its size in values, aliases expanded

    def _refuse(self, message: str, mark: yaml.Mark) -> None:
        raise _Refused(problem=message, problem_mark=mark)

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self.values += n
        if self.values > self.max_values:
            self._refuse(f"more than {self.max_values} values, each alias counted in full (an alias bomb?)", mark)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            target = self.anchors.get(event.anchor)
            if target is not None and id(target) not in self.sizes:
                self._refuse(f"alias *{event.anchor} inside the value it names", event.start_mark)
            self._count(self.sizes[id(target)] if target is not None else 0, event.start_mark)
            return super().compose_node(parent, index)
        if event.tag is not None:
            self._refuse(f"YAML tags are not allowed ({event.tag})", event.start_mark)
        nested = isinstance(event, yaml.CollectionStartEvent)
        if (depth := self.depth + nested) > self.max_depth:
            self._refuse(f"nested more than {self.max_depth} levels deep", event.start_mark)
        before, self.depth = self.values, depth
        self._count(1, event.start_mark)
        node = super().compose_node(parent, index)
        self.depth -= nested
        if event.anchor is not None:
            self.sizes[id(node)] = self.values - before
        return node

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)
        first: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if (key := self.construct_object(key_node)) in first:
                    line = first[key].start_mark.line + 1
                    self._refuse(f"duplicate key {shown(key)} (first on line {line})", key_node.start_mark)
                first[key] = key_node
        return node

    def construct_yaml_int(self, node):
        digits = len(node.value.lstrip("+-").replace("_", ""))  # int() refuses more; hex / octal / 1:2:3 too big
        if digits > INT_DIGITS or abs(value := super().construct_yaml_int(node)) >= _INT_BOUND:
            self._refuse(f"integer of more than {INT_DIGITS} digits", node.start_mark)
        return value

    def construct_yaml_float(self, node):
        if math.isinf(value := super().construct_yaml_float(node)) and "inf" not in node.value.lower():
            self._refuse("number too large for a float", node.start_mark)
        return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)
_BoundedLoader.yaml_implicit_resolvers = {  # `2024-01-01` and `=` stay strings: plain data only
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":timestamp", ":value"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_structured(
    text: str, fmt: str, source: str | None = None, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES
) -> object:
    """JSON (`fmt` "json") or YAML text as plain data (dict, list, str, int, float, bool, None), else a
    ValidationError of one line naming `source` and the line and column or the field: a syntax error, a bound of
    `_BoundedLoader` (JSON: the same bounds; NaN / Infinity are left for validation), a lone UTF-16 surrogate."""
    problem = None
    try:
        if fmt == "json" and (at := _json_too_deep(text, max_depth)) is not None:
            problem = located_problem(text, at, f"nested more than {max_depth} levels deep")
        elif fmt == "json":
            data = json.loads(text, object_pairs_hook=_json_pairs, parse_int=_json_int, parse_float=_json_float)
        else:
            loader = _BoundedLoader(text, max_depth, max_values)
            try:
                data = loader.get_single_data()
            finally:
                loader.dispose()
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        problem = syntax_problem(err, text)
    if problem is None and (problem := data_problem(data, max_depth=max_depth, max_values=max_values)) is None:
        return data
    raise ValidationError([problem], source=source)


def data_problem(data: object, *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Problem | None:
    """The first problem of plain data in document order, named by its field path: nesting deeper than `max_depth`
    (a cycle too), more than `max_values` values (shared ones counted each time), an integer past INT_DIGITS digits,
    a lone UTF-16 surrogate in a string or a key, what JSON parsing flagged. Walked with a stack (no recursion) that
    stops after `max_values` values."""
    stack: list[tuple[tuple, object, int]] = [((), data, 0)]
    for count in range(1, max_values + 2):
        if not stack:
            return None
        loc, node, depth = stack.pop()
        text = node if isinstance(node, str) else None
        if isinstance(node, dict):
            text = next((k for k in node if isinstance(k, str) and _SURROGATE.search(k)), None)
        if count > max_values:
            return Problem(field_path(loc), WITHHELD, f"more than {max_values} values in all")
        if text is not None and (found := _SURROGATE.search(text)):
            where = "a key has" if isinstance(node, dict) else "has"
            return Problem(field_path(loc), text, f"{where} a lone UTF-16 surrogate at character {found.start()}")
        if isinstance(node, _Flagged):
            return Problem(field_path((*loc, node.key) if node.key else loc), node.value, node.message)
        if isinstance(node, int) and abs(node) >= _INT_BOUND:
            return Problem(field_path(loc), node, f"integer of more than {INT_DIGITS} digits")
        if isinstance(node, dict | list | tuple) and depth >= max_depth:
            return Problem(field_path(loc), WITHHELD, f"nested more than {max_depth} levels deep")
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list | tuple) else ()
        stack.extend(((*loc, key), value, depth + 1) for key, value in reversed(list(items)))
    return None
