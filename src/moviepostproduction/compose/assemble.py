"""Batched Assemble-Attn: every (sample, ref) group through the FLUX block's own attention, in a few calls.

Group g is the short sequence [layout token ; image tokens inside its box]. The layout token takes the context
(text) stream's projections, the image tokens the image stream's, exactly as the block's joint attention would
treat a one-token prompt. Image tokens keep their own rotary positions; the layout token sits at the text
position (all-zero ids), where the rotation is the identity.

Cost (docs/benchmarks.md): the image tokens' q/k/v are the ones the block's joint attention has just computed
on the same normalised tokens, captured with forward hooks instead of projected again; groups share attention
rows, in a few size buckets (`assemble_rows`); and the output projections, being affine, run after the average
over covering boxes, once per covered token instead of once per (group, token), fused into one map when sampling
(`project_out`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moviepostproduction.compose.assemble_shared import cover_weights, shared_attention
from moviepostproduction.compose.conditioning import LayoutPacking, PackedRows

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # image q, k (qk-normed, before RoPE), v: each (B, N, H, hd)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """FLUX rotary embedding on interleaved pairs. x (G, L, H, hd); cos/sin (G, L, hd) per token."""
    x_even, x_odd = rearrange(x.float(), "... (d two) -> two ... d", two=2)
    rotated = rearrange(torch.stack([-x_odd, x_even]), "two ... d -> ... (d two)")
    return (x.float() * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def _heads(attn, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(-1, (-1, attn.head_dim))  # (..., H, hd)


@contextmanager
def capture_image_qkv(attn) -> Iterator[dict[str, torch.Tensor]]:
    """While open, keep the image stream's q and k after the qk-norms and its v, as the attention computes them.

    Forward hooks on the attention's own modules (LoRA wrappers included), so any processor that calls them
    the stock way is served; `image_qkv` checks the shapes and projects again otherwise.
    """
    found: dict[str, torch.Tensor] = {}

    def keep(name: str, chunk: int | None = None):
        def hook(module, args, out):
            found.setdefault(name, out if chunk is None else out.chunk(3, dim=-1)[chunk])

        return hook

    fused = getattr(attn, "fused_projections", False)
    v_module, v_chunk = (attn.to_qkv, 2) if fused else (attn.to_v, None)
    handles = [
        attn.norm_q.register_forward_hook(keep("q")),
        attn.norm_k.register_forward_hook(keep("k")),
        v_module.register_forward_hook(keep("v", v_chunk)),
    ]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def image_qkv(attn, image: torch.Tensor, found: dict[str, torch.Tensor] | None = None) -> QKV:
    """q, k, v (B, N, H, hd) of the image tokens: the captured ones when they match `image`, else projected."""
    b, n, _ = image.shape
    if found is not None and found.keys() >= {"q", "k", "v"}:
        q, k, v = found["q"], found["k"], _heads(attn, found["v"])
        if q.shape[:2] == k.shape[:2] == v.shape[:2] == (b, n):
            return q, k, v
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(image).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(image), attn.to_k(image), attn.to_v(image)
    return attn.norm_q(_heads(attn, q)), attn.norm_k(_heads(attn, k)), _heads(attn, v)


def _context_qkv(attn, context: torch.Tensor) -> QKV:
    """The context stream's projections of the layout tokens: context (G, D) -> each (G, H, hd)."""
    if getattr(attn, "fused_projections", False):
        cq, ck, cv = attn.to_added_qkv(context).chunk(3, dim=-1)
    else:
        cq, ck, cv = attn.add_q_proj(context), attn.add_k_proj(context), attn.add_v_proj(context)
    return attn.norm_added_q(_heads(attn, cq)), attn.norm_added_k(_heads(attn, ck)), _heads(attn, cv)


def covered_qkv(
    attn,
    qkv: QKV,
    layout_tokens: torch.Tensor,
    packing: LayoutPacking,
    covered: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> tuple[QKV, QKV]:
    """q, k, v (M, H, hd) of the covered image tokens, rotated once each, and of the layout tokens (G, H, hd)."""
    n = qkv[0].shape[1]
    # index_select, not x[index]: advanced indexing on CPU is several times slower, forward and backward.
    q, k, v = (x.flatten(0, 1).index_select(0, covered) for x in qkv)  # each (M, H, hd): tokens in a box
    positions = covered % n
    cos, sin = (r.index_select(0, positions)[None] for r in rope[:2])  # (1, M, hd)
    q, k = rotate_pairs(q[None], cos, sin)[0], rotate_pairs(k[None], cos, sin)[0]  # RoPE once per covered token
    context = _context_qkv(attn, layout_tokens[packing.group_batch, packing.group_ref])  # each (G, H, hd)
    return (q, k, v), context


def _backend(attn):
    """The attention backend diffusers would use for this block (`set_attention_backend`), None: the active one."""
    return getattr(getattr(attn, "processor", None), "_attention_backend", None)


# diffusers backends that honour a key mask: SDPA's kernels, flex, xformers, and the varlen kernels (which turn a
# prefix mask into sequence lengths). Flash, sage and the rest refuse or ignore one.
MASKED_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers"})


def _takes_masks(backend) -> bool:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    name = backend if backend is not None else _AttentionBackendRegistry.get_active_backend()[0]
    name = getattr(name, "value", name)
    return name in MASKED_BACKENDS or "varlen" in name


def routed_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """Attention of P rows through diffusers' dispatcher, with the backend the block's processor would use.

    q, k, v (P, S, H, hd); key_mask (P, 1, 1, S) bool with the real keys a prefix of each row, or None. A backend
    without masks (flash, sage: not in MASKED_BACKENDS) gets each row cut to its real length, one call per row, and
    the padding slots' outputs (never read) stay 0. Returns (P, S, H, hd).
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    backend = _backend(attn)
    if key_mask is None or _takes_masks(backend):
        return dispatch_attention_fn(q, k, v, attn_mask=key_mask, backend=backend)
    out = torch.zeros_like(q)
    for p, length in enumerate(key_mask[:, 0, 0].sum(-1).tolist()):
        out[p, :length] = dispatch_attention_fn(*(x[p : p + 1, :length] for x in (q, k, v)), backend=backend)[0]
    return out


def attend_rows(
    attn,
    qkv: QKV,
    layout_tokens: torch.Tensor,
    packing: LayoutPacking,
    rows: PackedRows,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> list[torch.Tensor]:
    """One attention call per size bucket of rows. Returns each bucket's attended slots before `to_out`:
    (P_b * S_b, D) per bucket, in slot order."""
    image, context = covered_qkv(attn, qkv, layout_tokens, packing, rows.covered, rope)
    tables = [torch.cat([i, c]) for i, c in zip(image, context, strict=True)]  # each (M + G, H, hd)
    outs = []
    for bucket in rows.buckets:
        index, p = bucket.source.flatten(), bucket.source.shape[0]
        qb, kb, vb = (rearrange(t.index_select(0, index), "(p s) h d -> p s h d", p=p) for t in tables)
        out = routed_attention(attn, qb, kb, vb, bucket.key_mask)  # (P, S, H, hd)
        outs.append(rearrange(out, "p s h d -> (p s) (h d)"))
    return outs


def assemble_residual(
    attn,
    out_proj: nn.Module,
    qkv: QKV,
    layout_tokens: torch.Tensor,
    packing: LayoutPacking,
    rows: PackedRows,
    rope: tuple[torch.Tensor, torch.Tensor],
    ref_patches: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The Assemble-Attn branch of one double block before its gate, on the covered tokens only: (M, D) at
    `rows.covered` (the branch is zero on every other token). `ref_patches`: (B, R, P, G) DINO patch tokens and
    (B, R, 2) token extents (`Conditioning.ref_patches` / `token_extent`), needed when the block has box patches.

    Equals the per-group attention, projected and then averaged over the boxes covering each token
    (tests/assemble_reference.py): `to_out` and `out_proj` are affine, so they commute with that average and run once
    per covered token. The average is weighted by the packing's occlusion priority when it has one
    (`LayoutPacking.group_weight`). Size-bucket rows attend group by group; a shared plan (`rows.shared`) computes
    the average directly (`compose.assemble_shared`).
    """
    b, n = qkv[0].shape[:2]
    cover = packing.denominator().reshape(b * n).index_select(0, rows.covered)  # (M,)
    if rows.shared is not None:
        image, context = covered_qkv(attn, qkv, layout_tokens, packing, rows.covered, rope)
        weight = cover_weights(packing, rows.shared, rows.covered)  # (M, G)
        averaged = shared_attention(*image, context, rows.shared, weight).to(image[0].dtype)  # (M, D)
    else:
        attended = attend_rows(attn, qkv, layout_tokens, packing, rows, rope)  # per bucket (P_b * S_b, D)
        m = rows.covered.numel()
        total = attended[0].new_zeros(m + 1, attended[0].shape[-1])
        for bucket, out in zip(rows.buckets, attended, strict=True):
            total.index_add_(0, bucket.target, packing.weighted(out, bucket.segment.flatten()))
        averaged = total[:m] / cover[:, None].to(total.dtype)
    values = project_out(attn, out_proj, averaged)  # (M, D)
    slots = box_frame_values(out_proj, layout_tokens, ref_patches, packing)
    if slots is not None:
        values = values + average_on_covered(slots, packing, rows.covered, cover.to(values.dtype))
    return values


def box_frame_values(
    out_proj: nn.Module,
    layout_tokens: torch.Tensor,
    ref_patches: tuple[torch.Tensor, torch.Tensor] | None,
    packing: LayoutPacking,
) -> torch.Tensor | None:
    """The summed box-frame residuals of the block (`BoxPositionEncoding`, `BoxPatchEncoding`) at every real
    (group, token) slot: (S, D); None when it has neither. They are averaged over covering boxes once, together, and
    share the slots' box-frame coordinates and groups, gathered once."""
    position, patches = getattr(out_proj, "position", None), getattr(out_proj, "patches", None)
    if position is None and patches is None:
        return None
    if packing.coords is None:
        raise ValueError(
            "box positions or box patches are enabled but the conditioning has no box coordinates "
            "(LayoutPacking.coords)"
        )
    coords, groups = packing.coords[packing.key_mask[:, 1:]], packing.slot_groups()  # (S, 2), (S,)
    parts = []
    if position is not None:
        parts.append(box_position_values(position, layout_tokens, packing, coords, groups))
    if patches is not None:
        parts.append(box_patch_values(patches, ref_patches, packing, coords, groups))
    return sum(parts[1:], parts[0])


def average_on_covered(values: torch.Tensor, packing: LayoutPacking, covered: torch.Tensor, cover: torch.Tensor):
    """(S, D) values of the real (group, token) slots -> (M, D) at `covered` (sorted flat tokens), averaged over the
    boxes covering each: `cover` (M,) is their count, or their summed weight under an occlusion priority."""
    real = packing.key_mask[:, 1:]  # (G, L)
    at = torch.searchsorted(covered, packing.token_index[real])  # (S,) rows of `covered`
    values = packing.weighted(values)
    total = values.new_zeros(covered.numel(), values.shape[-1]).index_add_(0, at, values)
    return total / cover[:, None].to(total.dtype)


def box_position_values(
    position: nn.Module, layout_tokens: torch.Tensor, packing: LayoutPacking, coords: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """`BoxPositionEncoding` of every real (group, token) slot: (S, D). coords (S, 2) / groups (S,): the slots'
    box-frame coordinates and groups (`packing.coords[packing.key_mask[:, 1:]]`, `packing.slot_groups()`)."""
    tokens = layout_tokens[packing.group_batch, packing.group_ref]  # (G, D)
    return position(coords, groups, tokens)


def box_patch_values(
    encoding: nn.Module,
    ref_patches: tuple[torch.Tensor, torch.Tensor] | None,
    packing: LayoutPacking,
    coords: torch.Tensor,
    groups: torch.Tensor,
) -> torch.Tensor:
    """`BoxPatchEncoding` of every real (group, token) slot: (S, D). ref_patches: (B, R, P, G) patch tokens and
    (B, R, 2) token extents; coords / groups as for `box_position_values`."""
    if ref_patches is None:
        raise ValueError(
            "box patches are enabled but the conditioning has no DINO patch tokens (Conditioning.ref_patches)"
        )
    patches, extent = (x[packing.group_batch, packing.group_ref] for x in ref_patches)  # (G, P, G_d), (G, 2)
    return encoding(patches, extent, coords, groups)


def _dense_on(linear, device: torch.device) -> bool:
    """A stock nn.Linear whose weights are plain tensors on `device`: no LoRA wrapper, no quantized tensor subclass
    (torchao), no bitsandbytes layer, no offload hook (accelerate keeps such weights on the meta device)."""
    if type(linear) is not nn.Linear or hasattr(linear, "_hf_hook"):
        return False
    tensors = [t for t in (linear.weight, linear.bias) if t is not None]
    return all(
        type(t) in (torch.Tensor, nn.Parameter) and t.device == device and t.is_floating_point() for t in tensors
    )


def _fusable(attn, out_proj: nn.Module, device: torch.device) -> bool:
    linear, dropout = attn.to_out[0], attn.to_out[1]
    plain = _dense_on(linear, device) and _dense_on(getattr(out_proj, "out", None), device)
    return plain and not (dropout.training and dropout.p > 0)


def project_out(attn, out_proj: nn.Module, attended: torch.Tensor) -> torch.Tensor:
    """out_proj(to_out(attended)) for (M, D) attended values.

    Without autograd (sampling), the two affine maps run as one: W = W_out W_to, b = W_out b_to + b_out, computed
    in fp32 once per weights (kept on `out_proj`, keyed on the four tensors' storage and version counters, so an
    optimiser step, a reload or a move recomputes it) and reused by every denoising step: half the matmul work.
    Training, LoRA-wrapped, quantized or offloaded projections and active dropout take the two-step path (the
    modules' own calls).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or not _fusable(attn, out_proj, attended.device):
        return out_proj(attn.to_out[1](attn.to_out[0](attended)))  # compiled: no host-side cache in the graph
    first, second = attn.to_out[0], out_proj.out
    tensors = [t for t in (first.weight, first.bias, second.weight, second.bias) if t is not None]
    # weights loaded under torch.inference_mode (as ComfyUI runs every node) have no version counter
    key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype) for t in tensors)
    cached = getattr(out_proj, "_fused_out", None)
    if cached is None or cached[0] != key:
        w_out = second.weight.float()
        weight = (w_out @ first.weight.float()).to(first.weight.dtype)  # (D, D)
        bias = w_out @ first.bias.float() if first.bias is not None else torch.zeros_like(w_out[:, 0])
        bias = (bias + second.bias.float() if second.bias is not None else bias).to(first.weight.dtype)
        cached = out_proj._fused_out = (key, weight, bias)
    return F.linear(attended, cached[1], cached[2])


def add_on_covered(x: torch.Tensor, gate: torch.Tensor, values: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """x + gate * branch for a branch that is `values` (M, D) on the flat tokens `covered` and zero elsewhere.

    x (B, N, D); gate (B, N, D) per token or (B, 1, D). Touches x once (one copy) instead of building the dense
    branch, multiplying and adding over every token.
    """
    b, n, d = x.shape
    if gate.shape[1] == 1:
        gate = gate[:, 0].index_select(0, torch.div(covered, n, rounding_mode="floor"))  # (M, D)
    else:
        gate = gate.reshape(b * n, d).index_select(0, covered)  # (M, D)
    return x.reshape(b * n, d).index_add(0, covered, gate * values).view(b, n, d)
