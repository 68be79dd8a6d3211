"""Every input of a node checked against the node's own INPUT_TYPES before the node does any work.

ComfyUI compares a widget value with its min / max only on its own queue path, and NaN passes `val < min` and
`val > max`; an API client (possibly remote) or another node's output reaches a node as it is. So every node's
FUNCTION is wrapped by `checked`, which applies one rule per input kind and reports all problems of a call
together, one line each, naming the input and (truncated) value:
- INT: an integer, not a bool, in [min, max] (seeds: [0, 2**64), steps: [1, sampling.MAX_STEPS]);
- FLOAT: a finite real number in [min, max];
- BOOLEAN: True or False;
- STRING: text of at most MAX_TEXT characters that UTF-8 can encode (a lone surrogate would fail later, in a
  tokenizer or a file name);
- a combo: one of its entries, unless the node's VALIDATE_INPUTS takes that input (ComfyUI's own rule: then the
  node checks it, as MPP Load Scene checks its file name) - it must then still be a STRING;
- IMAGE / MASK and the pack's link types (MPP_MODEL, MPP_SCENE, MPP_FILL_MODEL): the node checks them on entry
  (images.check_image / check_mask: dtype, shape, size, finiteness; model.check_model, scene_nodes.check_scene),
  because only the node knows the shapes it needs.
An optional input whose default is None (IMAGE, MASK, MPP_SCENE: not connected) may be None.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import TypeVar

from moviepostproduction.errors import WITHHELD, Problem, ValidationError

MAX_TEXT = 20_000  # characters of a STRING input: a few times T5's 512 tokens; bounds tokenizer and parser work

F = TypeVar("F", bound=Callable)


def _number(value: object, integral: bool) -> bool:
    kind = numbers.Integral if integral else numbers.Real
    return isinstance(value, kind) and not isinstance(value, bool)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def text_problem(name: str, value: object) -> Problem | None:
    """The problem with a STRING input, if any."""
    if not isinstance(value, str):
        return Problem(name, type(value).__name__, "must be a STRING")
    if len(value) > MAX_TEXT:
        return Problem(name, f"{len(value)} characters", f"must be at most {MAX_TEXT} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return Problem(name, value[err.start : err.start + 1], f"has a lone surrogate at character {err.start}")
    return None


def input_problem(name: str, value: object, spec: tuple, node_checks: bool = False) -> Problem | None:
    """The problem with one input under its INPUT_TYPES `spec`, if any; `node_checks`: the node's VALIDATE_INPUTS
    takes this input (a combo is then not held to its entries)."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        if node_checks:
            return text_problem(name, value)
        if isinstance(value, str) and value in kind:
            return None
        return Problem(name, value, f"must be one of {', '.join(map(str, kind[:12]))}")
    low, high = options.get("min", -math.inf), options.get("max", math.inf)
    if kind == "INT" and not (_number(value, integral=True) and low <= value <= high):
        seeds = isinstance(high, int) and high > 2**32 and high & (high + 1) == 0  # shown as [0, 2**64)
        top = f"2**{high.bit_length()})" if seeds else f"{high}]"
        return Problem(name, value, f"must be an integer in [{low}, {top}")
    if kind == "FLOAT" and not (_number(value, integral=False) and _finite(value) and low <= value <= high):
        return Problem(name, value, f"must be a finite number in [{low:g}, {high:g}]")
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return Problem(name, value, "must be true or false")
    if kind == "STRING":
        return text_problem(name, value)
    return None


def checked(function: F) -> F:
    """Wrap a node's FUNCTION so that its inputs are checked (module docstring) before it runs."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def node_function(self, *args, **kwargs):
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as err:  # an input the node does not declare, or a required one missing
            raise ValidationError([Problem(type(self).__name__, WITHHELD, str(err))]) from None
        spec = type(self).INPUT_TYPES()
        declared = {**spec["required"], **spec.get("optional", {})}
        validate = getattr(type(self), "VALIDATE_INPUTS", None)
        own = set(inspect.signature(validate).parameters) if validate is not None else set()
        problems = [
            problem
            for name, value in list(bound.arguments.items())[1:]
            if not (value is None and signature.parameters[name].default is None)  # an optional link left out
            and (problem := input_problem(name, value, declared[name], name in own))
        ]
        if problems:
            raise ValidationError(problems)
        return function(self, *args, **kwargs)

    return node_function  # type: ignore[return-value]
