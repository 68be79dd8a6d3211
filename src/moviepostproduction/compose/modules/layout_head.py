"""LayoutHead and AssembleAttention (seed 001 module 3; InstanceAssemble-style Assemble-Attn, DESIGN 3).

The single-K/V-token attention of the seed is degenerate (softmax over one key is constant), so, as in
InstanceAssemble, each reference attends jointly with the image tokens inside its box: the block's *own*
attention runs on the short sequence [layout token ; tokens in box]. Unlike a Python loop over instances, all
(sample, ref) groups run in one padded, masked attention call.
"""

from __future__ import annotations

import torch
from torch import nn

from moviepostproduction.compose.modules.box_patches import BoxPatchEncoding
from moviepostproduction.compose.modules.box_position import BoxPositionEncoding
from moviepostproduction.compose.modules.config import ConditioningConfig


class LayoutHead(nn.Module):
    """instance token (B, R, D) -> layout token (B, R, D), scaled by (1 - alpha). Identity at init."""

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.eye_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, instance: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return self.proj(instance) * (1.0 - alpha)[..., None]


class AssembleAttention(nn.Module):
    """Per layout block: the zero-init output projection of the Assemble-Attn branch, and its zero-init
    `BoxPositionEncoding` (when `cfg.box_position_freqs > 0`) and `BoxPatchEncoding` (when `cfg.box_patch_rank > 0`).

    The attention itself is the FLUX block's own (its projections, qk-norms, and LoRA if any); see
    `compose.assemble.assemble_residual`. Zero init keeps the branch silent until it is trained.
    """

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.out = nn.Linear(cfg.hidden_dim, cfg.hidden_dim)
        self.position = BoxPositionEncoding(cfg) if cfg.box_position_freqs > 0 else None
        self.patches = BoxPatchEncoding(cfg) if cfg.box_patch_rank > 0 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, attended: torch.Tensor) -> torch.Tensor:
        return self.out(attended)
