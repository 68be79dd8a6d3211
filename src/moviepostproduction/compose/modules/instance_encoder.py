"""InstanceEncoder (seed 001, module 2): one token per reference fusing where it goes and what it looks like."""

from __future__ import annotations

import torch
from torch import nn

from moviepostproduction.compose.modules.config import ConditioningConfig
from moviepostproduction.layout import dense_sample_points, fourier_features


def _project(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)


class InstanceEncoder(nn.Module):
    """bbox + (CLIP or DINO) features -> instance token (B, R, D).

    Spatial: DenseSample K x K points, Fourier-embedded, projected to `instance_dim` when needed.
    Visual: CLIP embed -> Linear(C, instance_dim) for alpha < 0.5 (layout refs: semantics suffice), DINO CLS
    (projected only if G != instance_dim) for alpha >= 0.5 (identity refs: DINO keeps structure and texture).
    """

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_proj = _project(cfg.spatial_dim, cfg.instance_dim)
        self.clip_proj = nn.Linear(cfg.clip_dim, cfg.instance_dim)
        self.dino_proj = _project(cfg.dino_dim, cfg.instance_dim)
        self.fuse = nn.Sequential(
            nn.Linear(2 * cfg.instance_dim, cfg.hidden_dim),
            nn.LayerNorm(cfg.hidden_dim),
            nn.SiLU(),
            nn.Linear(cfg.hidden_dim, cfg.hidden_dim),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def spatial(self, bboxes: torch.Tensor) -> torch.Tensor:
        """(B, R, 4) -> (B, R, instance_dim)."""
        points = dense_sample_points(bboxes, self.cfg.dense_k)  # (B, R, K*K, 2)
        return self.spatial_proj(fourier_features(points, self.cfg.fourier_freqs))

    def visual(self, clip_embeds: torch.Tensor, dino_cls: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Route by alpha: (B, R, C), (B, R, G), (B, R) -> (B, R, instance_dim)."""
        use_dino = (alpha >= 0.5)[..., None]
        return torch.where(use_dino, self.dino_proj(dino_cls), self.clip_proj(clip_embeds))

    def forward(
        self, bboxes: torch.Tensor, clip_embeds: torch.Tensor, dino_cls: torch.Tensor, alpha: torch.Tensor
    ) -> torch.Tensor:
        fused = torch.cat([self.spatial(bboxes), self.visual(clip_embeds, dino_cls, alpha)], dim=-1)
        return self.fuse(fused)  # (B, R, D)
