"""Pictures people look at: layout overlays with depth and predicted alpha, image grids, PNG writing, and the
conversions between PIL images and pixel tensors in [-1, 1]."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from moviepostproduction.files import atomic_output


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


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
    """Write a PNG atomically (`files.atomic_output`: a unique temp file + rename; a failure is one line naming
    `path` and keeps an earlier file there), with optional text chunks (e.g. the model that made it)."""
    path = Path(path)
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value)
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


CURVE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def plot_curves(
    series: dict[str, Sequence[tuple[float, float]]], *, title: str = "", size: tuple[int, int] = (640, 360)
) -> Image.Image:
    """Line plot of named (x, y) series (training curves) with a log y axis when all values are positive."""
    import math

    w, h = size
    left, right, top, bottom = 56, 12, 24, 28
    out = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    points = [(x, y) for s in series.values() for x, y in s if math.isfinite(y)]
    if not points:
        draw.text((left, h // 2), "no data", fill=(0, 0, 0), font=font)
        return out
    log = all(y > 0 for _, y in points)
    ty = (lambda y: math.log10(y)) if log else (lambda y: y)
    xs, ys = [x for x, _ in points], [ty(y) for _, y in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * (w - left - right), top + (1 - (ty(y) - y0) / (y1 - y0)) * (
            h - top - bottom
        )

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for value, anchor in ((y1, top), (y0, h - bottom)):
        draw.text((4, anchor - 6), f"{10**value if log else value:.3g}", fill=(0, 0, 0), font=font)
    draw.text((left, h - bottom + 6), f"{x0:g}", fill=(0, 0, 0), font=font)
    draw.text((w - right - 40, h - bottom + 6), f"{x1:g}", fill=(0, 0, 0), font=font)
    draw.text((left, 6), title + (" (log y)" if log else ""), fill=(0, 0, 0), font=font)
    for i, (name, s) in enumerate(series.items()):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        line = [px(x, y) for x, y in s if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=1)
        draw.text((w - right - 120, top + 4 + 12 * i), name, fill=colour, font=font)
    return out
