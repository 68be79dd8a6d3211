"""Building blocks of NanoDiT (DiT, Peebles & Xie 2023, with a cross-attention sublayer per block).

Pure tensor functions (positional / timestep embeddings, modulation) and one `nn.Module` per concept. No
initialisation happens here: `NanoDiT.initialize_weights()` sets every parameter in one visible place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["Attention", "DiTBlock", "FinalLayer", "TimestepEmbedder", "modulate", "sincos_2d", "timestep_embedding"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, D) * (1 + scale) + shift, with shift / scale (B, D) broadcast over tokens."""
    return x * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) -> (N, dim): [sin | cos] at frequencies 1 / 10000^(2i / dim) (Transformer, Vaswani et al.)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(h: int, w: int, dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2-D position embedding (h * w, dim), row-major: half the channels for the row, half for the column.

    Computed per call rather than stored, so one model runs at any token grid (DiT stores it for one size).
    """
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )  # (h, w) each
    emb = torch.cat([_sincos_1d(rows.flatten(), dim // 2), _sincos_1d(cols.flatten(), dim // 2)], dim=1)
    return emb.to(torch.float32)  # (h * w, dim)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) float -> (B, dim) sinusoidal features: [cos | sin], as DiT / FLUX."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([args.cos(), args.sin()], dim=-1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D). t is scaled by 1000 first, as FLUX does, so the frequencies cover the range."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, time_factor: float = 1000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_factor = time_factor
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(t * self.time_factor, self.freq_dim)  # (B, freq_dim)
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))  # (B, D)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise.

    Queries and keys are RMS-normalised per head (as FLUX / SD3) so text, CLS and DINO patch keys of very
    different magnitudes compete on equal terms in one softmax.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, N, D), context (B, M, D), key_mask (B, M) bool, True = attend -> (B, N, D)."""
        context = x if context is None else context
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        # Boolean mask: masked keys get exactly zero weight, so their values cannot leak into the output.
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, M)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Self-attention, cross-attention, MLP; each pre-normed, adaLN-modulated and gated (adaLN-Zero)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm3 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        # shift / scale / gate for each of the three sublayers
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D), context (B, M, D), key_mask (B, M) -> (B, N, D)."""
        mods = self.adaLN_modulation(c).chunk(9, dim=-1)  # 9 x (B, D)
        shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_sa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
        x = x + gate_ca.unsqueeze(1) * self.cross_attn(modulate(self.norm2(x), shift_ca, scale_ca), context, key_mask)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a linear map from D to one patch of velocity (p * p * C)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) -> (B, N, p * p * C)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, D)
        return self.linear(modulate(self.norm(x), shift, scale))
