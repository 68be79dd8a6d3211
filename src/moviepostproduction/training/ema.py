"""Exponential moving average of the trained parameters (TrainConfig.ema_decay; off at 0).

After optimiser step s the average moves towards the weights: ema <- ema + (1 - d_s) (w - ema), with
d_s = min(decay, s / (s + 9)), the usual warm-up that lets an average started at step 1 forget its starting
point quickly (d_1 = 0.1, d_91 = 0.9, then capped by `decay`). d_s is a pure function of the step, so a resumed
run, whose checkpoint stores the average (`ema.safetensors`), continues it exactly.

The average is kept in float32 whatever the parameters' dtype. Samples written during training and the weights a
run ends with (what recipes export) are the average's; the checkpoints keep the raw weights beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from moviepostproduction.training.checkpoints import copy_named_tensors


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used after optimiser step `step` (1-based)."""
    return min(decay, step / (step + 9))


class EmaWeights:
    """A float32 shadow of named parameters, updated after every optimiser step."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    @classmethod
    def restored(cls, params: Mapping[str, torch.Tensor], decay: float, state: Mapping[str, torch.Tensor], where):
        """The average a checkpoint stored for exactly these parameters (names and shapes must match)."""
        ema = cls(params, decay)
        copy_named_tensors(ema.shadow, state, where, "EMA")
        return ema

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        weight = 1.0 - ema_decay_at(self.decay, step)
        for name, value in self.shadow.items():
            value.lerp_(params[name].detach().float(), weight)

    def copy_to(self, params: Mapping[str, torch.Tensor]) -> None:
        copy_named_tensors(params, self.shadow, "the EMA", "EMA")

    @contextmanager
    def applied(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """The parameters hold the average inside the block and their own values again after it."""
        saved = {name: p.detach().clone() for name, p in params.items()}
        self.copy_to(params)
        try:
            yield
        finally:
            copy_named_tensors(params, saved, "the saved weights", "saved")
