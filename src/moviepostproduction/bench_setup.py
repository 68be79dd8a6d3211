"""What `bench` measures: the model (FLUX.1-dev width, few blocks), its inputs and crowded random scenes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .conditioning import RefBatch
from .sampling import latent_image_ids, text_ids

CAPTION_TOKENS = 4  # text tokens of each ref's caption span (text-stream modulation)


@dataclass(frozen=True)
class BenchShape:
    """Transformer size. Defaults: FLUX.1-dev width (24 heads x 128 = 3072) with 1 double + 1 single block."""

    heads: int = 24
    head_dim: int = 128
    double_blocks: int = 1
    single_blocks: int = 1
    joint_dim: int = 4096  # T5-XXL width
    pooled_dim: int = 768  # CLIP-L pooled width
    in_channels: int = 64  # packed 2x2 x 16-channel latent
    rope_axes: tuple[int, int, int] = (16, 56, 56)

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def tiny(self) -> BenchShape:
        """The same layout at test size (D = 32)."""
        return replace(self, heads=2, head_dim=16, joint_dim=32, pooled_dim=16, rope_axes=(4, 6, 6))


def token_grid(tokens: int) -> tuple[int, int]:
    """The most square (H, W) with H * W == tokens and H <= W: 4096 -> (64, 64), 8192 -> (64, 128)."""
    h = max(d for d in range(1, int(tokens**0.5) + 1) if tokens % d == 0)
    return h, tokens // h


def coverage_boxes(refs: int, coverage: float, gen: torch.Generator) -> torch.Tensor:
    """(refs, 4) boxes whose union is exactly the left `coverage` strip of the image.

    The first min(refs, 4) refs tile the strip (large, background-like refs); the others are random boxes
    inside it, 15-45 % of its sides, so they overlap as the refs of a crowded scene do.
    """
    tiles = min(refs, 4)
    rows, cols = {0: (1, 1), 1: (1, 1), 2: (2, 1), 3: (3, 1), 4: (2, 2)}[tiles]
    boxes = [
        [coverage * c / cols, r / rows, coverage * (c + 1) / cols, (r + 1) / rows]
        for r in range(rows)
        for c in range(cols)
    ][:tiles]
    extra = refs - tiles
    size = (0.15 + 0.3 * torch.rand(extra, 2, generator=gen)) * torch.tensor([coverage, 1.0])  # (E, 2)
    lo = torch.rand(extra, 2, generator=gen) * (torch.tensor([coverage, 1.0]) - size)  # (E, 2)
    return torch.cat([torch.tensor(boxes).view(tiles, 4), torch.cat([lo, lo + size], dim=-1)])  # (refs, 4)


def bench_refs(refs: int, cfg, coverage: float, text_tokens: int, seed: int) -> RefBatch:
    """One sample with `refs` refs: coverage boxes, random depths and features, a caption span each."""
    gen = torch.Generator().manual_seed(seed)
    spans = torch.zeros(1, refs, text_tokens, dtype=torch.bool)
    for r in range(refs):
        spans[0, r, [(CAPTION_TOKENS * r + j) % text_tokens for j in range(CAPTION_TOKENS)]] = True
    return RefBatch(
        bboxes=coverage_boxes(refs, coverage, gen)[None],  # (1, R, 4)
        depth=torch.randint(0, 3, (1, refs), generator=gen),
        valid=torch.ones(1, refs, dtype=torch.bool),
        clip=torch.randn(1, refs, cfg.clip_dim, generator=gen),
        dino=torch.randn(1, refs, cfg.dino_dim, generator=gen),
        text_spans=spans,
    )


def build_model(shape: BenchShape, max_refs: int):
    """Random-init stock FluxTransformer2DModel of `shape` wrapped, with a fresh adapter, in ConditionedFlux."""
    from diffusers import FluxTransformer2DModel

    from .backbones.flux import ConditionedFlux
    from .modules import CompositionAdapter, ConditioningConfig

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=shape.in_channels,
        num_layers=shape.double_blocks,
        num_single_layers=shape.single_blocks,
        attention_head_dim=shape.head_dim,
        num_attention_heads=shape.heads,
        joint_attention_dim=shape.joint_dim,
        pooled_projection_dim=shape.pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=shape.rope_axes,
    )
    adapter = CompositionAdapter(ConditioningConfig.for_transformer(transformer, max_refs=max(max_refs, 1)))
    return ConditionedFlux(transformer, adapter).eval()


def make_inputs(shape: BenchShape, grid: tuple[int, int], text_len: int, device, dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    tensors = dict(
        hidden_states=torch.randn(1, h * w, shape.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, text_len, shape.joint_dim, generator=gen),
        pooled_projections=torch.randn(1, shape.pooled_dim, generator=gen),
        timestep=torch.rand(1, generator=gen),
        img_ids=latent_image_ids(h, w),
        txt_ids=text_ids(text_len),
        guidance=torch.full((1,), 3.5),
    )
    return {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}


def refs_to(refs: RefBatch, device: torch.device, dtype: torch.dtype) -> RefBatch:
    moved = {k: v.to(device, dtype if v.is_floating_point() else None) for k, v in vars(refs).items()}
    return RefBatch(**moved)
