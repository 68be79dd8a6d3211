"""The contract between the shared trainer and what it trains (compose stages, the toy backbone, toy encoders,
fill LoRA, NanoDiT). A task owns its models, data and losses; the trainer owns the loop, the optimiser, mixed
precision, accumulation, logging, sample grids and checkpoints (DESIGN 5).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from PIL import Image
from torch import nn


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, the value to back-propagate
    logs: dict[str, float] = field(default_factory=dict)  # named parts (e.g. flow, identity, bbox, region)


@runtime_checkable
class TrainTask(Protocol):
    name: str

    def modules(self) -> dict[str, nn.Module]:
        """Every module the task trains or needs on the device, by a stable name (used in checkpoint keys)."""

    def param_groups(self, stage: str) -> list[dict[str, Any]]:
        """Set requires_grad for `stage` and return optimiser param groups ({"params": [...], "lr": ...})."""

    def batches(self, epoch: int, seed: int) -> Iterator[Any]:
        """Deterministic batch order for (epoch, seed): resuming skips exactly the batches already consumed."""

    def loss(self, batch: Any, generator: torch.Generator) -> LossOutput:
        """One micro-batch; all randomness (noise, t, dropout choices) comes from `generator`."""

    def samples(self, generator: torch.Generator) -> Image.Image | None:
        """A picture of what the model does now (a grid), written as PNG every `sample_every` steps."""
