"""FLUX rotary position embedding with an optionally periodic axis, for 360-degree panoramas (DESIGN 7).

Stock FLUX rotates query/key pairs by pos * w_k with w_k = theta^(-2k/d) on each id axis (time, row, col).
On the column axis of a panorama we replace every w_k by the nearest positive integer multiple of 2 pi / W
(W = token columns). Then pos and pos + W get the same rotation, the relative rotation of two tokens depends
on their column difference modulo W only, and attention becomes exactly equivariant to a horizontal roll of
the tokens (the left and right edges are neighbours). Frequencies below pi / W round up to one full turn, so
every channel still encodes the column.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["PeriodicFluxPosEmbed", "axis_frequencies", "periodic_rope"]

WIDTH_AXIS = 2  # FLUX image ids are [0, row, col]


def axis_frequencies(dim: int, theta: float, period: int | None = None) -> torch.Tensor:
    """(dim / 2,) float64 rotation frequencies of one id axis; with `period` P, integer multiples of 2 pi / P."""
    if dim % 2:
        raise ValueError(f"rotary axis dim must be even, got {dim}")
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # FLUX / diffusers frequencies
    if period is None:
        return freqs
    if period < 1:
        raise ValueError(f"rotary period must be >= 1 token, got {period}")
    turn = 2 * math.pi / period
    return torch.round(freqs / turn).clamp(min=1) * turn


class PeriodicFluxPosEmbed(nn.Module):
    """Drop-in for diffusers' `FluxPosEmbed`: ids (S, n_axes) -> (cos, sin) each (S, sum(axes_dim)) float32.

    `period=None` reproduces `FluxPosEmbed` exactly; otherwise axis `axis` (default: columns) is periodic
    with `period` positions. No parameters, so swapping it into a model changes no state dict.
    """

    def __init__(self, theta: float, axes_dim: Sequence[int], period: int | None = None, axis: int = WIDTH_AXIS):
        super().__init__()
        if not 0 <= axis < len(axes_dim):
            raise ValueError(f"periodic axis {axis} outside the {len(axes_dim)} rotary axes")
        self.theta = theta
        self.axes_dim = list(axes_dim)
        self.period = period
        self.axis = axis

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.ndim != 2 or ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids must be (S, {len(self.axes_dim)}), got {tuple(ids.shape)}")
        # float64 on the CPU: exact enough for pos + W == pos, and MPS has no float64 (as diffusers handles).
        pos = ids.detach().to("cpu", torch.float64)
        cos, sin = [], []
        for i, dim in enumerate(self.axes_dim):
            freqs = axis_frequencies(dim, self.theta, self.period if i == self.axis else None)
            angles = pos[:, i, None] * freqs  # (S, dim / 2)
            cos.append(angles.cos().repeat_interleave(2, dim=-1))  # FLUX rotates interleaved pairs
            sin.append(angles.sin().repeat_interleave(2, dim=-1))
        return torch.cat(cos, -1).float().to(ids.device), torch.cat(sin, -1).float().to(ids.device)


@contextlib.contextmanager
def periodic_rope(transformer: nn.Module, period: int, axis: int = WIDTH_AXIS) -> Iterator[PeriodicFluxPosEmbed]:
    """Temporarily replace `transformer.pos_embed` (a diffusers FluxTransformer2DModel's) by a periodic one.

    Both the stock forward and `ConditionedFlux` read `transformer.pos_embed`, so both see it; the original
    module is put back on exit, even after an error.
    """
    original = getattr(transformer, "pos_embed", None)
    if original is None or not hasattr(original, "axes_dim") or not hasattr(original, "theta"):
        raise TypeError(f"{type(transformer).__name__} has no FLUX-style pos_embed (theta, axes_dim) to replace")
    periodic = PeriodicFluxPosEmbed(original.theta, original.axes_dim, period=period, axis=axis)
    transformer.pos_embed = periodic
    try:
        yield periodic
    finally:
        transformer.pos_embed = original
