"""AlphaPredictor (seed 001, module 1): routes each reference between layout (alpha -> 0) and modulation (-> 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moviepostproduction.compose.modules.config import DEPTHS, ConditioningConfig


class AlphaPredictor(nn.Module):
    """[CLIP image embed (C), bbox area (1), depth one-hot (3)] -> MLP -> sigmoid -> alpha (B, R)."""

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.clip_dim + 1 + len(DEPTHS), cfg.alpha_hidden)
        self.fc2 = nn.Linear(cfg.alpha_hidden, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)
        # Zero last layer: alpha == 0.5 for every input at init, so no reference is routed prematurely.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, clip_embeds: torch.Tensor, area: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """clip_embeds (B, R, C), area (B, R), depth (B, R) long index into DEPTHS -> alpha (B, R)."""
        depth_onehot = F.one_hot(depth, len(DEPTHS)).to(clip_embeds.dtype)  # (B, R, 3)
        x = torch.cat([clip_embeds, area[..., None].to(clip_embeds.dtype), depth_onehot], dim=-1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x)))).squeeze(-1)
