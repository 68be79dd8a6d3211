"""Pictures people look at: layout overlays with depth and predicted alpha, image grids, PNG writing."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

DEPTH_COLOURS = {"fg": (255, 64, 64), "mg": (255, 200, 0), "bg": (64, 160, 255)}


def draw_layout(
    image: Image.Image,
    bboxes: Sequence[Sequence[float]],
    depths: Sequence[str],
    alphas: Sequence[float] | None = None,
) -> Image.Image:
    """The image with each bbox outlined in its depth colour and labelled `#i depth alpha=0.73`.

    A wrapping panorama box (x0 > x1) is drawn as its two pieces on either side of the seam.
    """
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    w, h = out.size
    line = max(1, round(min(w, h) / 256))
    for i, (box, depth) in enumerate(zip(bboxes, depths, strict=True)):
        x0, y0, x1, y1 = box
        colour = DEPTH_COLOURS.get(depth, (255, 255, 255))
        pieces = [(x0, 1.0), (0.0, x1)] if x0 > x1 else [(x0, x1)]
        for a, b in pieces:
            draw.rectangle([a * w, y0 * h, b * w - 1, y1 * h - 1], outline=colour, width=line)
        label = f"#{i} {depth}" + (f" a={alphas[i]:.2f}" if alphas is not None else "")
        tx, ty = x0 * w + line + 1, y0 * h + line + 1
        text_box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(text_box, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour, font=font)
    return out


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images row-major into one picture."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), (0, 0, 0))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)), ((i % columns) * w, (i // columns) * h))
    return grid


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temp file + rename), with optional text chunks (e.g. the model that made it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path
