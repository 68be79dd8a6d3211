"""SemanticCrossAttention (seed 004, DESIGN 7): packed latent tokens attend to the VAE tokens of a semantic map.

x + gate * Out(MHA(Q(LN(x) + P(x_pos)), K(LN(s) + P(s_pos)), V(LN(s)))), gate a zero-init scalar, so the module is
exactly the identity at init and the stock FLUX-Fill path is untouched until it learns (seed: "scale initialised
to 0"). The token counts of x and s may differ (a diptych attends to one semantic panel).

Locality (our addition, `locality` > 0, off by default): a fixed Gaussian bias -d^2 / (2 w^2) on the attention
logits, d the panel-local distance between a latent token and a map token. With it each latent token reads the map
around its own place from step 0; without it the attention starts near uniform (q/k random), the residual is
then nearly the same offset everywhere (it says which classes the map holds, not where), and training did not
make it local (docs/fill.md, "Why the map was not used").

Where the residual goes (`residual_on`, read by FillFlux): "latent", the seed's place, adds it to the noisy latent,
where it competes with the noise (unit variance in every channel) and early in sampling is drowned by it;
"condition" (our addition) adds it to the masked-image latent of the FLUX-Fill condition instead, which is noise
free (in the hole and on a diptych's generated panel it is the constant latent of grey), so the map arrives clean
at every step. The queries are then those condition tokens.

Position features P (our addition, on by default; `positional=False` gives the seed's form): without them the
attention is blind to *where* a semantic colour sits (softmax attention is invariant to permuting its keys), so the
map could only say *which* classes are present. P is a fixed Fourier embedding of panel-local normalised (y, x)
added to the normalised queries and keys only: q.k then contains a term that peaks when the two positions agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ["SemanticAttentionConfig", "SemanticCrossAttention", "SemanticTokens", "fourier_positions", "grid_positions"]


RESIDUAL_ON = ("latent", "condition")


@dataclass(frozen=True)
class SemanticAttentionConfig:
    dim: int = 64  # packed latent channels of the query tokens (4 x 16 on FLUX)
    context_dim: int = 64  # packed VAE channels of the semantic-map tokens
    heads: int = 8
    positional: bool = True
    eps: float = 1e-6
    locality: float = 0.0  # width (panel units) of a Gaussian distance bias on the attention logits; 0: none
    residual_on: str = "latent"  # FillFlux adds the residual to the noisy latent (seed) or to the masked-image latent

    def __post_init__(self) -> None:
        if self.dim < 1 or self.context_dim < 1 or self.heads < 1 or self.dim % self.heads:
            raise ValueError(
                f"SemanticAttentionConfig: dim={self.dim} must be a positive multiple of "
                f"heads={self.heads}, context_dim={self.context_dim} positive"
            )
        if self.residual_on not in RESIDUAL_ON:
            raise ValueError(f"SemanticAttentionConfig: residual_on={self.residual_on!r} is not one of {RESIDUAL_ON}")
        if not (math.isfinite(self.locality) and self.locality >= 0):
            raise ValueError(f"SemanticAttentionConfig: locality={self.locality} must be a finite number >= 0")


@dataclass
class SemanticTokens:
    """The semantic map as tokens, computed once per image (never per step)."""

    tokens: torch.Tensor  # (B, M, Cs) packed VAE latents of the semantic map
    positions: torch.Tensor | None = None  # (M, 2) panel-local normalised (y, x) token centres
    mask: torch.Tensor | None = None  # (B, M) bool, True on real tokens (padding for batches of unequal maps)


def grid_positions(h: int, w: int, panels: int = 1, device=None) -> torch.Tensor:
    """(h * w, 2) normalised (y, x) centres of a row-major token grid cut into `panels` side-by-side panels;
    x is local to its panel, so a diptych's context and target tokens share the coordinates of one panel."""
    if w % panels:
        raise ValueError(f"grid width {w} is not divisible into {panels} panels")
    pw = w // panels
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = ((torch.arange(w, device=device) % pw).float() + 0.5) / pw
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # (h, w, 2)
    return rearrange(grid, "h w c -> (h w) c")


def fourier_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(M, 2) in [0, 1] -> (M, dim): sin / cos of pi k y and pi k x for k = 1 .. dim // 4 (zero-padded to dim).

    sum_k cos(pi k d) is a Dirichlet kernel: the inner product of two embeddings peaks at distance d = 0 with a
    width of about 1 / (dim // 4) of the panel.
    """
    k = torch.arange(1, dim // 4 + 1, device=positions.device, dtype=torch.float32) * math.pi  # (K,)
    angles = positions.float()[:, :, None] * k  # (M, 2, K)
    feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)  # (M, 4K)
    return F.pad(feats, (0, dim - feats.shape[1]))


class SemanticCrossAttention(nn.Module):
    """x (B, N, dim) attends to s (B, M, context_dim); residual with a zero-init scalar gate."""

    def __init__(self, cfg: SemanticAttentionConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SemanticAttentionConfig()
        self.norm_x = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.norm_s = nn.LayerNorm(cfg.context_dim, eps=cfg.eps)
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.context_dim, cfg.dim)
        self.v = nn.Linear(cfg.context_dim, cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.gate = nn.Parameter(torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for layer in (self.q, self.k, self.v, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.norm_x.reset_parameters()
        self.norm_s.reset_parameters()
        nn.init.zeros_(self.gate)  # identity at init; q/k/v/out are not zero, so the gate gets gradient at step 0

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        *,
        x_positions: torch.Tensor | None = None,
        context_positions: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        qx, ks = self.norm_x(x), self.norm_s(context)
        vs = ks
        if (cfg.positional or cfg.locality > 0) and (x_positions is None or context_positions is None):
            raise ValueError("positional SemanticCrossAttention needs x_positions and context_positions")
        if cfg.positional:
            qx = qx + fourier_positions(x_positions, cfg.dim).to(qx.dtype)  # (N, dim) broadcast over B
            ks = ks + fourier_positions(context_positions, cfg.context_dim).to(ks.dtype)
        heads = "b n (h d) -> b h n d"
        q = rearrange(self.q(qx), heads, h=cfg.heads)  # (B, H, N, d)
        k = rearrange(self.k(ks), heads, h=cfg.heads)  # (B, H, M, d)
        v = rearrange(self.v(vs), heads, h=cfg.heads)  # (B, H, M, d)
        attn_mask, any_valid = None, None
        if cfg.locality > 0:  # -d^2 / (2 w^2): each latent token reads the map around its own place
            d2 = torch.cdist(x_positions.float(), context_positions.float()).pow(2)  # (N, M)
            attn_mask = (-d2 / (2 * cfg.locality**2)).to(q.dtype)[None, None]  # (1, 1, N, M)
        if context_mask is not None:
            any_valid = context_mask.any(dim=1)  # (B,) a sample without semantic tokens gets no residual
            keep = (context_mask | ~any_valid[:, None])[:, None, None, :]  # (B, 1, 1, M); no all-masked row (NaN)
            attn_mask = keep if attn_mask is None else attn_mask.masked_fill(~keep, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, N, d)
        out = self.out(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, dim)
        if any_valid is not None:
            out = out * any_valid[:, None, None].to(out.dtype)
        return x + self.gate.to(out.dtype) * out
