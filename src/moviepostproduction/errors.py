"""User-facing errors.

Every error a user can cause by bad input is an `MppError`: its message is one line that names the field
(or path) and the offending value. The CLI prints it and exits with code 2, without a traceback.

Parser and pydantic errors of scene files become one-line `Problem`s with our field paths (`refs[3].bbox`):
pydantic's own text is multi-line and names its internals (`Input should be a valid dictionary or instance of
Reference`); users of a scene file should read the key they wrote and what is expected.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass

import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError


class MppError(Exception):
    """An error caused by the user's input or environment, reported as one line."""


@dataclass(frozen=True)
class Problem:
    """One validation problem: `field` is a path such as `refs[3].bbox`."""

    field: str
    value: object
    message: str

    def __str__(self) -> str:
        return f"{_one_line(self.field)}: {_one_line(self.message)} (got {self.value!r})"


def _one_line(text: str) -> str:
    """Line breaks and other control characters (from a key or a path the user wrote) shown escaped, so that one
    problem is always one line."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))


class ValidationError(MppError):
    """One or more problems in a scene or request; str() gives one line per problem."""

    def __init__(self, problems: list[Problem], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + str(p) for p in self.problems))


class WeightsError(MppError):
    """Missing, truncated, corrupt or unsafe weights; the message names the path and what was expected."""


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
        if kind == "extra_forbidden":
            message = _unknown_key(loc, scene, ref)
        elif kind == "literal_error":
            message = f"must be one of {ctx['expected']}"
        else:
            message = _MESSAGES.get(kind, item["msg"].splitlines()[0])
        problems.append(Problem(field_path(loc), value, message))
    return problems


def syntax_problem(err: json.JSONDecodeError | yaml.YAMLError, text: str) -> Problem:
    """A parse error as a Problem whose field is `line L, column C` and whose value is that line."""
    if isinstance(err, json.JSONDecodeError):
        line, column, message = err.lineno, err.colno, f"invalid JSON: {err.msg}"
    else:
        mark = getattr(err, "problem_mark", None)
        reason = getattr(err, "problem", None) or str(err).splitlines()[0]
        if mark is None:
            return Problem("(file)", None, f"invalid YAML: {reason}")
        line, column, message = mark.line + 1, mark.column + 1, f"invalid YAML: {reason}"
    lines = text.splitlines()
    snippet = lines[line - 1].strip() if 0 < line <= len(lines) else ""
    return Problem(f"line {line}, column {column}", snippet[:80], message)
