"""Resolution buckets: samples of any size and aspect ratio trained at a few fixed sizes of about equal area.

As the SDXL and FLUX trainers do (SDXL report, section 2.3 "multi-aspect training"), every bucket holds about
`area` pixels with sides that are multiples of `step`; a sample goes to the bucket whose aspect ratio is nearest its
own (compared in log space, so 2:1 and 1:2 are equally far from 1:1), is scaled to cover it and centre-cropped.
Batches are drawn from one bucket at a time, so every batch stacks.
"""

from __future__ import annotations

import math

from moviepostproduction.errors import Problem, ValidationError

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
