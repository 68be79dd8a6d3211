"""Resolution buckets: samples of any size and aspect ratio trained at a few fixed sizes of about equal area.

As the SDXL and FLUX trainers do (SDXL report, section 2.3 "multi-aspect training"), every bucket holds about
`area` pixels with sides that are multiples of `step`; a sample goes to the bucket whose aspect ratio is nearest its
own (compared in log space, so 2:1 and 1:2 are equally far from 1:1), is scaled to cover it and centre-cropped.
Batches are drawn from one bucket at a time, so every batch stacks. In training, the feature cache fits each target
to its bucket when it is built (`fit_bucket`, training/feature_cache.py) with the recipe's `BucketSpec`
(training/cache_key.py: `auto` reads the split's sizes from its scene files, `target_sizes`). With `buckets: native`
(`NATIVE`) every target keeps its own size and is its own bucket: a data set made of a few sizes (the toy world's
128 px scenes beside its 320 px dense ones) trains at each of them, one size per batch.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.errors import MppError, Problem, ValidationError

Bucket = tuple[int, int]  # (width, height) in pixels


def make_buckets(area: int = 1024 * 1024, step: int = 64, max_ratio: float = 4.0) -> list[Bucket]:
    """Every (width, height) with sides multiples of `step`, width * height <= `area` and the larger side at most
    `max_ratio` times the smaller: for each width, the largest height that fits. Sorted by aspect ratio (w / h).
    make_buckets() holds 1024x1024, 1152x896, 1216x832, 1344x768, 1536x640, ... and their transposes."""
    if area < step * step or step < 16 or step % 16 or max_ratio < 1:
        message = "need area >= step^2, step a multiple of 16, max_ratio >= 1"
        raise ValidationError([Problem("buckets", (area, step, max_ratio), message)])
    buckets: set[Bucket] = set()
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) <= max_ratio * min(width, height):
            buckets.add((width, height))
    return sorted(buckets, key=lambda b: b[0] / b[1])


def bucket_for(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest `width / height` (|log ratio| difference); a tie goes to the bucket
    of larger area, then the wider one."""
    if width <= 0 or height <= 0:
        raise ValidationError([Problem("size", (width, height), "must be positive")])
    if not buckets:
        raise ValidationError([Problem("buckets", buckets, "must hold at least one (width, height)")])
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - aspect), 12), -b[0] * b[1], -b[0]))


def native_size_problem(width: int, height: int, multiple: int) -> str | None:
    """Why a target cannot train at its own size (`buckets: native`), None when it can: both sides must be
    multiples of `multiple` pixels (the VAE's downsampling times the patch size: 16 for FLUX)."""
    if width % multiple or height % multiple:
        return f"{width}x{height} px: with buckets: native both sides must be multiples of {multiple}"
    return None


def cover_crop(width: int, height: int, bucket: Bucket) -> tuple[float, float, float]:
    """How a `width` x `height` image fills `bucket`: (scale, left, top): scaled by `scale` to cover it, then the
    bucket's window starts at (left, top) pixels of the scaled image (centred)."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return scale, (width * scale - bucket[0]) / 2, (height * scale - bucket[1]) / 2


def bucket_bbox(
    bbox: tuple[float, float, float, float], width: int, height: int, bucket: Bucket
) -> tuple[float, float, float, float] | None:
    """A box normalised to the `width` x `height` image, normalised to the bucket's window after `cover_crop`
    (clipped to it); None when the crop leaves none of it."""
    scale, left, top = cover_crop(width, height, bucket)
    x0, y0, x1, y1 = bbox
    box = (
        (x0 * width * scale - left) / bucket[0],
        (y0 * height * scale - top) / bucket[1],
        (x1 * width * scale - left) / bucket[0],
        (y1 * height * scale - top) / bucket[1],
    )
    x0, y0, x1, y1 = (min(max(v, 0.0), 1.0) for v in box)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


NATIVE = "native"  # recipe `buckets: native`: every target is its own bucket, trained at the size it has
DEFAULT_AREA = 1024 * 1024  # FLUX.1's training resolution
SMALL_AREA = 256 * 256  # below it the automatic buckets step by 16 pixels, not 64


@dataclass(frozen=True)
class BucketSpec:
    """The buckets of a training cache (recipe `buckets:`): `make_buckets(area, step, max_ratio)`."""

    area: int = DEFAULT_AREA
    step: int = 64
    max_ratio: float = 4.0

    def __post_init__(self):
        make_buckets(self.area, self.step, self.max_ratio)  # the one-line ValidationError of a bad spec

    @property
    def buckets(self) -> list[Bucket]:
        return make_buckets(self.area, self.step, self.max_ratio)

    @property
    def key(self) -> str:
        """The spec as the cache key names it: `area/step/max_ratio`."""
        return f"{self.area}/{self.step}/{self.max_ratio:g}"

    @classmethod
    def auto(cls, largest: int) -> BucketSpec:
        """The default for a split whose largest target holds `largest` pixels: DEFAULT_AREA, or when that target
        is smaller the largest square of `step`-multiple sides within its area (so no split is upscaled past its
        largest target, and a square bucket exists), stepping by 64 pixels (16 below SMALL_AREA; at least 16^2)."""
        area = min(DEFAULT_AREA, largest)
        step = 64 if area >= SMALL_AREA else 16
        side = max(16, math.isqrt(area) // step * step)
        return cls(area=side * side, step=step)


def target_sizes(split: str | Path, limit: int | None = None) -> list[tuple[int, int]]:
    """(width, height) of the first `limit` targets (all for None) of a real-data split, read from the scene files
    alone: the tar members of the images and refs are skipped over, never read."""
    from moviepostproduction.datasets.real_format import SHARD_READ_ERRORS, unreadable_shard

    sizes: list[tuple[int, int]] = []
    for file in sorted(Path(split).glob("shard-*.tar")):
        try:
            with tarfile.open(file, "r") as tar:
                for member in tar:
                    if limit is not None and len(sizes) >= limit:
                        return sizes
                    if member.isfile() and member.name.endswith(".scene.json"):
                        scene = json.loads(tar.extractfile(member).read())
                        sizes.append((int(scene["width"]), int(scene["height"])))
        except SHARD_READ_ERRORS as exc:
            raise unreadable_shard(file, exc) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise MppError(f"{file}: a scene file without a readable width and height ({exc})") from None
    return sizes


def fit_bucket(
    image: np.ndarray, bboxes: np.ndarray, buckets: list[Bucket]
) -> tuple[np.ndarray, list[tuple[float, float, float, float] | None]]:
    """A target (H, W, 3) uint8 in its bucket: scaled to cover it and centre-cropped in one resampling (the crop
    window of `cover_crop` read off the source, so pixels and `bucket_bbox` boxes agree to the sub-pixel); each box
    (R, 4) normalised mapped into the bucket, None where the crop leaves none of it."""
    height, width = image.shape[:2]
    bucket = bucket_for(width, height, buckets)
    scale, left, top = cover_crop(width, height, bucket)
    boxes = [bucket_bbox(tuple(float(v) for v in box), width, height, bucket) for box in bboxes]
    if bucket == (width, height):  # already the bucket's size: the pixels as they are
        return image, boxes
    window = (left / scale, top / scale, (left + bucket[0]) / scale, (top + bucket[1]) / scale)  # source pixels
    pixels = Image.fromarray(image).resize(bucket, Image.Resampling.LANCZOS, box=window)
    return np.array(pixels), boxes
