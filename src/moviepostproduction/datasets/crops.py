"""Pixels of a sample: source images read as RGB within bounds, RGBA ref crops cut with their instance masks, and the
target brought to its stored size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from moviepostproduction.datasets.real_format import canvas_size
from moviepostproduction.errors import FileProblem
from moviepostproduction.scene import open_image

WHITE = (255, 255, 255, 255)


class UnreadableImage(ValueError):
    """An image file Pillow cannot open or decode; the message says why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: transparency composited onto white (as `Scene.load_ref_images` does), 16-bit and float
    greyscale scaled by their maximum, CMYK / YCbCr / L / P converted by Pillow."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(img, dtype=np.float64)
        peak = float(values.max()) if values.size and np.isfinite(values).all() else 0.0
        grey = np.clip(values * (255.0 / peak) if peak > 0 else values * 0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE), rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path, max_pixels: int | None = None) -> Image.Image:
    """The image file as a decoded RGB image: a FIFO, a device, more than 256 MiB or `max_pixels` (default PIL's
    MAX_IMAGE_PIXELS, 89.5 M) read from its header is a FileProblem (a decompression bomb is never decoded), a file
    Pillow cannot decode an UnreadableImage. EXIF orientation is not applied: COCO boxes and masks are in the
    stored pixel grid."""
    try:
        with open_image(path, max_pixels) as (_, img):
            img.load()
            return to_rgb(img)
    except FileProblem:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = "not a format Pillow knows" if isinstance(err, UnidentifiedImageError) else str(err).splitlines()[0]
        raise UnreadableImage(reason or type(err).__name__) from None


def pixel_window(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """A pixel box (x, y, w, h) rounded outwards to whole pixels: (left, top, right, bottom), right / bottom
    exclusive."""
    x, y, w, h = box
    return math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h)


def rgba_crop(image: np.ndarray, mask: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
    """(h, w, 4) uint8: the pixels of `image` (H, W, 3) inside `window`, alpha 255 where `mask` (H, W) is set."""
    left, top, right, bottom = window
    alpha = mask[top:bottom, left:right].astype(np.uint8) * 255  # (h, w)
    return np.concatenate([image[top:bottom, left:right], alpha[..., None]], axis=-1)


def normalised(window: tuple[int, int, int, int], width: int, height: int) -> tuple[float, float, float, float]:
    left, top, right, bottom = window
    return (left / width, top / height, right / width, bottom / height)


def stored_target(image: Image.Image, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8: the target at `canvas_size` (Lanczos; unchanged when already that size)."""
    size = canvas_size(image.width, image.height, max_pixels)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image).copy()
