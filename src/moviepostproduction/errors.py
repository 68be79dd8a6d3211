"""User-facing errors.

Every error a user can cause by bad input is an `MppError`: its message is one line that names the field
(or path) and the offending value. The CLI prints it and exits with code 2, without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


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
