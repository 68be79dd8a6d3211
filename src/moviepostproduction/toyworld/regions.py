"""Binary-mask helpers in pure numpy (no scipy): dilation, connected components, holes, convex-hull area."""

from __future__ import annotations

import numpy as np

_N4 = ((-1, 0), (1, 0), (0, -1), (0, 1))
_N8 = (*_N4, (-1, -1), (-1, 1), (1, -1), (1, 1))


def _shifted(a: np.ndarray, dy: int, dx: int, fill: object) -> np.ndarray:
    """a shifted so that out[y, x] = a[y + dy, x + dx] (fill outside); dy, dx in {-1, 0, 1}."""
    h, w = a.shape
    out = np.full_like(a, fill)
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = a[
        max(0, dy) : h + min(0, dy), max(0, dx) : w + min(0, dx)
    ]
    return out


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation by a (2 radius + 1)^2 square."""
    out = mask.astype(bool)
    for _ in range(radius):
        grown = out.copy()
        for dy, dx in _N8:
            grown |= _shifted(out, dy, dx, False)
        out = grown
    return out


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(H, W) int32 labels (0 = background, 1..K) and K, by min-label propagation with pointer jumping."""
    mask = mask.astype(bool)
    h, w = mask.shape
    big = h * w
    flat_idx = np.arange(big, dtype=np.int64).reshape(h, w)
    lab = np.where(mask, flat_idx, big)
    offsets = _N8 if connectivity == 8 else _N4
    while True:
        new = lab
        for dy, dx in offsets:
            new = np.minimum(new, _shifted(lab, dy, dx, big))
        new = np.where(mask, new, big)
        # Pointer jumping: a pixel's label is the index of a pixel of the same component; follow it.
        flat = np.append(new.ravel(), big)
        while True:
            jumped = flat[flat]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    roots, labels = np.unique(lab[mask], return_inverse=True)
    out = np.zeros((h, w), dtype=np.int32)
    out[mask] = labels.astype(np.int32) + 1
    return out, int(roots.size)


def largest_component(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """The largest connected component of `mask` (all False when the mask is empty)."""
    labels, count = label_components(mask, connectivity)
    if count == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels that cannot reach the image border through background (4-connected)."""
    labels, _ = label_components(~mask.astype(bool), connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return (labels > 0) & ~np.isin(labels, border)


def convex_hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixel squares of `mask` (monotone chain over row-extreme corners)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0.0
    left = mask[rows].argmax(axis=1)
    right = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)
    pts = np.concatenate(
        [
            np.stack([left, rows], 1),
            np.stack([left, rows + 1], 1),
            np.stack([right, rows], 1),
            np.stack([right, rows + 1], 1),
        ]
    )
    pts = sorted(set(map(tuple, pts.tolist())))

    def cross(o: tuple, a: tuple, b: tuple) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(points: list) -> list:
        chain: list = []
        for p in points:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    hull = np.asarray(half(pts) + half(pts[::-1]), dtype=np.float64)  # (V, 2) counter-clockwise
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
