"""Batched Assemble-Attn: every (sample, ref) group through the FLUX block's own attention in one call.

Group g is the short sequence [layout token ; image tokens inside its box]. The layout token takes the context
(text) stream's projections, the image tokens the image stream's, exactly as the block's joint attention would
treat a one-token prompt. Image tokens keep their own rotary positions; the layout token sits at the text
position (all-zero ids), where the rotation is the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from ..conditioning import LayoutPacking


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX rotary embedding on interleaved pairs. x (G, L, H, hd); cos/sin (G, L, hd) per token."""
    x_even, x_odd = rearrange(x.float(), "... (d two) -> two ... d", two=2)
    rotated = rearrange(torch.stack([-x_odd, x_even]), "two ... d -> ... (d two)")
    return (x.float() * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))  # (G, L, H, hd)


def _project(attn, image: torch.Tensor, context: torch.Tensor):
    """The block attention's own q/k/v for both streams (fused or separate projections, LoRA-wrapped or not)."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(image).chunk(3, dim=-1)
        cq, ck, cv = attn.to_added_qkv(context).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(image), attn.to_k(image), attn.to_v(image)
        cq, ck, cv = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
    q, k = attn.norm_q(_heads(attn, q)), attn.norm_k(_heads(attn, k))
    cq, ck = attn.norm_added_q(_heads(attn, cq)), attn.norm_added_k(_heads(attn, ck))
    return q, k, _heads(attn, v), cq, ck, _heads(attn, cv)


def assemble_attention(
    attn,
    image: torch.Tensor,
    layout_tokens: torch.Tensor,
    packing: LayoutPacking,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Run the joint attention of every group at once.

    attn: the double block's FluxAttention; image (B, N, D): the normalised tokens its attention saw;
    layout_tokens (B, R, D); rope: (cos, sin) each (N, hd) for the image tokens.
    Returns the attended image tokens of every group after the block's output projection: (G, L, D).
    """
    n = image.shape[1]
    tokens = image.flatten(0, 1)[packing.token_index]  # (G, L, D)
    context = layout_tokens[packing.group_batch, packing.group_ref][:, None]  # (G, 1, D)
    q, k, v, cq, ck, cv = _project(attn, tokens, context)
    positions = packing.token_index % n  # (G, L)
    cos, sin = rope[0][positions], rope[1][positions]  # (G, L, hd)
    q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
    q, k, v = (rearrange(torch.cat([c, x], 1), "g s h d -> g h s d") for c, x in ((cq, q), (ck, k), (cv, v)))
    mask = packing.key_mask[:, None, None, :]  # (G, 1, 1, 1 + L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (G, H, 1 + L, hd)
    out = rearrange(out, "g h s d -> g s (h d)")[:, 1:].to(image.dtype)  # image part: (G, L, H*hd)
    return attn.to_out[1](attn.to_out[0](out))


def scatter_mean(values: torch.Tensor, packing: LayoutPacking, shape: tuple[int, int, int]) -> torch.Tensor:
    """(G, L, D) group outputs -> (B, N, D), averaged where boxes overlap, zero outside every box."""
    b, n, d = shape
    real = packing.key_mask[:, 1:]  # (G, L)
    total = values.new_zeros(b * n, d).index_add_(0, packing.token_index[real], values[real])
    cover = packing.cover.reshape(b * n, 1).clamp(min=1).to(values.dtype)
    return (total / cover).view(b, n, d)
