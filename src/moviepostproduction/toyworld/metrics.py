"""Metrics (DESIGN 8): bbox alignment (IoU, centre error), identity (toy world), leakage; the seam
ratio lives in panorama/seams.py and is re-exported here.

Boxes are normalised xyxy, batched over leading dimensions. A box with x0 > x1 wraps the panorama seam
(DESIGN 1): it covers [x0, 1) and [0, x1). Images are (H, W) or (H, W, C) arrays (numpy, or anything
`np.asarray` accepts); uint8 images are compared in [0, 1] units.
"""

from __future__ import annotations

import numpy as np

from moviepostproduction.panorama.seams import float_image as _image
from moviepostproduction.panorama.seams import seam_ratio
from moviepostproduction.toyworld.sprite_match import (
    classify_shape,
    classify_sprite,
    colour_match,
    identity_match,
    identity_parts,
    locate_sprite,
    shape_descriptor,
    sprite_colour,
)

__all__ = [
    "bbox_iou",
    "box_crop",
    "centre_error",
    "classify_shape",
    "classify_sprite",
    "colour_match",
    "identity_match",
    "identity_parts",
    "leakage",
    "locate_sprite",
    "locate_sprite_near",
    "seam_ratio",
    "shape_descriptor",
    "sprite_colour",
]


def _boxes(boxes: object) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have a last dimension of 4 (x0, y0, x1, y1), got shape {b.shape}")
    return b


def _x_pieces(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 2, 2): each box's x extent as two plain intervals [lo, hi] (the second empty unless it wraps)."""
    x0, x1 = b[..., 0], b[..., 2]
    wraps = x0 > x1
    first = np.stack([x0, np.where(wraps, 1.0, x1)], -1)
    second = np.stack([np.zeros_like(x0), np.where(wraps, x1, 0.0)], -1)
    return first, second


def _width(b: np.ndarray) -> np.ndarray:
    return np.where(b[..., 0] > b[..., 2], 1.0 - b[..., 0] + b[..., 2], b[..., 2] - b[..., 0])


def _maybe_scalar(x: np.ndarray) -> float | np.ndarray:
    return float(x) if x.ndim == 0 else x


def bbox_iou(a: object, b: object) -> float | np.ndarray:
    """Intersection over union of boxes `a` (..., 4) and `b` (..., 4), broadcast; seam-wrapping aware."""
    a, b = _boxes(a), _boxes(b)
    inter_x = 0.0
    for pa in _x_pieces(a):
        for pb in _x_pieces(b):
            inter_x = inter_x + np.clip(
                np.minimum(pa[..., 1], pb[..., 1]) - np.maximum(pa[..., 0], pb[..., 0]), 0, None
            )
    inter_y = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = inter_x * inter_y
    union = _width(a) * (a[..., 3] - a[..., 1]) + _width(b) * (b[..., 3] - b[..., 1]) - inter
    return _maybe_scalar(np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0))


def centre_error(a: object, b: object, *, periodic: bool = False) -> float | np.ndarray:
    """Euclidean distance between box centres, in normalised units (1 = the image side).

    `periodic=True` measures x around the panorama seam (at most 0.5 apart horizontally).
    """
    a, b = _boxes(a), _boxes(b)
    ax, bx = (a[..., 0] + _width(a) / 2) % 1.0, (b[..., 0] + _width(b) / 2) % 1.0
    dx = np.abs(ax - bx)
    if periodic:
        dx = np.minimum(dx, 1.0 - dx)
    dy = (a[..., 1] + a[..., 3]) / 2 - (b[..., 1] + b[..., 3]) / 2
    return _maybe_scalar(np.hypot(dx, dy))


def outside_mask(boxes: object, height: int, width: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre lies outside every box."""
    b = _boxes(boxes).reshape(-1, 4)
    xs = (np.arange(width) + 0.5) / width
    ys = (np.arange(height) + 0.5) / height
    x0, y0, x1, y1 = (b[:, i, None] for i in range(4))  # (R, 1)
    in_x = np.where(x0 > x1, (xs >= x0) | (xs < x1), (xs >= x0) & (xs < x1))  # (R, W)
    in_y = (ys >= y0) & (ys < y1)  # (R, H)
    inside = (in_y[:, :, None] & in_x[:, None, :]).any(axis=0)  # (H, W)
    return ~inside


def leakage(img_without: object, img_with: object, bboxes: object) -> float:
    """Mean absolute change outside all `bboxes` when refs are added (0 = no leakage); NaN if no pixel is
    outside every box."""
    a, b = _image(img_without), _image(img_with)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    outside = outside_mask(bboxes, a.shape[0], a.shape[1])
    if not outside.any():
        return float("nan")
    return float(np.abs(a - b)[outside].mean())


def box_crop(image: np.ndarray, bbox: object) -> np.ndarray:
    """The pixels of an (H, W, C) image inside a normalised xyxy box (at least one pixel each way): what identity
    is judged on."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = bbox
    return image[int(y0 * h) : max(int(y0 * h) + 1, round(y1 * h)), int(x0 * w) : max(int(x0 * w) + 1, round(x1 * w))]


def locate_sprite_near(
    image: np.ndarray, ref: np.ndarray, bbox: object, margin: float = 0.5
) -> tuple[float, float, float, float] | None:
    """`locate_sprite` within the box grown by `margin` of its width / height on every side (the rest of the image
    greyed out): where colours repeat in a scene (dense toy scenes), the ref's colour elsewhere is another sprite."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = np.asarray(bbox, dtype=np.float64)
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    window = np.full_like(image, 128)  # grey: no sprite colour (sprite_match.COLOUR_TOLERANCE)
    rows = slice(max(0, int((y0 - my) * h)), min(h, int(np.ceil((y1 + my) * h))))
    cols = slice(max(0, int((x0 - mx) * w)), min(w, int(np.ceil((x1 + mx) * w))))
    window[rows, cols] = image[rows, cols]
    return locate_sprite(window, ref)
