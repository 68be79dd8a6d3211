"""Metrics (DESIGN 8): bbox alignment (IoU, centre error), identity (toy world), leakage, seam ratio.

Boxes are normalised xyxy, batched over leading dimensions. A box with x0 > x1 wraps the panorama seam
(DESIGN 1): it covers [x0, 1) and [0, x1). Images are (H, W) or (H, W, C) arrays (numpy, or anything
`np.asarray` accepts); uint8 images are compared in [0, 1] units.
"""

from __future__ import annotations

import numpy as np

from .sprite_match import (
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
    "centre_error",
    "classify_shape",
    "classify_sprite",
    "colour_match",
    "identity_match",
    "identity_parts",
    "leakage",
    "locate_sprite",
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


def _image(img: object) -> np.ndarray:
    arr = np.asarray(img)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    arr = arr.astype(np.float64) / scale
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return arr


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


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 1.0 if num == 0.0 else float("inf")
    return num / den


def seam_ratio(img: object, *, rotated: bool = False, window: int = 8, period: int = 1) -> float:
    """Horizontal seam of a panorama (DESIGN 7): mean |col 0 - col W-1| / mean |col j - col j+1| over the
    interior; 1.0 = seamless, larger = a visible seam.

    `period` p > 1 compares the seam with the steps at the same phase only, the boundaries between columns
    kp - 1 and kp (k = 1 .. W/p - 1): the seam is a boundary of FLUX's 16 px tokens (p = 2 on latents), and
    steps across tokens are larger than steps inside one, so the plain ratio of a seamless panorama is > 1.
    `rotated=True` is the rotated-view check (PanFusion): roll by W/2 so the former seam sits mid-image and
    compare it with the `window` column steps on each side of it only (a local rather than global baseline).
    """
    x = _image(img)
    width = x.shape[1]
    if width < 3:
        raise ValueError(f"seam_ratio needs an image at least 3 columns wide, got {width}")
    if isinstance(period, bool) or not isinstance(period, int) or period < 1 or width % period or width < 2 * period:
        raise ValueError(f"period must be an integer >= 1 dividing the width {width} at least twice, got {period}")
    if rotated and period != 1:
        raise ValueError("period applies to the plain seam ratio, not to the rotated view")
    if not rotated:
        steps = np.abs(np.diff(x, axis=1)).mean(axis=(0, 2))  # (W - 1,) steps[j] = |col j+1 - col j|
        return _ratio(float(np.abs(x[:, 0] - x[:, -1]).mean()), float(steps[period - 1 :: period].mean()))
    rolled = np.roll(x, width // 2, axis=1)  # the former seam is now between columns W/2 - 1 and W/2
    steps = np.abs(np.diff(rolled, axis=1)).mean(axis=(0, 2))  # steps[j] = |col j+1 - col j|
    seam = width // 2 - 1
    lo, hi = max(0, seam - window), min(steps.size, seam + window + 1)
    neighbours = np.delete(steps[lo:hi], seam - lo)
    return _ratio(float(steps[seam]), float(neighbours.mean()))
