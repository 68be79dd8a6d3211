"""The seam ratio of a panorama (DESIGN 7): how visible the wrap-around seam is, against the other column steps."""

from __future__ import annotations

import numpy as np

__all__ = ["float_image", "seam_ratio"]


def float_image(img: object) -> np.ndarray:
    """(H, W) or (H, W, C) image (numpy or array-like; uint8 in [0, 255]) -> (H, W, C) float64 in [0, 1] units."""
    arr = np.asarray(img)
    scale = 255.0 if arr.dtype == np.uint8 else 1.0
    arr = arr.astype(np.float64) / scale
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return arr


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
    x = float_image(img)
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
