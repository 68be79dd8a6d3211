"""Sprites of the toy world: shape outlines, the named colour palette, fill patterns and an anti-aliased
rasteriser. Pure numpy + PIL; every shape fits inside the unit disc so placement needs only a radius."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "ring", "cross")
PATTERNS: tuple[str, ...] = ("solid", "stripes", "dots", "checker")

# Saturated, well-separated colours. Backgrounds stay below MAX_BG_CHROMA (see backgrounds.py), so "is this pixel
# part of a sprite" is a nearest-palette test with a tolerance (evaluation/sprite_match.py relies on this).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 220, 20),
    "green": (20, 180, 40),
    "cyan": (0, 190, 210),
    "blue": (30, 80, 220),
    "purple": (150, 40, 200),
}

# Pattern pixels use the base colour blended this far towards white: same hue family, so a patterned sprite
# keeps one colour name, and the tint stays >= 58 RGB units from every other name's base or tint.
TINT = 0.3

# Semantic map: one colour per shape class on black (the fill capability's conditioning image).
SEMANTIC_COLOURS: dict[str, tuple[int, int, int]] = {
    "circle": (255, 0, 0),
    "square": (0, 255, 0),
    "triangle": (0, 0, 255),
    "diamond": (255, 255, 0),
    "star": (255, 0, 255),
    "ring": (0, 255, 255),
    "cross": (255, 128, 0),
}


def tint(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    """The pattern colour of a sprite whose base colour is `rgb`."""
    r, g, b = (c + TINT * (255 - c) for c in rgb)
    return r, g, b


def _regular(n: int, radius: float, start_deg: float = -90.0) -> np.ndarray:
    angles = np.deg2rad(start_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (n, 2), y points down


def _star(points: int, inner: float) -> np.ndarray:
    outer = _regular(points, 1.0)
    inner_pts = _regular(points, inner, start_deg=-90.0 + 180.0 / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)  # alternate outer / inner vertices


def _cross(half_width: float, reach: float) -> np.ndarray:
    w, a = half_width, reach
    return np.array(
        [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    )


# (outer polygon, hole polygon or None) in unit coordinates, every vertex within the unit disc.
OUTLINES: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
    "circle": (_regular(48, 1.0), None),
    "square": (_regular(4, 1.0, start_deg=-45.0), None),
    "triangle": (_regular(3, 1.0), None),
    "diamond": (np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]), None),
    "star": (_star(5, 0.45), None),
    "ring": (_regular(48, 1.0), _regular(48, 0.55)),
    "cross": (_cross(0.32, 0.92), None),
}


def pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, phase: tuple[float, float]) -> np.ndarray:
    """Where the tint colour goes, in sprite-local coordinates u, v (about -1..1), so patterns rotate and scale
    with the sprite and show the same number of stripes / dots / cells at every size."""
    pu, pv = phase
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "stripes":  # diagonal stripes, ~3.5 periods across the sprite, 40 % tint
        t = (u + v) * (math.sqrt(0.5) * 3.5 / 2.0) + pu
        return (t - np.floor(t)) < 0.4
    cell = 0.5
    fu, fv = u / cell + pu, v / cell + pv
    if pattern == "dots":  # dot radius 0.3 cell: ~28 % tint
        du, dv = fu - np.floor(fu) - 0.5, fv - np.floor(fv) - 0.5
        return du * du + dv * dv < 0.09
    if pattern == "checker":
        return ((np.floor(fu) + np.floor(fv)) % 2) == 1
    raise ValueError(f"unknown pattern {pattern!r}")


@dataclass(frozen=True)
class SpriteRaster:
    """A rendered sprite inside the window [y0:y0+h, x0:x0+w] of its canvas."""

    y0: int
    x0: int
    alpha: np.ndarray  # (h, w) float32 coverage in [0, 1]
    premult: np.ndarray  # (h, w, 3) float32 colour x coverage

    def composite(self, canvas: np.ndarray) -> None:
        """Paint over `canvas` (H, W, 3) float32 in place (the sprite occludes what is under it)."""
        h, w = self.alpha.shape
        win = canvas[self.y0 : self.y0 + h, self.x0 : self.x0 + w]
        win *= 1.0 - self.alpha[..., None]
        win += self.premult

    def full_mask(self, hw: tuple[int, int]) -> np.ndarray:
        """(H, W) bool: pixels at least half covered by the sprite."""
        mask = np.zeros(hw, dtype=bool)
        h, w = self.alpha.shape
        mask[self.y0 : self.y0 + h, self.x0 : self.x0 + w] = self.alpha >= 0.5
        return mask


def render_sprite(
    shape: str,
    colour: str,
    pattern: str,
    *,
    canvas_hw: tuple[int, int],
    centre: tuple[float, float],
    radius: float,
    angle_deg: float,
    phase: tuple[float, float],
    supersample: int = 2,
) -> SpriteRaster:
    """Rasterise one sprite (centre = (x, y) in pixels) with `supersample`^2 samples per pixel."""
    height, width = canvas_hw
    cx, cy = centre
    x0, x1 = max(0, math.floor(cx - radius) - 1), min(width, math.ceil(cx + radius) + 1)
    y0, y1 = max(0, math.floor(cy - radius) - 1), min(height, math.ceil(cy + radius) + 1)
    s = supersample
    hs, ws = (y1 - y0) * s, (x1 - x0) * s

    cos, sin = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    rot = np.array([[cos, -sin], [sin, cos]])
    coverage = Image.new("L", (ws, hs), 0)
    draw = ImageDraw.Draw(coverage)
    outer, hole = OUTLINES[shape]
    for poly, fill in ((outer, 255), (hole, 0)):
        if poly is None:
            continue
        # PIL puts integer coordinates at sample centres, so shift by half a sample.
        pts = (poly @ rot.T * radius + (cx - x0, cy - y0)) * s - 0.5
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
    alpha_ss = np.asarray(coverage, dtype=np.float32) / 255.0  # (hs, ws)

    xs = (x0 + (np.arange(ws) + 0.5) / s - cx) / radius
    ys = (y0 + (np.arange(hs) + 0.5) / s - cy) / radius
    dx, dy = xs[None, :], ys[:, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # inverse rotation into sprite-local axes
    tinted = pattern_mask(pattern, u, v, phase)  # (hs, ws)

    # Two colours only, so colour x coverage = base * coverage + (tint - base) * tinted coverage.
    alpha = _box_sum(alpha_ss, s) * np.float32(1.0 / (s * s))  # (h, w)
    tinted_alpha = _box_sum(alpha_ss * tinted, s) * np.float32(1.0 / (s * s))
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    pre = alpha[..., None] * base + tinted_alpha[..., None] * (np.asarray(tint(COLOURS[colour]), np.float32) - base)
    return SpriteRaster(y0=y0, x0=x0, alpha=alpha, premult=pre)


def _box_sum(a: np.ndarray, s: int) -> np.ndarray:
    """Sum of each s x s block of `a` (strided adds: much faster than a 4-D reshape-reduce for small s)."""
    out = a[0::s, 0::s].copy()
    for dy in range(s):
        for dx in range(s):
            if dy or dx:
                out += a[dy::s, dx::s]
    return out


def mask_bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Normalised xyxy box of the True pixels of an (H, W) mask (x1, y1 exclusive), None when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    height, width = mask.shape
    return (
        float(cols[0] / width),
        float(rows[0] / height),
        float((cols[-1] + 1) / width),
        float((rows[-1] + 1) / height),
    )
