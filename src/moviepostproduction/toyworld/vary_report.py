"""The files of `mpp eval-vary` (toyworld/vary_eval.py): markdown tables, grid.png and sweep.png."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["COLUMNS", "format_rows", "sweep_grid", "variant_grid"]

COLUMNS = ("variant", "s_T", "s_I", "shape kept", "colour kept", "both kept", "both kept (seen pairs)",
           "both kept (unseen pairs)", "DINO sim", "diversity", "pixel diversity", "layout IoU", "samples")  # fmt: skip


def _cell(value: object, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"  # a scale that plays no part in the row, or a figure it does not define
    if isinstance(value, bool | int | str):
        return str(value)
    return f"{value:g}" if column in ("s_T", "s_I") else f"{value:.3f}"


def format_rows(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """A markdown table of `columns` (NaN and unused scales as '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c], c) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _strip(images: np.ndarray, gap: int = 2) -> Image.Image:
    """(S, H, W, 3) uint8 side by side on white, `gap` pixels apart."""
    s, h, w, _ = images.shape
    strip = Image.new("RGB", (s * w + (s - 1) * gap, h), (255, 255, 255))
    for k, image in enumerate(images):
        strip.paste(Image.fromarray(image), (k * (w + gap), 0))
    return strip


def variant_grid(refs, images: dict[str, np.ndarray], rows: int = 6) -> Image.Image:
    """Rows = refs; columns = the input image, the held-out scene, then each generated variant's first seed."""
    from moviepostproduction.visualize import image_grid

    tiles = [
        Image.fromarray(img)
        for i, ref in enumerate(refs[:rows])
        for img in (ref.image, ref.scene, *(images[v][i, 0] for v in images))
    ]
    return image_grid(tiles, columns=2 + len(images))


def sweep_grid(ref, cells: dict[tuple[float, float], np.ndarray], text_scales, image_scales) -> Image.Image:
    """One ref's S variations per (s_T, s_I): rows = text scales, columns = image scales, cells 4 px apart; the
    first row shows the input image and its scene."""
    strips = {key: _strip(images) for key, images in cells.items()}
    w, h = next(iter(strips.values())).size
    head = _strip(np.stack([ref.image, ref.scene]))
    pad = 4
    grid = Image.new("RGB", (len(image_scales) * (w + pad), (len(text_scales) + 1) * (h + pad)), (0, 0, 0))
    grid.paste(head, (0, 0))
    for r, s_t in enumerate(text_scales, start=1):
        for c, s_i in enumerate(image_scales):
            grid.paste(strips[(s_t, s_i)], (c * (w + pad), r * (h + pad)))
    return grid
