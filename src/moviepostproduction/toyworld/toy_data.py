"""Training data of the toy encoders, drawn from the toy world (toyworld/synthetic.py) and prepared exactly as the
loaders prepare inference inputs: image encoders see `ImagePreprocess` output of PIL images (encoders.py), text
encoders see the tokenizers' fixed-length ids, the VAE sees pixels in [-1, 1].

Everything is a pure function of (seed, split, scene count), so a pool rebuilt later is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from moviepostproduction.encoders import find_caption_spans
from moviepostproduction.encoders.preprocess import ImagePreprocess
from moviepostproduction.toyworld.backgrounds import BACKGROUNDS
from moviepostproduction.toyworld.synthetic import (
    COLOURS,
    DEPTHS,
    PATTERNS,
    SHAPES,
    ToyScene,
    ToyWorldConfig,
    generate_scene,
)

__all__ = [
    "ATTRIBUTES",
    "IGNORE",
    "CaptionPool",
    "SpritePool",
    "build_caption_pool",
    "build_sprite_pool",
    "generate_scenes",
    "permute_channels",
    "scene_pixels",
]

# attribute -> class names; "none" (index len(names)) marks patches / tokens that show no sprite.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "pattern": PATTERNS,
    "depth": DEPTHS,
    "background": tuple(BACKGROUNDS),
}
IGNORE = -100  # cross-entropy ignore index (padding tokens)
SPRITE_PATCH_FRACTION = 0.4  # a patch "shows" the sprite when at least this much of it is covered
CROP_MARGIN = 1.15  # scene crops: square side = longest bbox side x this


def generate_scenes(seed: int, n: int, split: str, world: ToyWorldConfig | None = None) -> list[ToyScene]:
    return [generate_scene(i, seed, world, split=split) for i in range(n)]


def scene_pixels(scenes: Sequence[ToyScene]) -> torch.Tensor:
    """(N, 3, H, W) uint8 scene images (the VAE pool; 128 px scenes cost 48 KiB each)."""
    return torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).contiguous()


@dataclass
class SpritePool:
    """One row per sprite view: a reference image (on white) or a crop of the scene around the sprite."""

    clip_pixels: torch.Tensor  # (N, 3, S, S) float32: CLIP preprocess output
    dino_pixels: torch.Tensor  # (N, 3, S, S) float32: DINO preprocess output
    labels: dict[str, torch.Tensor]  # attribute -> (N,) long: colour, shape, pattern
    patch_labels: dict[str, torch.Tensor]  # colour / shape -> (N, P) long, "none" where no sprite shows
    captions: list[str]  # "a red striped star"
    is_crop: torch.Tensor  # (N,) bool: scene crop (True) or reference image (False)
    clip_pre: ImagePreprocess | None = None  # the preprocessing behind clip_pixels / dino_pixels (to recolour)
    dino_pre: ImagePreprocess | None = None

    def __len__(self) -> int:
        return len(self.captions)


def _square_crop(scene: ToyScene, bbox: Sequence[float]) -> tuple[int, int, int]:
    """(left, top, side) of a square around a normalised xyxy box, kept inside the scene."""
    h, w = scene.labels.shape
    x0, y0, x1, y1 = bbox[0] * w, bbox[1] * h, bbox[2] * w, bbox[3] * h
    side = min(min(h, w), max(8, round(max(x1 - x0, y1 - y0) * CROP_MARGIN)))
    left = int(np.clip(round((x0 + x1 - side) / 2), 0, w - side))
    top = int(np.clip(round((y0 + y1 - side) / 2), 0, h - side))
    return left, top, side


def _patch_cover(mask: np.ndarray, pre: ImagePreprocess, patch: int) -> torch.Tensor:
    """(P,) fraction of each encoder patch covered by `mask`, after the preprocess resize and centre crop."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    h, w = pre.resized_hw(*mask.shape)
    m = F.interpolate(m, size=(h, w), mode="area")
    ch, cw = pre.output_hw
    top, left = (h - ch) // 2, (w - cw) // 2
    m = m[..., top : top + ch, left : left + cw]
    return F.avg_pool2d(m, patch).flatten()  # (P,)


def build_sprite_pool(
    scenes: Sequence[ToyScene],
    clip_pre: ImagePreprocess,
    dino_pre: ImagePreprocess,
    patch_size: int,
    *,
    min_visible: float = 0.6,
) -> SpritePool:
    """Reference images of every ref, plus a scene crop of every ref that is at least `min_visible` visible."""
    images: list[Image.Image] = []
    masks: list[np.ndarray] = []
    rows: list[tuple[str, str, str, str, bool]] = []
    for scene in scenes:
        for ref in scene.refs:
            images.append(Image.fromarray(ref.image))
            masks.append(ref.image.min(axis=-1) < 200)  # the sprite on white: every palette colour is darker
            rows.append((ref.colour, ref.shape, ref.pattern, ref.caption, False))
            if ref.visible >= min_visible:
                left, top, side = _square_crop(scene, ref.bbox)
                images.append(Image.fromarray(scene.image[top : top + side, left : left + side]))
                masks.append(ref.visible_mask[top : top + side, left : left + side])
                rows.append((ref.colour, ref.shape, ref.pattern, ref.caption, True))
    labels = {
        name: torch.tensor([ATTRIBUTES[name].index(r[k]) for r in rows], dtype=torch.long)
        for k, name in enumerate(("colour", "shape", "pattern"))
    }
    cover = torch.stack([_patch_cover(m, dino_pre, patch_size) for m in masks])  # (N, P)
    shows = cover >= SPRITE_PATCH_FRACTION
    patch_labels = {
        name: torch.where(shows, labels[name][:, None], len(ATTRIBUTES[name])) for name in ("colour", "shape")
    }
    return SpritePool(
        clip_pixels=clip_pre(images),
        dino_pixels=dino_pre(images),
        labels=labels,
        patch_labels=patch_labels,
        captions=[r[3] for r in rows],
        is_crop=torch.tensor([r[4] for r in rows]),
        clip_pre=clip_pre,
        dino_pre=dino_pre,
    )


# The five RGB channel orders other than the identity: a red sprite becomes green or blue, white stays white.
CHANNEL_ORDERS = torch.tensor([[0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def permute_channels(pixels: torch.Tensor, orders: torch.Tensor, pre: ImagePreprocess) -> torch.Tensor:
    """(B, 3, S, S) preprocessed pixels with each row's RGB channels reordered by orders (B, 3), in pixel space:
    un-normalise with `pre`'s mean / std, reorder, normalise again."""
    if pre.mean is None or pre.std is None:
        raise ValueError("permute_channels needs a preprocessing with mean and std")
    mean = torch.tensor(pre.mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    raw = pixels * std + mean
    index = orders.to(pixels.device)[:, :, None, None].expand_as(raw)
    return (raw.gather(1, index) - mean) / std


@dataclass
class CaptionPool:
    """Scene captions tokenised as TextEncoder does, with per-token labels of the sprite phrase they belong to."""

    clip_ids: torch.Tensor  # (N, 77) CLIP ids, padded to max_length
    t5_ids: torch.Tensor  # (N, T) T5 ids, padded to max_length
    token_labels: dict[
        str, torch.Tensor
    ]  # colour / shape / pattern / depth -> (N, T): "none" off phrases, IGNORE on pads
    labels: dict[str, torch.Tensor]  # background, colour / shape of the first (fg) ref -> (N,)
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def build_caption_pool(
    scenes: Sequence[ToyScene], clip_tokenizer: Any, t5_tokenizer: Any, t5_tokens: int
) -> CaptionPool:
    captions = [s.caption for s in scenes]
    pad = {"padding": "max_length", "truncation": True, "return_tensors": "pt"}  # as TextEncoder._ids
    clip_max = clip_tokenizer.model_max_length
    clip_ids = clip_tokenizer(captions, max_length=clip_max, **pad)["input_ids"]
    t5 = t5_tokenizer(captions, max_length=t5_tokens, **pad)
    token_names = ("colour", "shape", "pattern", "depth")
    token_labels = {n: torch.full(t5["input_ids"].shape, len(ATTRIBUTES[n]), dtype=torch.long) for n in token_names}
    for i, scene in enumerate(scenes):
        prompt, spans = find_caption_spans(t5_tokenizer, scene.caption, [r.caption for r in scene.refs], t5_tokens)
        if prompt != scene.caption:  # every ref caption is a phrase of the scene caption
            raise ValueError(f"scene {scene.index}: a ref caption is not in its caption {scene.caption!r}")
        for ref, (start, stop) in zip(scene.refs, spans, strict=True):
            for name in token_names:
                token_labels[name][i, start:stop] = ATTRIBUTES[name].index(getattr(ref, name))
    for name in token_names:
        token_labels[name][t5["attention_mask"] == 0] = IGNORE
    labels = {
        "background": torch.tensor([ATTRIBUTES["background"].index(s.background) for s in scenes]),
        "colour": torch.tensor([ATTRIBUTES["colour"].index(s.refs[0].colour) for s in scenes]),
        "shape": torch.tensor([ATTRIBUTES["shape"].index(s.refs[0].shape) for s in scenes]),
    }
    return CaptionPool(clip_ids, t5["input_ids"], token_labels, labels, captions)
