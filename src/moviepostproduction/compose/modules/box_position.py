"""BoxPositionEncoding: where an image token sits inside its box, for the Assemble-Attn branch (design note).

Assemble-Attn tells the tokens of a box *which* reference they hold (the layout token) but not *which part* of
it: RoPE gives positions relative to other tokens, never to the box. Small sprites span two or three tokens, so
each token must draw its own quarter of the shape, and that needs its place in the box. This module maps a
token's box-frame centre (u, v) (`layout.box_token_coords`, (0, 0) top-left, (1, 1) bottom-right at any box size)
and its group's layout token to a residual added to the branch's output for that token:

    out = W_out SiLU(W_c fourier(u, v) + W_t layout_token)

W_out is zero-initialised, so the branch (and DESIGN 3's invariants) are unchanged until it trains. Adding it measured
no gain on the toy world (experiments/README.md), but the shipped toy model was trained on with it and relies on it:
zeroing its weights changes that model's images, so it stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moviepostproduction.compose.modules.config import ConditioningConfig
from moviepostproduction.layout import fourier_features


class BoxPositionEncoding(nn.Module):
    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.freqs = cfg.box_position_freqs
        rank = cfg.box_position_rank
        self.coords = nn.Linear(2 * 2 * self.freqs, rank)
        self.token = nn.Linear(cfg.hidden_dim, rank, bias=False)
        self.out = nn.Linear(rank, cfg.hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in (self.coords, self.token, self.out):
            nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(self.coords.bias)
        nn.init.zeros_(self.out.weight)  # exactly zero output at init, gradient reaches `out` from step 0
        nn.init.zeros_(self.out.bias)

    def forward(self, coords: torch.Tensor, group: torch.Tensor, layout_tokens: torch.Tensor) -> torch.Tensor:
        """coords (S, 2) box-frame centres of S (group, token) slots; group (S,) their group; layout_tokens (G, D).

        Returns (S, D). The layout tokens are projected once per group, not once per slot.
        """
        features = fourier_features(coords[:, None].to(self.coords.weight.dtype), self.freqs)  # (S, 4F)
        hidden = self.coords(features) + self.token(layout_tokens).index_select(0, group)  # (S, rank)
        return self.out(F.silu(hidden))
