"""What `bench` measures: the model (FLUX.1-dev width, few blocks), the image encoders, inputs, crowded scenes."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from moviepostproduction.compose.conditioning import RefBatch
from moviepostproduction.sampling import latent_image_ids, text_ids

CAPTION_TOKENS = 4  # text tokens of each ref's caption span (text-stream modulation)


@dataclass(frozen=True)
class BenchShape:
    """Model sizes. Defaults: FLUX.1-dev width (24 heads x 128 = 3072) with 1 double + 1 single block, the
    adapter's FLUX.1-dev config, and the reference encoders at full size (CLIP ViT-L/14 and DINOv2-L, 224 px)."""

    heads: int = 24
    head_dim: int = 128
    double_blocks: int = 1
    single_blocks: int = 1
    joint_dim: int = 4096  # T5-XXL width
    pooled_dim: int = 768  # CLIP-L pooled width
    in_channels: int = 64  # packed 2x2 x 16-channel latent
    rope_axes: tuple[int, int, int] = (16, 56, 56)
    clip_dim: int = 768  # C: CLIP ViT-L/14 image embeds
    dino_dim: int = 1024  # G: DINOv2-L width
    instance_dim: int = 1024
    encoder_layers: int = 24  # ViT-L: 24 layers of 1024 (CLIP's width = DINO's = dino_dim), 16 heads, MLP 4x
    encoder_heads: int = 16
    image_size: int = 224
    patch_size: int = 14

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    def tiny(self) -> BenchShape:
        """The same layout at test size (D = 32)."""
        return replace(
            self,
            heads=2,
            head_dim=16,
            joint_dim=32,
            pooled_dim=16,
            rope_axes=(4, 6, 6),
            clip_dim=16,
            dino_dim=24,
            instance_dim=32,
            encoder_layers=1,
            encoder_heads=2,
            image_size=28,
        )

    @property
    def encoder_name(self) -> str:
        return f"CLIP + DINOv2 ViTs ({self.encoder_layers} x {self.dino_dim}, /{self.patch_size}, {self.image_size} px)"


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


def large_boxes(refs: int, gen: torch.Generator, smallest: float = 0.25) -> torch.Tensor:
    """(refs, 4) boxes each covering a uniform `smallest`-100 % of the frame's area, placed anywhere inside it (so
    they overlap heavily): the crowded scene whose per-box attention costs far more than one full attention."""
    area = smallest + (1 - smallest) * torch.rand(refs, generator=gen)  # (refs,)
    width = area + (1 - area) * torch.rand(refs, generator=gen)  # in [area, 1], so height = area / width <= 1
    size = torch.stack([width, area / width], dim=-1)  # (refs, 2)
    lo = torch.rand(refs, 2, generator=gen) * (1 - size)
    return torch.cat([lo, lo + size], dim=-1)


BOXES = ("small", "large")  # coverage_boxes (inside the covered strip) or large_boxes (25-100 % of the frame each)


def bench_refs(
    refs: int, cfg, coverage: float, text_tokens: int, seed: int, batch: int = 1, boxes: str = "small"
) -> RefBatch:
    """`batch` samples with `refs` refs each: coverage boxes (the random ones past the strip's tiles drawn per sample)
    or, with `boxes="large"`, `large_boxes` (coverage unused), random depths and features, a caption span each.
    Sample 0's boxes do not depend on the batch size."""
    gen = torch.Generator().manual_seed(seed)
    spans = torch.zeros(batch, refs, text_tokens, dtype=torch.bool)
    for r in range(refs):
        spans[:, r, [(CAPTION_TOKENS * r + j) % text_tokens for j in range(CAPTION_TOKENS)]] = True

    def draw() -> torch.Tensor:
        return large_boxes(refs, gen) if boxes == "large" else coverage_boxes(refs, coverage, gen)

    return RefBatch(
        bboxes=torch.stack([draw() for _ in range(batch)]),  # (B, R, 4)
        depth=torch.randint(0, 3, (batch, refs), generator=gen),
        valid=torch.ones(batch, refs, dtype=torch.bool),
        clip=torch.randn(batch, refs, cfg.clip_dim, generator=gen),
        dino=torch.randn(batch, refs, cfg.dino_dim, generator=gen),
        text_spans=spans,
    )


def build_model(shape: BenchShape, max_refs: int):
    """Random-init stock FluxTransformer2DModel of `shape` wrapped, with a fresh adapter, in ConditionedFlux."""
    from diffusers import FluxTransformer2DModel

    from moviepostproduction.compose.flux import ConditionedFlux
    from moviepostproduction.compose.modules import CompositionAdapter, ConditioningConfig

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
    cfg = ConditioningConfig.for_transformer(
        transformer,
        max_refs=max(max_refs, 1),
        clip_dim=shape.clip_dim,
        dino_dim=shape.dino_dim,
        instance_dim=shape.instance_dim,
    )
    return ConditionedFlux(transformer, CompositionAdapter(cfg)).eval()


def build_image_encoder(shape: BenchShape):
    """Random-init `ImageEncoder` of the reference encoders' sizes (the cost is the same as with real weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    from moviepostproduction.encoders import ImageEncoder
    from moviepostproduction.encoders.preprocess import BICUBIC, ImagePreprocess

    common = dict(
        hidden_size=shape.dino_dim,
        num_hidden_layers=shape.encoder_layers,
        num_attention_heads=shape.encoder_heads,
        image_size=shape.image_size,
        patch_size=shape.patch_size,
    )
    clip = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**common, intermediate_size=4 * shape.dino_dim, projection_dim=shape.clip_dim)
    )
    dino = Dinov2Model(Dinov2Config(**common, mlp_ratio=4))
    side = (shape.image_size, shape.image_size)
    clip_pre = ImagePreprocess(side, side, BICUBIC, 1 / 255, (0.481, 0.458, 0.408), (0.269, 0.261, 0.276))
    dino_pre = ImagePreprocess(side, side, BICUBIC, 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return ImageEncoder(clip, clip_pre, dino, dino_pre)


def make_inputs(
    shape: BenchShape, grid: tuple[int, int], text_len: int, device, dtype, seed: int, batch: int = 1
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    tensors = dict(
        hidden_states=torch.randn(batch, h * w, shape.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, shape.joint_dim, generator=gen),
        pooled_projections=torch.randn(batch, shape.pooled_dim, generator=gen),
        timestep=torch.rand(batch, generator=gen),
        img_ids=latent_image_ids(h, w),
        txt_ids=text_ids(text_len),
        guidance=torch.full((batch,), 3.5),
    )
    return {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
