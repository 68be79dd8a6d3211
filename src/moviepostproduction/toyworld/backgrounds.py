"""Procedural backgrounds of the toy world: sky / floor gradients, tinted bands and low-frequency noise.

Every background is muted (chroma max(rgb) - min(rgb) <= MAX_BG_CHROMA) so that no background pixel can be
mistaken for a sprite colour: the sprite palette (sprites.py) has chroma >= 112 even for its pale tints.
"""

from __future__ import annotations

import functools

import numpy as np

MAX_BG_CHROMA = 36.0

# style -> the words the caption uses ("on a sunset background").
BACKGROUNDS: dict[str, str] = {
    "sunset": "sunset",
    "daylight": "daylight",
    "night": "night",
    "desert": "desert",
    "studio": "grey studio",
    "fog": "foggy",
    "bands": "banded",
}

# style -> (sky top, sky at horizon, floor at horizon, floor bottom); styles without a floor have no horizon.
_SKY_FLOOR: dict[str, tuple[tuple[float, float, float], ...]] = {
    "sunset": ((110, 95, 135), (215, 180, 170), (120, 100, 95), (85, 70, 70)),
    "daylight": ((155, 175, 200), (200, 215, 225), (140, 155, 115), (110, 125, 90)),
    "night": ((35, 40, 65), (70, 75, 105), (55, 55, 60), (35, 35, 40)),
    "desert": ((175, 190, 210), (225, 220, 210), (205, 190, 160), (180, 165, 135)),
    "studio": ((205, 205, 200), (170, 170, 168), (170, 170, 168), (130, 130, 128)),
}


@functools.lru_cache(maxsize=32)
def _interp_matrix(out: int, grid: int) -> np.ndarray:
    """(out, grid) linear-interpolation weights from `grid` control points spread over `out` pixels."""
    pos = (np.arange(out) + 0.5) / out * (grid - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    frac = pos - lo
    mat = np.zeros((out, grid), dtype=np.float32)
    mat[np.arange(out), lo] = 1.0 - frac
    mat[np.arange(out), lo + 1] = frac
    return mat


def low_frequency_noise(rng: np.random.Generator, size: int, grid: int, amplitude: float) -> np.ndarray:
    """(size, size, 3) smooth noise: a coarse random grid, bilinearly upsampled."""
    coarse = rng.normal(0.0, amplitude, size=(grid, grid, 3)).astype(np.float32)
    m = _interp_matrix(size, grid)  # (size, grid)
    rows = (m @ coarse.reshape(grid, grid * 3)).reshape(size, grid, 3)  # (H, grid, 3)
    return m[None] @ rows  # (H, W, 3)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _sky_floor(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    keys = np.asarray(_SKY_FLOOR[style], dtype=np.float32) + rng.normal(0.0, 10.0, size=(4, 3))
    y = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]  # (H, 1)
    horizon = rng.uniform(0.45, 0.65)
    sky = keys[0] + (keys[1] - keys[0]) * (y / horizon)
    floor = keys[2] + (keys[3] - keys[2]) * ((y - horizon) / (1.0 - horizon))
    w = _smoothstep((y - horizon) / 0.03 + 0.5)  # soft horizon line
    column = sky * (1.0 - w) + floor * w  # (H, 3)
    return np.broadcast_to(column[:, None, :], (size, size, 3)).copy()


def _bands(size: int, rng: np.random.Generator) -> np.ndarray:
    n = int(rng.integers(3, 6))
    edges = np.sort(rng.uniform(0.1, 0.9, size=n - 1))
    colours = rng.uniform(70, 210, size=(n, 1)) + rng.uniform(-25, 25, size=(n, 3))
    y = (np.arange(size, dtype=np.float32) + 0.5) / size
    column = np.broadcast_to(colours[0], (size, 3)).astype(np.float32)
    for edge, colour in zip(edges, colours[1:], strict=True):
        w = _smoothstep((y - edge) / 0.04 + 0.5)[:, None]
        column = column * (1.0 - w) + colour * w
    return np.broadcast_to(column[:, None, :], (size, size, 3)).copy()


def _desaturate(img: np.ndarray, max_chroma: float) -> np.ndarray:
    """Pull each pixel towards its grey level until max(rgb) - min(rgb) <= max_chroma."""
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    grey = ((r + g + b) / 3.0)[..., None]
    scale = np.minimum(1.0, max_chroma / np.maximum(chroma, 1e-6))[..., None]
    return grey + (img - grey) * scale


def render_background(style: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 RGB in [0, 255] for one of BACKGROUNDS."""
    if style == "bands":
        img = _bands(size, rng)
    elif style == "fog":
        img = np.full((size, size, 3), rng.uniform(140, 210), dtype=np.float32)
        img += low_frequency_noise(rng, size, grid=4, amplitude=22.0)
    else:
        img = _sky_floor(style, size, rng)
    x = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    img += (rng.uniform(-12.0, 12.0) * x)[None, :, None]  # light from one side
    img += low_frequency_noise(rng, size, grid=5, amplitude=6.0)
    return np.clip(_desaturate(img, MAX_BG_CHROMA), 0.0, 255.0).astype(np.float32)
