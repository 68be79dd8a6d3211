"""What a scene needs at every denoising step, built once per scene: text embeddings, reference features and the
adapter's conditioning with its Assemble-Attn rows (DESIGN 3, caching). Shared by compose, panorama scenes and fill
with refs; the pipelines only sample from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from moviepostproduction.compose.conditioning import Conditioning, RefBatch, without_modulation
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import DEPTHS
from moviepostproduction.encoders import ImageEmbeddings, ImageEncoder, TextEmbeddings, TextEncoder
from moviepostproduction.encoders.offload import compute_dtype, execution_device
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.scene import Scene

TOKEN_PIXELS = 16  # VAE 8x downsampling x FLUX 2x2 packing

RefCache = dict[tuple[str, int], ImageEmbeddings]  # per image file (path, mtime): its embeddings without the R dim


@dataclass
class PreparedScene:
    """Everything a scene needs at every step; built once per scene (DESIGN 3, caching)."""

    text: TextEmbeddings
    conditioning: Conditioning
    negative: TextEmbeddings | None = None
    negative_conditioning: Conditioning | None = None
    grid: tuple[int, int] = (0, 0)
    alphas: list[float] = field(default_factory=list)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValidationError([Problem(name, "NaN/Inf", "contains non-finite values")])


def encode_references(image_encoder: ImageEncoder, scene: Scene, cache: RefCache) -> ImageEmbeddings:
    """(R, C) CLIP embeds, (R, G) DINO CLS and (R, P, G) DINO patch tokens; each distinct image file is encoded
    once (storyboards share `cache`)."""
    keys = [(str(r.image), r.image.stat().st_mtime_ns) for r in scene.refs]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        images = scene.load_ref_images()
        emb: ImageEmbeddings = image_encoder.encode([images[i] for i in todo])
        for j, i in enumerate(todo):
            cache[keys[i]] = ImageEmbeddings(emb.clip[j], emb.dino_cls[j], emb.dino_patches[j])
    if not keys:
        return image_encoder.encode([])
    return ImageEmbeddings(*(torch.stack([getattr(cache[k], f.name) for k in keys]) for f in fields(ImageEmbeddings)))


def ref_batch(scene: Scene, emb: ImageEmbeddings, spans: list, text_len: int, patches: bool) -> RefBatch:
    """One scene's refs as a batch of 1: boxes, depth labels, features and caption spans (1, R, T)."""
    n = len(scene.refs)
    check_finite("refs (CLIP features)", emb.clip)
    check_finite("refs (DINO features)", emb.dino_cls)
    if patches:
        check_finite("refs (DINO patch features)", emb.dino_patches)
    text_spans = torch.zeros(1, n, text_len, dtype=torch.bool)
    for i, span in enumerate(spans):
        if span is not None:
            text_spans[0, i, span[0] : span[1]] = True
    return RefBatch(
        bboxes=torch.tensor([[list(r.bbox) for r in scene.refs]], dtype=torch.float32).view(1, n, 4),
        depth=torch.tensor([[DEPTHS.index(r.depth) for r in scene.refs]], dtype=torch.long).view(1, n),
        valid=torch.ones(1, n, dtype=torch.bool),
        clip=emb.clip[None].float().cpu(),
        dino=emb.dino_cls[None].float().cpu(),
        text_spans=text_spans,
        dino_patches=emb.dino_patches[None].float().cpu() if patches else None,
    )


def _stack(values: list[torch.Tensor | None], batch: int) -> torch.Tensor | None:
    """Scenes' (1, ...) tensors -> (S x batch, ...), scene-major; None where the field is absent."""
    if any(v is None for v in values):
        return None
    return torch.cat(values).repeat_interleave(batch, dim=0)


@torch.no_grad()
def prepare_scene(
    model: ConditionedFlux,
    text_encoder: TextEncoder,
    scene: Scene | Sequence[Scene],
    emb: ImageEmbeddings | Sequence[ImageEmbeddings],
    *,
    max_text_tokens: int,
    negative_prompt: str | None = None,
    use_modulation: bool = True,
    layout_rows: bool = True,
    batch: int = 1,
) -> PreparedScene:
    """The scene's caption (with each ref's caption span), its refs and, for true CFG, the negative prompt with the
    same refs, as the model will read them at every step. `use_modulation=False` is the layout-only ablation;
    `layout_rows=False` leaves out the Assemble-Attn rows (`ConditionedFlux.prepare`); `batch` > 1 conditions that many
    images of the scene at once (the text stays one row per scene: the caller repeats it). A list of scenes of one
    size and one ref count (a storyboard's) is prepared as one batch: scene after scene, each its `batch` images."""
    device, dtype = execution_device(model), compute_dtype(model)  # with offload / quantized weights too
    scenes = [scene] if isinstance(scene, Scene) else list(scene)
    embs = [emb] if isinstance(emb, ImageEmbeddings) else list(emb)
    shapes = sorted({(sc.height, sc.width, len(sc.refs)) for sc in scenes})
    if len(shapes) != 1 or len(embs) != len(scenes):
        raise ValueError(f"scenes prepared as one batch need one size and ref count each, got {shapes}")
    grid = (scenes[0].height // TOKEN_PIXELS, scenes[0].width // TOKEN_PIXELS)
    texts, parts = [], []
    for sc, e in zip(scenes, embs, strict=True):
        text, spans, _ = text_encoder.encode_spans(sc.caption, [r.caption for r in sc.refs], max_text_tokens)
        texts.append(text)
        parts.append(ref_batch(sc, e, spans, text.t5.shape[1], model.adapter.uses_box_patches))
    text = TextEmbeddings(*(torch.cat([getattr(t, f.name) for t in texts]) for f in fields(TextEmbeddings)))
    # (S scenes x batch images, R, ...): each scene's images next to each other, as diffusers orders prompts' images
    refs = RefBatch(**{f.name: _stack([getattr(r, f.name) for r in parts], batch) for f in fields(RefBatch)})

    def condition(text_len: int) -> Conditioning:
        cond = model.prepare(refs.to(device, dtype), grid, text_len, layout_rows=layout_rows)
        return cond if use_modulation else without_modulation(cond)

    cond = condition(text.t5.shape[1])
    prepared = PreparedScene(text=text, conditioning=cond, grid=grid, alphas=cond.alpha[0].tolist())
    if negative_prompt is not None:
        prepared.negative = text_encoder.encode([negative_prompt], max_text_tokens)
        refs.text_spans = None
        prepared.negative_conditioning = condition(prepared.negative.t5.shape[1])
    return prepared
