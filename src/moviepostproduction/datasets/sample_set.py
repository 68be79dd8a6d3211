"""A generated COCO-style data set: photo-like images with polygon annotations and captions, for measuring
`mpp prepare-data --from-coco` (docs/training-data.md) and for end-to-end tests that need "a user's photos"."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("person", "car", "dog", "chair")


def _blob(rng: np.random.Generator, width: int, height: int) -> tuple[list[float], list[float]]:
    """A star-shaped polygon of 24 points in a random box: (flat COCO polygon, bbox x y w h)."""
    w, h = rng.uniform(0.05, 0.4) * width, rng.uniform(0.06, 0.5) * height
    x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
    angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    radii = rng.uniform(0.7, 1.0, 24)
    xs = x + w / 2 * (1 + radii * np.cos(angles))
    ys = y + h / 2 * (1 + radii * np.sin(angles))
    return np.stack([xs, ys], axis=1).ravel().tolist(), [x, y, w, h]


def write_coco_like(
    root: str | Path, n: int, *, width: int = 640, height: int = 480, objects: int = 7, seed: int = 0
) -> tuple[Path, Path, Path]:
    """`n` JPEGs (quality 90: a gradient, `objects` blurred polygons, sensor noise) in ROOT/images, their polygons in
    ROOT/instances.json and one caption each in ROOT/captions.json; returns those three paths."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    images, annotations, captions = [], [], []
    for i in range(n):
        base = np.stack([xx / width * rng.uniform(80, 200), yy / height * rng.uniform(80, 200),
                         np.full((height, width), rng.uniform(50, 200))], axis=-1)  # fmt: skip
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(objects):
            polygon, bbox = _blob(rng, width, height)
            draw.polygon(polygon, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
            category = int(rng.integers(1, len(CATEGORIES) + 1))
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category, "iscrowd": 0,
                                "bbox": bbox, "segmentation": [polygon], "area": bbox[2] * bbox[3]})  # fmt: skip
        noisy = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float64)
        noisy += rng.normal(0, 4, noisy.shape)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / "images" / f"{i:06d}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i:06d}.jpg", "width": width, "height": height})
        captions.append({"id": i, "image_id": i, "caption": f"a generated scene number {i}"})
    categories = [{"id": k, "name": name} for k, name in enumerate(CATEGORIES, 1)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))  # fmt: skip
    (root / "captions.json").write_text(json.dumps({"annotations": captions}))
    return root / "instances.json", root / "images", root / "captions.json"
