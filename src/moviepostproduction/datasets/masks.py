"""COCO segmentations to boolean masks, without pycocotools: polygons (pixel-centre rule) and run-length encodings
(uncompressed `counts` lists and the compressed `counts` strings of COCO's maskApi)."""

from __future__ import annotations

import math
import numbers

import numpy as np

MAX_POLYGON_POINTS = 100_000  # per annotation; COCO's largest polygons hold a few hundred
MAX_RLE_RUNS = 10_000_000  # per annotation (a 4096^2 mask of alternating pixels would need 16M)


class MaskProblem(ValueError):
    """A segmentation that cannot be decoded; the message says why (the caller names the file and annotation)."""


def _number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def polygon_mask(polygons: list, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the union of COCO polygons ([[x0, y0, x1, y1, ...], ...] in pixels). Pixel (col c, row r) is
    inside when its centre (c + 0.5, r + 0.5) is inside a polygon by the even-odd rule, so a rectangle from x = 10 to
    x = 30 covers columns 10..29 (PIL's polygon fill would also cover 30: COCO's `area` counts 20)."""
    if not isinstance(polygons, list) or not polygons:
        raise MaskProblem("segmentation must be a non-empty list of polygons")
    if sum(len(p) if isinstance(p, list) else 0 for p in polygons) > 2 * MAX_POLYGON_POINTS:
        raise MaskProblem(f"segmentation has more than {MAX_POLYGON_POINTS} polygon points")
    mask = np.zeros((height, width), dtype=bool)
    for k, poly in enumerate(polygons):
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2 or not all(map(_number, poly)):
            raise MaskProblem(f"polygon {k} must be a flat list of at least 3 finite (x, y) pairs")
        mask |= _fill(np.asarray(poly, dtype=np.float64).reshape(-1, 2), height, width)
    return mask


def _fill(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """One polygon (P, 2) rasterised: every edge toggles the parity of the pixels to the right of where it crosses
    a row's centre line; a cumulative sum along each row then leaves the inside odd."""
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    keep = y0 != y1  # horizontal edges cross no centre line
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    # Rows whose centre r + 0.5 lies in [lo, hi): half-open, so a vertex shared by two edges counts once.
    first = np.clip(np.ceil(lo - 0.5), 0, height).astype(np.int64)
    last = np.clip(np.ceil(hi - 0.5), 0, height).astype(np.int64)  # exclusive
    counts = last - first
    edge = np.repeat(np.arange(len(first)), counts)  # (C,) one entry per (edge, row) crossing
    rows = np.repeat(first, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    yc = rows + 0.5
    xc = x0[edge] + (yc - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    cols = np.clip(np.ceil(xc - 0.5), 0, width).astype(np.int64)  # first column whose centre is right of the crossing
    mask = np.zeros((height, width), dtype=bool)
    if not len(rows):
        return mask
    # Only the window the crossings span is filled: past the last crossing of a row its parity is even again.
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    toggles = np.zeros((r1 - r0, c1 - c0), dtype=np.int32)  # (h, w) of the window
    np.add.at(toggles, (rows - r0, cols - c0), 1)
    inside = np.cumsum(toggles, axis=1) % 2 == 1
    mask[r0:r1, c0 : min(c1, width)] = inside[:, : min(c1, width) - c0]
    return mask


def rle_counts_from_string(text: str) -> list[int]:
    """The run lengths of a compressed COCO RLE string (maskApi's rleFrString): each value is 5-bit groups, least
    significant first, as characters offset by 48, 0x20 marking "more groups follow" and 0x10 in the last group the
    sign; from the third value on, each is stored as the difference from the value two places before."""
    counts: list[int] = []
    value, shift = 0, 0
    for position, char in enumerate(text):
        group = ord(char) - 48
        if not 0 <= group < 64:
            raise MaskProblem(f"RLE counts string has a character outside the COCO alphabet at {position}")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            if shift > 60:
                raise MaskProblem(f"RLE counts string has a run longer than 12 groups at {position}")
            continue
        if group & 0x10:
            value -= 1 << shift  # sign-extend the last group
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
        if len(counts) > MAX_RLE_RUNS:
            raise MaskProblem(f"RLE has more than {MAX_RLE_RUNS} runs")
        value, shift = 0, 0
    if shift:
        raise MaskProblem("RLE counts string ends inside a value")
    return counts


def rle_mask(rle: dict, height: int, width: int) -> np.ndarray:
    """(H, W) bool from {"size": [H, W], "counts": [...] or "..."}: alternating runs of 0s and 1s (0s first) over
    the pixels in column-major order."""
    size, counts = rle.get("size"), rle.get("counts")
    if size != [height, width]:
        raise MaskProblem(f"RLE size {size!r} is not the image's [height, width] [{height}, {width}]")
    if isinstance(counts, str):
        counts = rle_counts_from_string(counts)
    elif not isinstance(counts, list) or len(counts) > MAX_RLE_RUNS:
        raise MaskProblem(f"RLE counts must be a string or a list of at most {MAX_RLE_RUNS} integers")
    elif not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
        raise MaskProblem("RLE counts must be integers")
    runs = np.asarray(counts, dtype=np.int64)
    if (runs < 0).any():
        raise MaskProblem("RLE counts must not be negative")
    if int(runs.sum()) != height * width:
        raise MaskProblem(f"RLE counts sum to {int(runs.sum())}, not the image's {height} x {width} pixels")
    values = np.arange(len(runs)) % 2 == 1  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, runs)  # (H * W,) column-major
    return flat.reshape(width, height).T


def segmentation_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """(H, W) bool of a COCO `segmentation`: a list of polygons or an RLE mapping."""
    if isinstance(segmentation, dict):
        return rle_mask(segmentation, height, width)
    if isinstance(segmentation, list):
        return polygon_mask(segmentation, height, width)
    raise MaskProblem(f"segmentation must be a list of polygons or an RLE mapping, not a {type(segmentation).__name__}")
