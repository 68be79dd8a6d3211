"""The reference Assemble-Attn: what `compose.assemble.assemble_residual` must equal, written the slow, obvious way.

Every (sample, ref) group runs through the FLUX block's own attention module on [layout token ; the image tokens
of its box] (the layout token at the text position, whose rotation is the identity), then the adapter's output
projection; each image token takes the average of its covering groups' outputs, weighted by the occlusion priority
when the packing has one. A loop over groups, no packing, no shared attention.
"""

from __future__ import annotations

import torch

from moviepostproduction.compose.conditioning import LayoutPacking


def reference_residual(
    attn,
    out_proj: torch.nn.Module,
    image: torch.Tensor,
    layout_tokens: torch.Tensor,
    packing: LayoutPacking,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """(B, N, D): the branch on every token, zero outside the boxes.

    attn: the double block's FluxAttention; out_proj: its `AssembleAttention`; image (B, N, D): the normalised
    tokens the block's attention saw; layout_tokens (B, R, D); rope: (cos, sin) each (N, hd) of the image tokens.
    """
    b, n, d = image.shape
    total = image.new_zeros(b * n, d)
    norm = image.new_zeros(b * n)
    weights = packing.group_weight if packing.group_weight is not None else image.new_ones(packing.num_groups)
    for g in range(packing.num_groups):
        tokens = packing.token_index[g][packing.key_mask[g, 1:]]  # flat b * N + n of the box's tokens
        sample, ref = int(packing.group_batch[g]), int(packing.group_ref[g])
        local = tokens - sample * n
        identity = (torch.ones_like(rope[0][:1]), torch.zeros_like(rope[1][:1]))  # the layout token's rotation
        cos, sin = (torch.cat([i, r.index_select(0, local)]) for i, r in zip(identity, rope, strict=True))
        out, _ = attn(
            hidden_states=image[sample, local][None],
            encoder_hidden_states=layout_tokens[sample, ref][None, None],
            image_rotary_emb=(cos, sin),
        )
        total.index_add_(0, tokens, weights[g] * out_proj(out[0]))
        norm.index_add_(0, tokens, weights[g].expand(tokens.numel()))
    return (total / norm.clamp(min=torch.finfo(norm.dtype).tiny)[:, None]).view(b, n, d)
