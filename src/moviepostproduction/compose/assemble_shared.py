"""Assemble-Attn for crowded or large boxes: one attention per sample over its covered tokens, exact per group.

Group g is [layout token l_g ; the image tokens of box_g]; an image query n of the group attends to its keys only.
Write E(n, m) = exp(s(n, m) - c_n) for every covered key m of the sample and e(n, g) = exp(s(n, l_g) - c_n) for its
layout tokens (c_n: the row's max), B (M, G) for the box membership, w_g for the occlusion weights and W_n for their
sum over the boxes covering n. The box average of the per-group attention outputs is then

    out(n) = sum_m E(n, m) C(n, m) v_m + sum_g a_g(n) e(n, g) v_{l_g},        C = a B^T,
    a_g(n) = w_g B(n, g) / (W_n Z_g(n)),      Z_g(n) = e(n, g) + sum_m E(n, m) B(m, g)   (Z = E B + e),

so per query chunk and head: one QK^T, exp, two rank-G matmuls, E * C, one (E * C) @ V. About M^2 (2 hd + 2 G)
multiply-adds per head instead of sum_g |box_g|^2 2 hd, no mask, memory bounded by the chunk (CHUNK_BYTES).
In float32 whatever the model's dtype. A query whose Z_g underflows for a box that covers it (every key of the
box more than ~69 below the row's max score) is recomputed per group in log space (`_exact_rows`).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange

from moviepostproduction.compose.conditioning import LayoutPacking, SharedCover

# float32 scores and mixing weights of one chunk of (heads, queries): on CPU small enough to stay in the last-level
# cache (8 MiB: ~10 % faster than 64 MiB at 4096 tokens, docs/benchmarks.md), on accelerators large for big kernels.
CHUNK_BYTES = 8 * 2**20
DEVICE_CHUNK_BYTES = 256 * 2**20
Z_MIN = 1e-30  # below this, a box's share of the row is recomputed exactly (fp32's normal range ends at 1.2e-38)
EXACT_BYTES = 64 * 2**20  # the log-space fallback's (heads, queries, keys, groups) block


def cover_weights(packing: LayoutPacking, cover: SharedCover, covered: torch.Tensor) -> torch.Tensor:
    """(M, G) float32: w_g / W_n where covered token n lies in box g, else 0 (the box average's weights)."""
    weight = cover.membership.float()  # (M, G)
    if packing.group_weight is not None:
        weight = weight * packing.group_weight.float()[None]
    total = packing.denominator().reshape(-1).index_select(0, covered).float()  # (M,)
    return weight / total[:, None]


def shared_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cover: SharedCover,
    weight: torch.Tensor,
) -> torch.Tensor:
    """The box-averaged Assemble-Attn output of every covered token, before `to_out`: (M, H * hd).

    q, k, v (M, H, hd): the covered tokens, rotated; context: the layout tokens' q, k, v (G, H, hd) (identity
    rotation); weight (M, G): `cover_weights`. Tokens of samples without groups stay 0 (there are none).
    """
    m, heads, hd = q.shape
    out = q.new_zeros(m, heads * hd, dtype=torch.float32)
    scale = 1.0 / math.sqrt(hd)
    budget = CHUNK_BYTES if q.device.type == "cpu" else DEVICE_CHUNK_BYTES
    for m0, m1, g0, g1 in cover.spans:
        queries = rearrange(q[m0:m1].float() * scale, "m h d -> h m d")
        # keys transposed once, contiguous: QK^T then reads them in the layout the matmul wants (half its time on CPU)
        keys_t = rearrange(torch.cat([k[m0:m1], context[1][g0:g1]]).float(), "k h d -> h d k").contiguous()
        values = rearrange(torch.cat([v[m0:m1], context[2][g0:g1]]).float(), "k h d -> h k d")  # (H, M_b + G_b, hd)
        boxes = cover.membership[m0:m1, g0:g1].float()  # (M_b, G_b)
        boxes, weights = (boxes, boxes.T.contiguous()), weight[m0:m1, g0:g1]
        rows, per_row = m1 - m0, 4 * (keys_t.shape[-1] + m1 - m0)  # bytes of one query's scores + mixing weights
        q_chunk = min(rows, max(1, budget // per_row))
        h_chunk = min(heads, max(1, budget // (per_row * q_chunk)))
        # Sampling reuses one chunk-sized buffer (scores, mixing weights) instead of fresh allocations per chunk.
        space = None if torch.is_grad_enabled() else queries.new_empty(h_chunk * q_chunk * per_row // 4)
        attended = queries.new_empty(heads, rows, hd)
        lost = torch.zeros(rows, dtype=torch.bool, device=q.device)
        for h0 in range(0, heads, h_chunk):
            h = slice(h0, h0 + h_chunk)
            for c0 in range(0, rows, q_chunk):
                r = slice(c0, c0 + q_chunk)
                attended[h, r], chunk_lost = _attend_chunk(
                    queries[h, r], keys_t[h], values[h], boxes, weights[r], space
                )
                lost[r] |= chunk_lost
        if torch.compiler.is_compiling():  # no host sync inside a graph: torch.cond runs the exact rows on underflow
            operands = (attended, lost, queries, keys_t, values, boxes[0], weights)
            attended = torch.cond(lost.any(), _recompute_lost, _keep, operands)
        elif bool(lost.any()):  # one host sync per sample
            redo = lost.nonzero().squeeze(1)
            attended[:, redo] = _exact_rows(queries[:, redo], keys_t, values, boxes[0], weights[redo])
        out[m0:m1] = rearrange(attended, "h m d -> m (h d)")
    return out


def _recompute_lost(attended, lost, queries, keys_t, values, boxes, weights) -> torch.Tensor:
    """torch.cond's branch on underflow: the exact rows where `lost`, the chunked result elsewhere."""
    return torch.where(lost[None, :, None], _exact_rows(queries, keys_t, values, boxes, weights), attended)


def _keep(attended, lost, queries, keys_t, values, boxes, weights) -> torch.Tensor:
    return attended.clone()  # torch.cond's branches may not return an input as is


def _attend_chunk(
    queries: torch.Tensor,
    keys_t: torch.Tensor,
    values: torch.Tensor,
    boxes: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor,
    space: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """queries (h, Q, hd) pre-scaled; keys_t (h, hd, M_b + G_b), values (h, M_b + G_b, hd): image keys then layout
    keys; boxes: (M_b, G_b) and its transpose; weight (Q, G_b); space: a flat buffer of at least h Q (2 M_b + G_b)
    floats to work in (sampling), None under autograd. Returns (h, Q, hd) and (Q,) bool: the queries for which a
    covering box's normaliser underflowed in some head (their output is recomputed by `_exact_rows`)."""
    heads, q, _ = queries.shape
    m, k = boxes[0].shape[0], keys_t.shape[-1]
    if space is None:
        scores = queries @ keys_t  # (h, Q, K)
        e = (scores - scores.amax(-1, keepdim=True)).exp()
    else:
        scores = torch.bmm(queries, keys_t, out=space[: heads * q * k].view(heads, q, k))
        e = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    e_img, e_lay = e[..., :m], e[..., m:]  # (h, Q, M_b), (h, Q, G_b)
    z = e_img @ boxes[0] + e_lay  # (h, Q, G_b): each box's softmax normaliser, relative to the row's max
    a = weight / z.clamp(min=Z_MIN)  # (h, Q, G_b)
    if space is None:
        out = torch.cat([e_img * (a @ boxes[1]), e_lay * a], dim=-1) @ values  # (h, Q, hd)
    else:
        mix = torch.matmul(a, boxes[1], out=space[heads * q * k :][: heads * q * m].view(heads, q, m))  # C
        e_img.mul_(mix)
        e_lay.mul_(a)
        out = e @ values
    return out, ((z < Z_MIN) & (weight > 0)).any(-1).any(0)


def _exact_rows(
    queries: torch.Tensor, keys_t: torch.Tensor, values: torch.Tensor, boxes: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The same output as `_attend_chunk` with each box's softmax normalised in log space: (H, F, hd)."""
    heads, f, _ = queries.shape
    m, g = boxes.shape
    log_boxes = torch.where(boxes > 0, 0.0, -math.inf)  # (M_b, G_b)
    step = max(1, EXACT_BYTES // (4 * heads * m * g))
    parts = []
    for r0 in range(0, f, step):
        scores = queries[:, r0 : r0 + step] @ keys_t  # (H, F', K)
        s_img, s_lay = scores[..., :m, None] + log_boxes, scores[..., m:]  # (H, F', M_b, G_b), (H, F', G_b)
        log_z = torch.logaddexp(torch.logsumexp(s_img, dim=2), s_lay)  # (H, F', G_b)
        w = weight[r0 : r0 + step]  # (F', G_b)
        p_img = ((s_img - log_z[:, :, None]).exp() * w[:, None]).sum(-1)  # (H, F', M_b)
        p_lay = (s_lay - log_z).exp() * w  # (H, F', G_b)
        parts.append(torch.cat([p_img, p_lay], dim=-1) @ values)
    return torch.cat(parts, dim=1)
