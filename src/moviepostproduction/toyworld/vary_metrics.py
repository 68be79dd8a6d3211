"""Validation metrics of `mpp vary` (seed 003): reconstruction with own features, feature swap, text only; and the
per-variation readings of `mpp eval-vary` (toyworld/vary_eval.py): shape / colour kept, layout, similarity, diversity.

Images are batches (B, H, W, C) of uint8 or floats in [0, 1] (anything `np.asarray` accepts); errors are mean
squared differences in [0, 1] units, one per sample. Each metric answers one question about a trained NanoDiT:
- reconstruction: generated from an image's own DINO features (and caption), how far is it from that image?
- feature swap: generated from image B's features with image A's caption, does it follow B (the features)?
- text only: with the image dropped, how much further from the target is it (what the image features add),
  and does it still show the caption's colour?
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moviepostproduction.toyworld.regions import largest_component
from moviepostproduction.toyworld.sprite_match import classify_shape, colour_mask, sprite_colour
from moviepostproduction.toyworld.sprites import mask_bbox

__all__ = [
    "SwapScore",
    "TextOnlyScore",
    "VariationReading",
    "colour_presence",
    "cosine_similarity",
    "feature_diversity",
    "feature_swap",
    "pixel_diversity",
    "read_variation",
    "reconstruction_error",
    "sprite_box_on_white",
    "text_only",
]


def _batch(images: object, name: str) -> np.ndarray:
    arr = np.asarray(images)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    if arr.ndim != 4:
        raise ValueError(f"{name} must be a (B, H, W, C) batch of images, got shape {arr.shape}")
    return arr.astype(np.float64) / scale


def reconstruction_error(generated: object, reference: object) -> np.ndarray:
    """(B,) mean squared error between each generated image and its reference, in [0, 1] units."""
    a, b = _batch(generated, "generated"), _batch(reference, "reference")
    if a.shape != b.shape:
        raise ValueError(f"generated {a.shape} and reference {b.shape} differ in shape")
    return ((a - b) ** 2).mean(axis=(1, 2, 3))


@dataclass(frozen=True)
class SwapScore:
    to_features: float  # mean error to the image whose DINO features were used
    to_caption: float  # mean error to the image whose caption was used
    follows_features: float  # fraction of samples closer to the feature source than to the caption source


def feature_swap(generated: object, feature_source: object, caption_source: object) -> SwapScore:
    """Images generated from `feature_source`'s features and `caption_source`'s caption, judged against both.

    A model that takes identity from the features scores follows_features near 1; one that ignores them near 0.
    Ties (equally close to both) count one half.
    """
    to_feat = reconstruction_error(generated, feature_source)
    to_cap = reconstruction_error(generated, caption_source)
    follows = np.where(to_feat < to_cap, 1.0, np.where(to_feat == to_cap, 0.5, 0.0))
    return SwapScore(float(to_feat.mean()), float(to_cap.mean()), float(follows.mean()))


@dataclass(frozen=True)
class TextOnlyScore:
    error_text_only: float  # mean error to the target with the image dropped
    error_with_image: float  # mean error to the target with the image features too
    image_gain: float  # error_text_only - error_with_image: > 0 when the image features carry information


def text_only(text_only_images: object, with_image: object, target: object) -> TextOnlyScore:
    """Compare generations without and with the image features against the same targets."""
    without = float(reconstruction_error(text_only_images, target).mean())
    with_img = float(reconstruction_error(with_image, target).mean())
    return TextOnlyScore(without, with_img, without - with_img)


def colour_presence(images: object, colours: Sequence[str], min_fraction: float = 0.01) -> float:
    """Fraction of toy-world images in which the named sprite colour (e.g. the caption's) covers at least
    `min_fraction` of the pixels (`colour_mask`: base colour, pattern tint or their blend)."""
    batch = np.asarray(images)
    if batch.ndim != 4 or len(batch) != len(colours):
        raise ValueError(f"expected {len(colours)} images (B, H, W, 3) for {len(colours)} colours, got {batch.shape}")
    if batch.dtype != np.uint8:
        batch = (np.clip(batch, 0.0, 1.0) * 255).round().astype(np.uint8)
    found = [colour_mask(img, c).mean() >= min_fraction for img, c in zip(batch, colours, strict=True)]
    return float(np.mean(found))


# ------------------------------------------------------------------------------------------ mpp eval-vary
@dataclass(frozen=True)
class VariationReading:
    """What one image shows of a sprite of known (shape, colour)."""

    colour: str | None  # the dominant named sprite colour of the whole image (None: no sprite pixels)
    shape: str | None  # shape class of the largest region of the *expected* colour (None: that colour is absent)
    box: tuple[float, float, float, float] | None  # normalised xyxy box of that region

    def kept(self, shape: str, colour: str) -> tuple[bool, bool]:
        """(shape kept, colour kept) against the sprite's labels."""
        return self.shape == shape, self.colour == colour


def read_variation(image: np.ndarray, colour: str) -> VariationReading:
    """Read an (H, W, 3) uint8 image for a sprite of `colour`: colour kept means that colour is the image's dominant
    sprite colour (another sprite taking over the picture is a miss); the shape and the box are read from the
    largest connected region of that colour (`colour_mask`: base, pattern tint or their blend), as in `mpp eval`."""
    region = largest_component(colour_mask(image, colour))
    found = region.sum() >= 4  # sprite_match's least sprite (fewer pixels are anti-aliasing or noise)
    return VariationReading(
        sprite_colour(image),
        classify_shape(region) if found else None,
        mask_bbox(region) if found else None,
    )


def sprite_box_on_white(image: np.ndarray, threshold: int = 250) -> tuple[float, float, float, float] | None:
    """Normalised xyxy box of a sprite drawn on white (a toy-world reference image): every pixel with a channel
    below `threshold` (anti-aliased edges included); None for a blank image."""
    return mask_bbox((np.asarray(image)[..., :3] < threshold).any(axis=-1))


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(...,) cosine of the last axis of `a` and `b` (broadcast), e.g. DINO CLS (B, G) against (B, G)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(norm, 1e-12)


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 2:
        raise ValueError(f"diversity needs at least 2 variations, got {n}")
    return np.triu_indices(n, k=1)


def feature_diversity(features: np.ndarray) -> float:
    """Mean over the pairs of S >= 2 variations of one ref of 1 - cosine of their features (S, G): 0 when all are
    the same image, up to 2 for opposite features (DINO CLS: what the image encoder sees as different)."""
    f = np.asarray(features, dtype=np.float64)
    i, j = _pairs(len(f))
    return float((1.0 - cosine_similarity(f[i], f[j])).mean())


def pixel_diversity(images: object) -> float:
    """Mean over the pairs of S >= 2 variations (S, H, W, C) of the RMS pixel difference in [0, 1] units: 0 when
    all are the same image, 1 between black and white."""
    batch = _batch(images, "images")
    i, j = _pairs(len(batch))
    return float(np.sqrt(((batch[i] - batch[j]) ** 2).mean(axis=(1, 2, 3))).mean())
