"""ModulationHead (seed 001 module 4; XVerse-style temb-space offsets, DESIGN 2-3).

A shared MLP turns each instance token into one offset per reference (zero at init); low-rank per-block
projections map it (plus the FeedbackBridge signal) to temb-space offsets: image and text streams for double
blocks, the joint stream for single blocks. A full D x D projection per block would cost 180M+ parameters at
FLUX size; rank 64 keeps the whole head in the tens of millions.
"""

from __future__ import annotations

import torch
from torch import nn

from moviepostproduction.compose.modules.config import ConditioningConfig


class LowRank(nn.Module):
    """x @ down @ up with rank r: (..., in) -> (..., out)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class ModulationHead(nn.Module):
    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        d = cfg.hidden_dim
        self.shared = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.double_blocks = nn.ModuleList(LowRank(d, 2 * d, cfg.modulation_rank) for _ in range(cfg.num_double_blocks))
        self.single_blocks = nn.ModuleList(LowRank(d, d, cfg.modulation_rank) for _ in range(cfg.num_single_blocks))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Zero-init the shared MLP's output: every offset is exactly 0 at init, yet the per-block projections
        # stay non-zero so the zeroed layer receives gradients from the first step.
        nn.init.zeros_(self.shared[2].weight)
        nn.init.zeros_(self.shared[2].bias)

    def shared_offset(self, instance: torch.Tensor) -> torch.Tensor:
        """(B, R, D) -> (B, R, D); timestep-independent, cached per scene."""
        return self.shared(instance)

    def double_offsets(self, block: int, modulation_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, R, D) -> image-stream and text-stream temb offsets, each (B, R, D)."""
        return self.double_blocks[block](modulation_input).chunk(2, dim=-1)

    def single_offsets(self, block: int, modulation_input: torch.Tensor) -> torch.Tensor:
        """(B, R, D) -> joint-stream temb offset (B, R, D)."""
        return self.single_blocks[block](modulation_input)
