"""The sampling widgets every FLUX sampler node (compose, panorama, fill) shares, as `--ref-guidance` and
`--noise-temperature` on the CLI: left at -1 they take the loaded model dir's value (docs/sampling.md)."""

from __future__ import annotations

MODEL_DEFAULT = -1.0  # a sampling widget left at this value takes the model dir's default (docs/sampling.md)


def _model_default(tooltip: str, maximum: float, step: float) -> tuple[str, dict]:
    options = {"default": MODEL_DEFAULT, "min": MODEL_DEFAULT, "max": maximum, "step": step}
    return ("FLOAT", {**options, "tooltip": f"{tooltip}; -1: the model dir's default."})


# Optional inputs of every FLUX sampler node (compose, panorama, fill), as `--ref-guidance` / `--noise-temperature`.
SAMPLING_DEFAULTS = {
    "ref_guidance": _model_default("Reference guidance, 1 = off", 20.0, 0.1),
    "noise_temperature": _model_default("Factor on the starting noise, 1 = as drawn", 2.0, 0.05),
}


def or_model_default(value: float) -> float | None:
    """None (the pipeline then takes the model dir's value) for a widget at MODEL_DEFAULT, else the value as given:
    any other value, valid or not, goes to the pipeline, which names a bad one."""
    return None if value == MODEL_DEFAULT else value
