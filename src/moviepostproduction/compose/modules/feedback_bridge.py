"""FeedbackBridge (DESIGN 2): what double block b made of a foreground ref's region steers its modulation at b+1."""

from __future__ import annotations

import torch
from torch import nn

from moviepostproduction.compose.modules.config import ConditioningConfig


class FeedbackBridge(nn.Module):
    """Per double block b < L-1: mean-pool image tokens in each box -> low-rank zero-init projection -> (B, R, D).

    Only foreground refs (alpha >= 0.5) get feedback; the output is exactly zero at init.
    """

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        d, r = cfg.hidden_dim, cfg.feedback_rank
        n = max(cfg.num_double_blocks - 1, 0)
        self.down = nn.ModuleList(nn.Linear(d, r, bias=False) for _ in range(n))
        self.up = nn.ModuleList(nn.Linear(r, d, bias=False) for _ in range(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for down, up in zip(self.down, self.up, strict=True):
            nn.init.xavier_uniform_(down.weight)
            nn.init.zeros_(up.weight)

    def forward(
        self, block: int, hidden: torch.Tensor, pool_weights: torch.Tensor, foreground: torch.Tensor
    ) -> torch.Tensor:
        """hidden (B, N, D), pool_weights (B, R, N) rows summing to 1 inside each box, foreground (B, R) bool."""
        pooled = torch.bmm(pool_weights.to(hidden.dtype), hidden)  # (B, R, D)
        return self.up[block](self.down[block](pooled)) * foreground[..., None].to(hidden.dtype)
