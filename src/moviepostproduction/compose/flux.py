"""Conditioning injected into diffusers' stock `FluxTransformer2DModel` (DESIGN 3), without forking it.

`ConditionedFlux` runs the block loop itself and calls each block's *own* submodules (norm1.linear, norms,
attn, ff, proj_mlp, proj_out ...), so FLUX weights, attention processors and peft LoRA adapters work unchanged.
It adds three things:
- per-token temb-space modulation: temb_n = temb + sum_i mask_i(n) alpha_i offset_{i,b}, turned into
  shift/scale/gate by the block's own AdaLN linear, run once per distinct region (tokens covered by the same
  refs share temb), never once per token;
- Assemble-Attn after the attention of the layout double blocks (all refs batched: <= 4 size-bucket calls, or one
  shared attention over the covered tokens for crowded / large boxes), gated by the block's gate_msa;
- the feedback bridge from double block b to b+1 for foreground refs.
Stock `AdaLayerNormZero` rejects a per-token temb, hence this loop.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from moviepostproduction.compose.assemble import add_on_covered, assemble_residual, capture_image_qkv, image_qkv
from moviepostproduction.compose.assemble_rows import PATHS, pack_rows
from moviepostproduction.compose.conditioning import MAX_BUCKETS, Conditioning, PackedRows, RegionMap
from moviepostproduction.compose.modules.adapter import CompositionAdapter


def region_modulation(
    norm: nn.Module, temb: torch.Tensor, offsets, regions: RegionMap | None, chunks: int, scales: tuple[int, ...] = ()
):
    """The block's AdaLN linear on one temb per region, gathered to tokens.

    temb (B, D); offsets (B, R, D) or None; returns `chunks` tensors each (B, N, D), or (B, 1, D) when every
    token shares the base temb (no offsets, or a single region). The chunks listed in `scales` come back as
    1 + scale, added in region space, so the token-sized modulation is a single `addcmul`.
    """
    if offsets is None or regions is None:
        temb_regions = temb[:, None]  # (B, 1, D)
    else:
        temb_regions = temb[:, None] + torch.bmm(regions.coef.to(offsets.dtype), offsets)  # (B, U, D)
    emb = norm.linear(norm.silu(temb_regions))  # (B, U, chunks * D)
    if scales:
        one = emb.new_zeros(chunks, emb.shape[-1] // chunks)  # 1 on the listed chunks, 0 elsewhere
        one[list(scales)] = 1
        emb = emb + one.flatten()
    b, u = emb.shape[:2]
    if u == 1:
        return emb.chunk(chunks, dim=-1)
    rows = (regions.index + u * torch.arange(b, device=emb.device)[:, None]).flatten()  # (B * N,) rows of (B * U)
    # Gathered chunk by chunk from a contiguous (chunks, B * U, D) copy: each per-token tensor is contiguous, and
    # the backward joins region-sized gradients instead of concatenating token-sized ones.
    parts = rearrange(emb, "b u (c d) -> c (b u) d", c=chunks).contiguous()
    return tuple(part.index_select(0, rows).view(b, -1, part.shape[-1]) for part in parts)  # each (B, N, D)


def multiply_add(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """base + a * b. Sampling: one pass (`addcmul`). Under autograd: mul + add, because addcmul's backward first
    multiplies each factor by its `value` argument, an extra token-sized pass per factor."""
    return base + a * b if torch.is_grad_enabled() else torch.addcmul(base, a, b)


def _modulate(norm_layer: nn.Module, x: torch.Tensor, shift: torch.Tensor, one_plus_scale: torch.Tensor):
    """AdaLN-Zero's norm(x) * (1 + scale) + shift, the 1 already added in region space."""
    return multiply_add(shift, norm_layer(x), one_plus_scale)


@dataclass
class BlockInputs:
    """Per-call, per-block conditioning handed to the block functions (None: plain FLUX behaviour)."""

    cond: Conditioning | None
    image_offsets: torch.Tensor | None = None  # (B, R, D)
    text_offsets: torch.Tensor | None = None  # (B, R, D)
    assemble: nn.Module | None = None  # AssembleAttention of this block when layout is active
    rows: PackedRows | None = None  # Assemble-Attn rows of cond.packing (once per forward at most; None: built here)


def double_block_forward(block, x, ctx, temb, rope, inputs: BlockInputs):
    """One FluxTransformerBlock with per-token modulation and optional Assemble-Attn. x (B, N, D), ctx (B, T, D)."""
    cond = inputs.cond
    img_regions = cond.image_regions if cond is not None else None
    txt_regions = cond.text_regions if cond is not None else None
    shift, scale, gate, shift_ff, scale_ff, gate_ff = region_modulation(
        block.norm1, temb, inputs.image_offsets, img_regions, 6, scales=(1, 4)
    )
    c_shift, c_scale, c_gate, c_shift_ff, c_scale_ff, c_gate_ff = region_modulation(
        block.norm1_context, temb, inputs.text_offsets, txt_regions, 6, scales=(1, 4)
    )
    norm_x = _modulate(block.norm1.norm, x, shift, scale)
    norm_ctx = _modulate(block.norm1_context.norm, ctx, c_shift, c_scale)
    layout = inputs.assemble is not None and cond.packing.num_groups > 0
    # Assemble-Attn reuses the joint attention's q/k/v through forward hooks; torch.compile cannot trace hooks
    # registered inside the graph, so there the image q/k/v are projected again (`image_qkv` without `found`).
    capture = layout and not torch.compiler.is_compiling()
    with capture_image_qkv(block.attn) if capture else nullcontext() as found:
        attn_out, ctx_attn_out = block.attn(
            hidden_states=norm_x, encoder_hidden_states=norm_ctx, image_rotary_emb=rope[1]
        )
    x = multiply_add(x, gate, attn_out)
    if layout:
        qkv = image_qkv(block.attn, norm_x, found)
        rows = inputs.rows
        if rows is None:
            rows = pack_rows(cond.packing, x.shape[0] * x.shape[1], head_dim=block.attn.head_dim, path="auto")
        patches = (cond.ref_patches, cond.token_extent) if cond.ref_patches is not None else None
        values = assemble_residual(
            block.attn, inputs.assemble, qkv, cond.layout_tokens, cond.packing, rows, rope[2], patches
        )
        x = add_on_covered(x, gate, values, rows.covered)
    x = multiply_add(x, gate_ff, block.ff(_modulate(block.norm2, x, shift_ff, scale_ff)))

    ctx = multiply_add(ctx, c_gate, ctx_attn_out)
    ctx = multiply_add(ctx, c_gate_ff, block.ff_context(_modulate(block.norm2_context, ctx, c_shift_ff, c_scale_ff)))
    if ctx.dtype == torch.float16:
        ctx = ctx.clip(-65504, 65504)
    return ctx, x


def single_block_forward(block, x, ctx, temb, rope, inputs: BlockInputs):
    """One FluxSingleTransformerBlock on [ctx ; x] with per-token modulation of foreground refs."""
    text_len = ctx.shape[1]
    seq = torch.cat([ctx, x], dim=1)  # (B, T + N, D)
    regions = inputs.cond.joint_regions if inputs.cond is not None else None
    shift, scale, gate = region_modulation(block.norm, temb, inputs.image_offsets, regions, 3, scales=(1,))
    norm_seq = _modulate(block.norm.norm, seq, shift, scale)
    mlp = block.act_mlp(block.proj_mlp(norm_seq))
    attn_out = block.attn(hidden_states=norm_seq, image_rotary_emb=rope[1])
    seq = multiply_add(seq, gate, block.proj_out(torch.cat([attn_out, mlp], dim=2)))
    if seq.dtype == torch.float16:
        seq = seq.clip(-65504, 65504)
    return seq[:, :text_len], seq[:, text_len:]


class ConditionedFlux(nn.Module):
    """A stock FluxTransformer2DModel plus a CompositionAdapter; a pure velocity predictor.

    `assemble_calls`: attention calls per layout block at most (size buckets, `assemble_rows`); 1 is a single
    padded call over every group. `assemble_path`: "auto" picks size buckets or the shared attention over the
    covered tokens (crowded / large boxes) by their cost (`assemble_rows.pack_rows`); "buckets" / "shared" force
    one. Same output every way (to rounding), the defaults do less work.
    """

    def __init__(
        self,
        transformer: nn.Module,
        adapter: CompositionAdapter,
        assemble_calls: int = MAX_BUCKETS,
        assemble_path: str = "auto",
    ):
        super().__init__()
        if assemble_calls < 1:
            raise ValueError(f"assemble_calls={assemble_calls}: need at least 1 attention call per layout block")
        if assemble_path not in PATHS:
            raise ValueError(f"assemble_path={assemble_path!r}: choose from {PATHS}")
        self.assemble_calls = assemble_calls
        self.assemble_path = assemble_path
        cfg = transformer.config
        if adapter.cfg.hidden_dim != cfg.num_attention_heads * cfg.attention_head_dim:
            raise ValueError(
                f"adapter hidden_dim={adapter.cfg.hidden_dim} != transformer width "
                f"{cfg.num_attention_heads * cfg.attention_head_dim}"
            )
        if (adapter.cfg.num_double_blocks, adapter.cfg.num_single_blocks) != (cfg.num_layers, cfg.num_single_layers):
            raise ValueError(
                f"adapter blocks ({adapter.cfg.num_double_blocks}, {adapter.cfg.num_single_blocks}) != transformer "
                f"blocks ({cfg.num_layers}, {cfg.num_single_layers})"
            )
        self.transformer = transformer
        self.adapter = adapter

    def prepare(self, refs, grid: tuple[int, int], text_len: int, *, layout_rows: bool = True) -> Conditioning:
        """Per-scene cache (`CompositionAdapter.prepare`) with its Assemble-Attn rows: built once, used every step.
        `layout_rows=False` leaves the rows out, for a caller that regrids the conditioning first (panorama)."""
        cond = self.adapter.prepare(refs, grid, text_len)
        return self.with_rows(cond) if layout_rows else cond

    def with_rows(self, cond: Conditioning) -> Conditioning:
        """`cond` with the packed Assemble-Attn rows of its packing (`pack_rows`), when a layout block will use them.

        A conditioning without rows still works (the forward then packs them itself, once per call): training builds
        a new conditioning for every batch anyway."""
        if cond.rows is not None or not self.adapter.assemble or cond.num_refs == 0 or cond.packing.num_groups == 0:
            return cond
        tokens = cond.alpha.shape[0] * cond.grid[0] * cond.grid[1]
        return replace(cond, rows=self._plan(cond, tokens))

    def _plan(self, cond: Conditioning, tokens: int) -> PackedRows:
        head_dim = self.transformer.config.attention_head_dim
        return pack_rows(cond.packing, tokens, self.assemble_calls, head_dim, self.assemble_path)

    def _run(self, fn, *args):
        if torch.is_grad_enabled() and getattr(self.transformer, "gradient_checkpointing", False):
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        conditioning: Conditioning | None = None,
        layout_active: bool = True,
    ) -> torch.Tensor:
        """Same inputs as the stock forward (packed latents (B, N, C_in)) plus the per-scene `conditioning`.

        `layout_active=False` skips Assemble-Attn (the pipeline turns it off after `grounding_ratio` of the steps).
        Returns the velocity (B, N, C_out).
        """
        tr = self.transformer
        x = tr.x_embedder(hidden_states)  # (B, N, D)
        timestep = timestep.to(x.dtype) * 1000
        if guidance is not None:
            temb = tr.time_text_embed(timestep, guidance.to(x.dtype) * 1000, pooled_projections)
        else:
            temb = tr.time_text_embed(timestep, pooled_projections)  # (B, D)
        ctx = tr.context_embedder(encoder_hidden_states)  # (B, T, D)
        joint_rope = tr.pos_embed(torch.cat([txt_ids, img_ids], dim=0))  # (cos, sin) each (T + N, hd)
        text_len = ctx.shape[1]
        image_rope = (joint_rope[0][text_len:], joint_rope[1][text_len:])
        rope = (None, joint_rope, image_rope)

        cond = conditioning if conditioning is not None and conditioning.num_refs > 0 else None
        if cond is not None:
            cond = cond.to(device=x.device, dtype=x.dtype)
            if cond.grid[0] * cond.grid[1] != x.shape[1]:
                raise ValueError(f"conditioning grid {cond.grid} does not match {x.shape[1]} image tokens")
        adapter = self.adapter
        layout_rows = None
        if cond is not None and layout_active and adapter.assemble and cond.packing.num_groups > 0:
            layout_rows = cond.rows  # built once per scene by `prepare`, for one batch size and call budget
            if (
                layout_rows is None
                or cond.alpha.shape[0] != x.shape[0]
                or (layout_rows.max_buckets, layout_rows.path) != (self.assemble_calls, self.assemble_path)
            ):
                layout_rows = self._plan(cond, x.shape[0] * x.shape[1])
        feedback = None
        for b, block in enumerate(tr.transformer_blocks):
            inputs = BlockInputs(cond, rows=layout_rows)
            if cond is not None:
                mod_in = cond.shared_offsets if feedback is None else cond.shared_offsets + feedback
                img_off, txt_off = adapter.modulation_head.double_offsets(b, mod_in)
                inputs.image_offsets, inputs.text_offsets = img_off, txt_off
                if layout_active and str(b) in adapter.assemble:
                    inputs.assemble = adapter.assemble[str(b)]
            ctx, x = self._run(double_block_forward, block, x, ctx, temb, rope, inputs)
            if cond is not None and b < len(tr.transformer_blocks) - 1:
                feedback = adapter.feedback_bridge(b, x, cond.pool_weights, cond.foreground)
        for b, block in enumerate(tr.single_transformer_blocks):
            inputs = BlockInputs(cond)
            if cond is not None:
                inputs.image_offsets = adapter.modulation_head.single_offsets(b, cond.shared_offsets)
            ctx, x = self._run(single_block_forward, block, x, ctx, temb, rope, inputs)
        x = tr.norm_out(x, temb)
        return tr.proj_out(x)

    def plain_forward(self, *args, **kwargs) -> torch.Tensor:
        """The stock diffusers forward, for comparisons and benchmarks."""
        return self.transformer(*args, return_dict=False, **kwargs)[0]
