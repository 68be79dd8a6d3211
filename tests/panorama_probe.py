"""A seam probe for panoramas: a FLUX transformer whose weights are set by hand so that it generates smooth
random content, to measure what each `PanoramaConfig` does at the seam without a trained model.

Why not a random-init FLUX: its output has no spatial coherence (neighbouring tokens are as unrelated as distant
ones), so there is nothing that could fail to continue across the seam; its seam ratio is about 1 with or
without any wrapping (docs/panorama.md has the numbers). A seam is coherent content that does not continue
from the right edge to the left, and the only thing in FLUX that tells a token which tokens are near is RoPE.

The probe is the stock diffusers `FluxTransformer2DModel` (no double block, one single block) whose velocity
is v(x) = x - S x_bar: x_bar replaces each packed token's four 2x2 latent pixels by their mean, and S is the
block's attention, whose queries and keys are constants, so its logits depend on the RoPE phases only:

    logit(i, j) = A_row cos(w (row_i - row_j)) + A_col cos(w' (col_i - col_j)),   w = 10000^(-2/8) = 0.1

(the second rotary pair of an 8-dim axis). With stock RoPE w' = w: a smooth kernel of the column *distance*,
so columns 0 and W-1 are far apart. With `periodic_rope` w' is a multiple of 2 pi / W: the kernel wraps.
One Euler step from t = 1 to t = 0 gives x0 = x - v(x) = S x_bar, a smooth random field: exactly what RoPE
says about which tokens are neighbours, nothing else.

How the weights realise it (D = heads x head_dim, C = 4 x latent channels, P = D - C):
- `x_embedder`: h = [x ; K s] with s = (+1, -1, +1, ...) on the P extra channels and K = `level` >> |x|, so
  LayerNorm(h) is linear in x up to a relative error |x|^2 / (2 P K^2) (about 1e-5): mean(h) ~ 0, std ~ K
  sqrt(P / D). `_readout` inverts it: x = std * (n_x - mean(n_pattern)). Text tokens get [0 ; -K s].
- The block's adaLN is the identity (shift 0, scale 0, gate 1) and its MLP branch 0. q and k are biases; on
  a time-axis channel (ids 0 for every token, so RoPE leaves it alone) the key reads the pattern's sign: +g on
  image tokens, -g on text tokens, so every text key trails the image keys by `text_gap` logits (weight
  e^-30). Values are `_readout` followed by the 2x2 patch mean; the block's output projection adds -S x_bar.
- `norm_out` is a plain LayerNorm (zero modulation) and `proj_out` is `_readout`: v = x - S x_bar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["ProbeConfig", "build_seam_probe"]

ROPE_PAIR = 1  # which rotary pair of the row and column axes carries the kernel: 10000^(-2/8) = 0.1


@dataclass(frozen=True)
class ProbeConfig:
    heads: int = 8
    head_dim: int = 20
    axes_dims_rope: tuple[int, int, int] = (4, 8, 8)  # (time, row, col); an 8-dim axis has frequency 0.1
    row_strength: float = 30.0  # A_row: logit amplitude of the row kernel (about 2 rows wide)
    col_strength: float = 6.0  # A_col: logit amplitude of the column kernel
    text_gap: float = 30.0  # logits by which every text key trails the image keys
    level: float = 100.0  # K: size of the constant pattern that keeps LayerNorm linear in x
    latent_channels: int = 16
    text_dim: int = 32  # T5 width the model accepts (the text content is ignored)
    pooled_dim: int = 16

    def __post_init__(self) -> None:
        dim, channels = self.heads * self.head_dim, 4 * self.latent_channels
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to head_dim {self.head_dim}")
        if min(self.axes_dims_rope) < 2 * ROPE_PAIR + 2:
            raise ValueError(f"every rotary axis needs >= {2 * ROPE_PAIR + 2} dims, got {self.axes_dims_rope}")
        if dim - channels < 2 or (dim - channels) % 2:
            raise ValueError(f"width {dim} must exceed the {channels} latent channels by an even number")


def _readout(channels: int, dim: int, level: float) -> torch.Tensor:
    """(C, D): LayerNorm([x ; K s]) -> x. The pattern channels' mean undoes LayerNorm's mean subtraction."""
    pattern = dim - channels
    std = level * math.sqrt(pattern / dim)
    w = torch.zeros(channels, dim)
    w[:, :channels] = torch.eye(channels) * std
    w[:, channels:] = -std / pattern
    return w


def _query(cfg: ProbeConfig) -> torch.Tensor:
    """(head_dim,) the constant query (= key on image tokens): one rotary pair per kernel axis + the text gap."""
    scale = math.sqrt(cfg.head_dim)  # SDPA divides q.k by sqrt(head_dim)
    t, r, _ = cfg.axes_dims_rope
    q = torch.zeros(cfg.head_dim)
    q[t + 2 * ROPE_PAIR] = math.sqrt(cfg.row_strength * scale)  # (q . k) / scale = A_row cos(phase)
    q[t + r + 2 * ROPE_PAIR] = math.sqrt(cfg.col_strength * scale)
    q[0] = math.sqrt(cfg.text_gap * scale / 2)  # q0 * (+-q0) / scale = +-gap / 2
    return q


def build_seam_probe(cfg: ProbeConfig | None = None):
    """The probe as a diffusers `FluxTransformer2DModel` (eval mode); see the module docstring."""
    from diffusers import FluxTransformer2DModel

    cfg = cfg or ProbeConfig()
    dim, channels = cfg.heads * cfg.head_dim, 4 * cfg.latent_channels
    pattern = dim - channels
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=channels,
        num_layers=0,
        num_single_layers=1,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_dim,
        pooled_projection_dim=cfg.pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=cfg.axes_dims_rope,
    ).eval()
    sign = torch.tensor([1.0, -1.0]).repeat(pattern // 2)  # (P,)
    readout = _readout(channels, dim, cfg.level)  # (C, D)
    patch_mean = torch.kron(torch.eye(cfg.latent_channels), torch.full((4, 4), 0.25))  # packed (c ph pw) order
    q = _query(cfg)
    k = q.clone()
    k[0] = 0.0  # the key's gap channel comes from the pattern's sign instead
    pattern_std = math.sqrt(pattern / dim)  # LayerNorm of the pattern channels: +-1 / pattern_std
    block = model.single_transformer_blocks[0]
    attn = block.attn
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.x_embedder.weight[:channels] = torch.eye(channels)
        model.x_embedder.bias[channels:] = cfg.level * sign
        model.context_embedder.bias[channels:] = -cfg.level * sign
        block.norm.linear.bias[2 * dim :] = 1.0  # (shift, scale, gate) = (0, 0, 1)
        attn.to_q.bias.copy_(q.repeat(cfg.heads))
        attn.to_k.bias.copy_(k.repeat(cfg.heads))
        for head in range(cfg.heads):
            attn.to_k.weight[head * cfg.head_dim, channels:] = q[0] * sign * pattern_std / pattern  # +-q0
        rms = q.pow(2).mean().sqrt()  # q and every key have this RMS: the qk RMSNorms leave them unchanged
        attn.norm_q.weight.fill_(float(rms))
        attn.norm_k.weight.fill_(float(rms))
        attn.to_v.weight[:channels] = patch_mean @ readout
        block.proj_out.weight[:channels, :channels] = -torch.eye(channels)  # attention part of [attn ; mlp]
        model.proj_out.weight.copy_(readout)
    return model
