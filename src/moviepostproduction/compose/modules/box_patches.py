"""BoxPatchEncoding: the reference's DINO patch tokens laid into its box, for the Assemble-Attn branch (design note).

The layout token carries one vector per reference (CLIP / DINO CLS): *what* the sprite is, not *where its outline
runs*. DINO's patch tokens do carry that, patch by patch. This module maps each image token in a box to the patch
features of the reference at the token's place in the box: the reference's patch grid is stretched over the box,
and each token reads it at the centres of its 2 x 2 quarters (the four latent pixels a FLUX token packs), so the
features also say how the outline runs *inside* the token. The four samples, concatenated, give a residual added to
the branch's output for that token:

    out = W_out SiLU(W_p [p(q_1) ; p(q_2) ; p(q_3) ; p(q_4)])

p = bilinear interpolation of the (s, s) patch grid, q_k = the quarter centres in the box frame. W_out is
zero-initialised, so the branch (and DESIGN 3's invariants) are unchanged until it trains. Linear maps commute with
bilinear interpolation, so W_p runs once per patch (not per token) before the grid is sampled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moviepostproduction.compose.modules.config import ConditioningConfig

QUARTERS = ((-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25))  # token-size offsets, FLUX's 2 x 2 order


def patch_side(num_patches: int) -> int:
    """s for an (s, s) grid of `num_patches` tokens; a ValueError for a non-square count."""
    side = math.isqrt(num_patches)
    if side * side != num_patches or side == 0:
        raise ValueError(f"{num_patches} DINO patch tokens are not a square grid")
    return side


def sample_grid(grid: torch.Tensor, index: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear reads of per-reference feature grids.

    grid (R, s, s, C) row-major (row = v); index (S,) which grid each point reads; points (S, 2) as (u, v) in the
    box frame, (0, 0) the grid's top-left corner and (1, 1) its bottom-right. Patch centres sit at (i + 0.5) / s;
    points beyond the outermost centres take the border value (align_corners=False, border padding). Returns (S, C).
    """
    s = grid.shape[1]
    pos = (points.to(grid.dtype) * s - 0.5).clamp(0, s - 1)  # (S, 2) in patch units
    lo = pos.floor().long().clamp(max=s - 1)
    hi = (lo + 1).clamp(max=s - 1)
    frac = pos - lo.to(pos.dtype)  # (S, 2)
    flat = grid.reshape(-1, grid.shape[-1])  # (R * s * s, C)
    base = index * (s * s)

    def at(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, base + row * s + col)

    fu, fv = frac[:, :1], frac[:, 1:]
    top = at(lo[:, 0], lo[:, 1]) * (1 - fu) + at(hi[:, 0], lo[:, 1]) * fu
    bottom = at(lo[:, 0], hi[:, 1]) * (1 - fu) + at(hi[:, 0], hi[:, 1]) * fu
    return top * (1 - fv) + bottom * fv


class BoxPatchEncoding(nn.Module):
    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        rank = cfg.box_patch_rank
        self.patches = nn.Linear(len(QUARTERS) * cfg.dino_dim, rank)
        self.out = nn.Linear(rank, cfg.hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.patches.weight)
        nn.init.zeros_(self.patches.bias)
        nn.init.zeros_(self.out.weight)  # exactly zero output at init, gradient reaches `out` from step 0
        nn.init.zeros_(self.out.bias)

    def forward(
        self, patches: torch.Tensor, extent: torch.Tensor, coords: torch.Tensor, group: torch.Tensor
    ) -> torch.Tensor:
        """patches (G, P, dino_dim) each group's reference patch tokens; extent (G, 2) one token's size in its box's
        frame; coords (S, 2) box-frame centres of S (group, token) slots; group (S,) their group. Returns (S, D)."""
        k = len(QUARTERS)
        s = patch_side(patches.shape[1])
        weight = self.patches.weight.view(-1, k, patches.shape[2])  # (rank, 4, C): one block per quarter
        projected = torch.einsum("gpc,rkc->gkpr", patches.to(weight.dtype), weight)  # (G, 4, P, rank)
        grids = rearrange(projected, "g k (y x) r -> (g k) y x r", y=s)  # one grid per (group, quarter)
        size = extent.to(weight.dtype).index_select(0, group)  # (S, 2)
        offsets = size.new_tensor(QUARTERS)  # (4, 2)
        points = coords.to(weight.dtype)[:, None] + size[:, None] * offsets  # (S, 4, 2)
        index = group[:, None] * k + torch.arange(k, device=group.device)  # (S, 4): quarter q reads grid g * 4 + q
        reads = sample_grid(grids, index.flatten(), points.flatten(0, 1)).view(-1, k, weight.shape[0])  # (S, 4, rank)
        return self.out(F.silu(self.patches.bias + reads.sum(1)))
