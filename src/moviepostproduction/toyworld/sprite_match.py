"""Toy-world identity checks: which named colour and which shape a sprite has, and where it is in an image.

These only need to work on the toy world (data/synthetic.py): sprite colours are saturated palette entries
(base or pattern tint) and backgrounds are muted, so a pixel belongs to a sprite of colour c when it lies
within COLOUR_TOLERANCE of the line from c's base to its pattern tint and no other colour's line is nearer.
"""

from __future__ import annotations

import functools

import numpy as np

from moviepostproduction.toyworld.regions import convex_hull_area, dilate, holes, label_components, largest_component
from moviepostproduction.toyworld.sprites import COLOURS, mask_bbox, tint

# RGB distance. Backgrounds (chroma <= 36) stay >= 54 from every colour's base-tint segment; segments of
# different names are >= 54 apart (orange / yellow), so a nearest-segment test separates names.
COLOUR_TOLERANCE = 45.0
_MIN_PIXELS = 4
_NAMES = tuple(COLOURS)


@functools.lru_cache(maxsize=1)
def _segments() -> tuple[np.ndarray, np.ndarray]:
    """(K, 3) base colours and (K, 3) base -> tint directions: a sprite of colour k (pattern edges included,
    which anti-aliasing blends) lies on the segment base_k + t * dir_k, t in [0, 1]."""
    base = np.asarray([COLOURS[n] for n in _NAMES], dtype=np.float32)
    return base, np.asarray([tint(COLOURS[n]) for n in _NAMES], dtype=np.float32) - base


def colour_index_map(image: np.ndarray, tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """(H, W) int: index into COLOURS of each pixel's named colour, -1 for non-sprite pixels."""
    rgb = np.asarray(image, dtype=np.float32)[..., :3]
    base, direction = _segments()
    rel = rgb[..., None, :] - base  # (H, W, K, 3)
    t = np.clip((rel * direction).sum(-1) / (direction * direction).sum(-1), 0.0, 1.0)  # (H, W, K)
    dist = np.linalg.norm(rel - t[..., None] * direction, axis=-1)  # distance to each colour's segment
    nearest = dist.argmin(axis=-1)
    return np.where(np.take_along_axis(dist, nearest[..., None], -1)[..., 0] <= tolerance, nearest, -1)


def _dominant(idx: np.ndarray) -> str | None:
    counts = np.bincount(idx[idx >= 0].ravel(), minlength=len(_NAMES))
    return _NAMES[int(counts.argmax())] if counts.max(initial=0) >= _MIN_PIXELS else None


def sprite_colour(image: np.ndarray, tolerance: float = COLOUR_TOLERANCE) -> str | None:
    """The dominant named sprite colour of an image (a ref or a crop), None when no sprite pixel is found."""
    return _dominant(colour_index_map(image, tolerance))


def colour_mask(image: np.ndarray, colour: str, tolerance: float = COLOUR_TOLERANCE) -> np.ndarray:
    """(H, W) bool: pixels of the named colour (base, pattern tint or a blend of the two)."""
    return colour_index_map(image, tolerance) == _NAMES.index(colour)


def colour_match(ref: np.ndarray, crop: np.ndarray) -> bool:
    """Same dominant named sprite colour in `ref` and `crop`."""
    colour = sprite_colour(ref)
    return colour is not None and colour == sprite_colour(crop)


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of `mask`, after a 1-pixel dilation joins pixels split by noise."""
    grown, count = label_components(dilate(mask, 1))
    if count == 0:
        return mask & False
    sizes = np.bincount(grown[mask], minlength=count + 1)
    return mask & (grown == int(np.argmax(sizes)))


def locate_sprite(image: np.ndarray, ref: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalised xyxy box of the sprite in `image` that has the ref's colour, None when there is none.

    ref colour -> mask of image pixels of that colour -> largest connected region -> its bbox.
    """
    colour = sprite_colour(ref)
    if colour is None:
        return None
    mask = colour_mask(image, colour)
    if mask.sum() < _MIN_PIXELS:
        return None
    return mask_bbox(_largest_region(mask))


def _radial_harmonics(filled: np.ndarray, bins: int = 48) -> np.ndarray:
    """|FFT| of the boundary's radius-vs-angle profile around the centroid, harmonics 1..6 / mean radius.

    Rotation-invariant: a triangle peaks at 3, squares and crosses at 4, stars at 5, circles nowhere.
    """
    ys, xs = np.nonzero(filled)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    # Radius of each pixel's outer corner along its angle (pixel centre + half a pixel diagonal, outward).
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    angle = np.arctan2(dy, dx)
    radius = np.hypot(dx, dy) + 0.5
    b = ((angle + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    profile = np.zeros(bins)
    np.maximum.at(profile, b, radius)
    present = profile > 0
    if not present.all():  # tiny sprites can leave angular gaps: interpolate around the circle
        pos = np.flatnonzero(present)
        profile = np.interp(np.arange(bins), pos, profile[pos], period=bins)
    spectrum = np.abs(np.fft.rfft(profile)) / bins
    return spectrum[1:7] / spectrum[0]


def shape_descriptor(mask: np.ndarray) -> np.ndarray:
    """(9,) features of a sprite mask: [hole fraction, solidity, elongation, harmonics 1..6].

    hole fraction = enclosed background / filled area (rings); solidity = filled area / convex hull area
    (stars, crosses are concave); elongation = sqrt(minor / major second moment) (diamonds are 0.62).
    """
    mask = largest_component(mask.astype(bool))
    if mask.sum() < _MIN_PIXELS:
        return np.full(9, np.nan)
    hole = holes(mask)
    filled = mask | hole
    area = float(filled.sum())
    ys, xs = np.nonzero(filled)
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12.0  # + pixel extent
    minor, major = np.linalg.eigvalsh(cov)
    features = [hole.sum() / area, area / convex_hull_area(filled), np.sqrt(minor / major)]
    return np.asarray(features + list(_radial_harmonics(filled)))


def classify_shape(mask: np.ndarray) -> str | None:
    """Shape class (one of SHAPES) of a sprite mask by a few rules on `shape_descriptor`; None if empty."""
    f = shape_descriptor(mask)
    if np.isnan(f).any():
        return None
    hole, solidity, elongation, h = f[0], f[1], f[2], f[3:]
    if hole > 0.15:
        return "ring"
    if elongation < 0.8:  # the only anisotropic shape; checked before solidity, which pixelation lowers
        return "diamond"
    strongest = 3 + int(np.argmax(h[2:5]))  # the dominant of harmonics 3, 4, 5 = number of corners / points
    if h[strongest - 1] < 0.03:
        return "circle"
    if strongest == 4:
        return "cross" if solidity < 0.82 else "square"
    return "triangle" if strongest == 3 else "star"


def classify_sprite(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the dominant sprite in an image (a ref on white, or a crop of a scene)."""
    idx = colour_index_map(image)
    colour = _dominant(idx)
    if colour is None:
        return None, None
    return colour, classify_shape(_largest_region(idx == _NAMES.index(colour)))


def identity_parts(ref: np.ndarray, crop: np.ndarray) -> tuple[bool, bool]:
    """(same named colour, same shape class) of the reference and the crop's dominant sprite; an attribute the
    reference itself cannot be classified by never matches."""
    return parts_match(classify_sprite(ref), classify_sprite(crop))


def parts_match(ref: tuple[str | None, str | None], crop: tuple[str | None, str | None]) -> tuple[bool, bool]:
    """`identity_parts` of two `classify_sprite` readings."""
    return ref[0] is not None and ref[0] == crop[0], ref[1] is not None and ref[1] == crop[1]


def identity_match(ref: np.ndarray, crop: np.ndarray) -> bool:
    """Same named colour and same shape class in the reference and in the crop of the generated image."""
    return all(identity_parts(ref, crop))
