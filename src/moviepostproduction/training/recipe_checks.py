"""What a training recipe may hold, checked when it is read (`Recipe.from_file`), before anything loads or caches.

Every bad field is one line naming it: an unknown key (its value withheld: a recipe may be a secrets file named by
mistake), a value whose type is not the field's annotation (`model: 5`, `out: [a]`, `trainer: "x"`,
`trainer.max_steps: "x"`), a count past its documented maximum, a seed outside [0, 2**64), a stage its task does not
have. The file itself is read by `files.read_structured` (size, nesting, YAML aliases and tags, duplicate keys).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from moviepostproduction.compose.modules.config import MAX_REFS
from moviepostproduction.encoders.checks import MAX_TEXT_TOKENS, Check, count, optional
from moviepostproduction.errors import NOTHING, WITHHELD, Problem
from moviepostproduction.files import STORAGE_DTYPES
from moviepostproduction.sampling import is_finite_number, positive_problem, scale_problem, seed_problem
from moviepostproduction.training.cache_key import buckets_problem

TASKS = ("compose", "fill", "vary")
REQUIRED = ("model", "data", "out")
TRAINER_SET = frozenset({"out_dir", "stage", "init_from"})  # TrainConfig fields the recipe sets from its own

# Messages by annotation; other annotations (nested configs, tuples) are left to the dataclass itself.
TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "must be an integer"),
    "float": (is_finite_number, "must be a finite number"),
    "bool": (lambda v: isinstance(v, bool), "must be true or false"),
    "str": (lambda v: isinstance(v, str), "must be a string"),
    "dict": (lambda v: isinstance(v, dict), "must be a mapping"),
}


def _checked(check: Check) -> Callable[[str, object], Problem | None]:
    return lambda name, value: Problem(name, value, message) if (message := check(value)) else None


def _one_of(choices: tuple[str, ...]) -> Callable[[str, object], Problem | None]:
    return _checked(lambda v: None if v in choices else f"expected one of {', '.join(choices)}")


def _path(value: object) -> str | None:
    return None if isinstance(value, str) and value.strip() else "must be a path (a non-empty string)"


def _device_problem(name: str, value: object) -> Problem | None:
    """`cache_device`: auto, cpu, cuda[:N] or mps, usable on this machine (devices.resolve_device's one line)."""
    from moviepostproduction.devices import resolve_device
    from moviepostproduction.errors import ValidationError

    try:
        resolve_device(str(value), name)
    except ValidationError as err:
        return err.problems[0]
    return None


# Checks of the top-level fields beyond their type (which `field_problems` checks first).
VALUES: dict[str, Callable[[str, object], Problem | None]] = {
    **dict.fromkeys(REQUIRED, _checked(_path)),
    **dict.fromkeys(("init_from", "export", "adapter_dir"), _checked(optional(_path))),
    "task": _one_of(TASKS),
    "export_dtype": _one_of(tuple(STORAGE_DTYPES)),
    "backbone_dtype": _one_of(("fp32", "bf16")),
    "ref_guidance": scale_problem,
    "noise_temperature": positive_problem,
    "cache_workers": _checked(lambda v: None if count(1)(v) is None else "must be a positive integer"),
    "cache_device": _device_problem,
    "max_refs": _checked(count(1, MAX_REFS)),
    "max_text_tokens": _checked(count(1, MAX_TEXT_TOKENS)),
    "limit": _checked(optional(count(1))),
    "buckets": buckets_problem,
}
SEEDS = {"trainer": "seed", "fill": "data_seed"}  # the seeds of a section, each in [0, 2**64)
# What a field of the wrong type is told, where saying more than its type helps.
MESSAGES = {
    **{name: f"must be a mapping of {what} fields" for name, what in (
        ("adapter", "ConditioningConfig"), ("trainer", "TrainConfig"), ("compose", "ComposeTaskConfig"),
        ("fill", "FillTaskConfig"), ("vary", "VaryTaskConfig"),
    )},
    **dict.fromkeys(("compose.drop_refs", "compose.drop_caption"), "must be a probability in [0, 1]"),
}  # fmt: skip


def field_problems(cls, values: dict, prefix: str = "", exclude: frozenset = frozenset()) -> list[Problem]:
    """One Problem per key of `values` that is not a field of the dataclass `cls`, or whose value is not of the
    field's annotated type (`int`, `float`, `bool`, `str`, `dict`, each optionally `| None`)."""
    known = {f.name: str(f.type) for f in dataclasses.fields(cls) if f.name not in exclude}
    problems = []
    for key, value in values.items():
        if key not in known:
            listed = f" (known: {', '.join(sorted(known))})" if not prefix else ""
            problems.append(Problem(f"{prefix}{key}", WITHHELD, f"unknown field{listed}"))
            continue
        kinds = [k.strip() for k in known[key].split("|")]
        (kind, *more), nullable = [k for k in kinds if k != "None"], "None" in kinds
        if value is None and nullable or more or kind not in TYPES:
            continue
        ok, message = TYPES[kind]
        if not ok(value):
            message = MESSAGES.get(f"{prefix}{key}", message + (" or null" if nullable else ""))
            problems.append(Problem(f"{prefix}{key}", value, message))
    return problems


def recipe_problems(
    cls, raw: dict, sections: dict[str, type], stages: Callable[[str], tuple[str, ...]]
) -> list[Problem]:
    """Every problem of the top-level mapping of a recipe file (`cls`: Recipe) and of its sections (`sections`:
    name -> the dataclass its keys set), one per field; `stages(task)`: the stages a task trains in."""
    problems = field_problems(cls, raw)
    problems += [Problem(name, NOTHING, "required") for name in REQUIRED if name not in raw]
    for name, check in VALUES.items():
        if name in raw and name not in {p.field for p in problems} and (problem := check(name, raw[name])):
            problems.append(problem)
    for section, config in sections.items():
        if isinstance(values := raw.get(section), dict):  # else absent, or already named by its type
            exclude = TRAINER_SET if section == "trainer" else frozenset()
            problems += field_problems(config, values, f"{section}.", exclude)
            seed = SEEDS.get(section)
            field = f"{section}.{seed}"
            typed = seed in values and field not in {p.field for p in problems}  # then an integer: check its range
            if typed and (problem := seed_problem(field, values[seed])):
                problems.append(problem)
    if not problems and (stage := raw.get("stage", "toy")) not in (known := stages(raw.get("task", "compose"))):
        problems.append(Problem("stage", stage, f"expected one of {', '.join(known)}"))
    if not problems and raw.get("backbone_dtype", "fp32") != "fp32":
        problems += _backbone_dtype_problems(raw)
    return problems


def _backbone_dtype_problems(raw: dict) -> list[Problem]:
    """A bf16 backbone is frozen weights under bf16 autocast: stages 1-3 of a compose recipe only."""
    value, precision = raw["backbone_dtype"], (raw.get("trainer") or {}).get("mixed_precision", "no")
    if raw.get("task", "compose") != "compose" or raw.get("stage", "toy") not in ("1", "2", "3"):
        return [Problem("backbone_dtype", value, "only stages 1-3 of a compose recipe keep the backbone frozen; "
                        "a trained backbone needs fp32 weights")]  # fmt: skip
    if precision != "bf16":
        return [Problem("backbone_dtype", value, f"needs trainer.mixed_precision: bf16, which is {precision!r}")]
    return []
