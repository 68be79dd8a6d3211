"""The sampling arguments a model was tuned for (`SamplingDefaults`) and its schedule's bend (`FlowShift`).

Read from a model dir (`ModelDir.sampling_defaults`) or an adapter folder (`adapter_dir.AdapterDir`); every
pipeline resolves an argument left at None through them (docs/sampling.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from moviepostproduction.encoders.checks import MAX_TEXT_TOKENS, Check, count
from moviepostproduction.errors import Problem
from moviepostproduction.sampling import (
    SamplingValueError,
    compute_mu,
    get_timesteps,
    is_probability,
    positive_problem,
    scale_problem,
)


def _checked(check: Check) -> Callable[[str, object], Problem | None]:
    return lambda name, value: Problem(name, value, message) if (message := check(value)) else None


SAMPLING_CHECKS: dict[str, Callable[[str, object], Problem | None]] = {
    "max_text_tokens": _checked(count(1, MAX_TEXT_TOKENS)),  # the bound keeps 10**9 from padding every prompt
    "ref_guidance_scale": scale_problem,
    "noise_temperature": positive_problem,
    "grounding_ratio": _checked(lambda v: None if is_probability(v) else "must be a number in [0, 1]"),
}


@dataclass(frozen=True)
class FlowShift:
    """The "shifted" schedule's bend, from scheduler_config.json as FluxPipeline reads it: mu from the token count
    when `dynamic` (FLUX.1-dev, the built-in, `compute_mu`), else ln(shift) (FLUX.1-schnell: 1, linear)."""

    dynamic: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    shift: float = 1.0

    def mu(self, image_seq_len: int) -> float:
        dynamic = compute_mu(image_seq_len, self.base_seq_len, self.max_seq_len, self.base_shift, self.max_shift)
        return dynamic if self.dynamic else math.log(self.shift)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FlowShift:
        keys = dict(dynamic="use_dynamic_shifting", base_seq_len="base_image_seq_len", max_seq_len="max_image_seq_len")
        keys.update(shift="shift" if config.get("use_dynamic_shifting") is False else "")  # unused when dynamic
        return cls(**{f.name: config[k] for f in fields(cls) if (k := keys.get(f.name, f.name)) in config})


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling arguments a model was tuned for; every pipeline uses them for an argument left at None.

    Precedence (docs/sampling.md): an explicit argument > the model dir (`ModelDir.sampling_defaults`) > these
    built-in values, which sample as FLUX does. A bad value raises at construction, naming the field.
    """

    max_text_tokens: int = 512  # T5 length the transformer was trained with (FLUX.1-dev: 512)
    ref_guidance_scale: float = 1.0  # reference guidance v_caption + s (v_scene - v_caption); 1 = off
    noise_temperature: float = 1.0  # factor on the starting noise; 1 = the noise as drawn
    grounding_ratio: float = 0.3  # fraction of the steps with Assemble-Attn (ConditioningConfig's default)
    flow_shift: FlowShift = FlowShift()  # the shifted schedule's bend (scheduler/scheduler_config.json)

    def __post_init__(self) -> None:
        checked = [f for f in fields(self) if f.name in SAMPLING_CHECKS]
        problems = [p for f in checked if (p := SAMPLING_CHECKS[f.name](f.name, getattr(self, f.name)))]
        if problems:
            raise SamplingValueError(problems)

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> SamplingDefaults:
        """The built-in values with the layout window of `model.adapter`, if it has one: for a pipeline built from
        modules in memory rather than from a model dir."""
        adapter = getattr(model, "adapter", None)
        return cls() if adapter is None else cls(grounding_ratio=adapter.cfg.grounding_ratio)

    def timesteps(self, num_steps: int, image_seq_len: int, schedule: str = "shifted") -> torch.Tensor:
        mu = self.flow_shift.mu(image_seq_len) if schedule == "shifted" else None  # the model's bend of "shifted"
        return get_timesteps(num_steps, image_seq_len=image_seq_len, schedule=schedule, mu=mu)

    def resolve(
        self,
        *,
        max_text_tokens: int | None = None,
        ref_guidance_scale: float | None = None,
        noise_temperature: float | None = None,
    ) -> SamplingDefaults:
        """These defaults with each argument that is not None in its place; a bad one is a `SamplingValueError`
        naming it (`noise_temperature: must be a positive number (got -2.0)`)."""
        given = dict(max_text_tokens=max_text_tokens, ref_guidance_scale=ref_guidance_scale)
        given.update(noise_temperature=noise_temperature)
        return replace(self, **{name: value for name, value in given.items() if value is not None})
