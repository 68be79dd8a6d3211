"""Scores of one toy-world fill (`mpp eval-fill`, toyworld/fill_eval.py): semantic class accuracy inside the mask,
boundary error across its edge, and the known-region error outside it.

Class evidence of a pixel (`pixel_classes`): its named sprite colour (`sprite_match.colour_index_map`: within
COLOUR_TOLERANCE of a palette colour's base-to-tint segment; backgrounds are muted and never are) names the scene's
sprite of that colour, and the pixel takes that sprite's shape class. A pixel of no sprite colour is background; of
a colour no sprite of the scene has, no class (never right). Why colour: a shape class is not a property of one
pixel, but in the toy world a colour names exactly one sprite of the scene (colours are distinct per scene), so the
rule reads a generated image with the per-pixel precision of the map, and a fill of the wrong shape shows as class
pixels missing from, or spilling out of, the map's class region. On the target images the rule gives back the map
(the `targets` row: docs/fill.md). Anti-aliased sprite edges blend sprite and background colours, so the pixels
with another map label in their 3 x 3 neighbourhood (1 px either side of every class boundary) are not scored,
as PASCAL VOC leaves a void band on object boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from moviepostproduction.toyworld.regions import dilate
from moviepostproduction.toyworld.sprite_match import colour_index_map
from moviepostproduction.toyworld.sprites import COLOURS, SEMANTIC_COLOURS, SHAPES
from moviepostproduction.toyworld.synthetic import ToyScene

__all__ = [
    "BACKGROUND",
    "NO_CLASS",
    "FillScore",
    "edge_jump",
    "map_classes",
    "pixel_classes",
    "score_fill",
    "void_band",
]

BACKGROUND = 0  # class labels: 0 background, k + 1 for SHAPES[k]
NO_CLASS = -1  # a sprite colour that no sprite of the scene has: matches no label
MODES = ("sprites", "box", "extend")  # triptych.MASK_MODES, one table column each


def map_classes(semantic: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 semantic map -> (H, W) int labels: k + 1 where it shows SEMANTIC_COLOURS[SHAPES[k]], else 0."""
    labels = np.zeros(semantic.shape[:2], dtype=np.int64)
    for k, shape in enumerate(SHAPES):
        labels[(semantic[..., :3] == SEMANTIC_COLOURS[shape]).all(axis=-1)] = k + 1
    return labels


def pixel_classes(image: np.ndarray, scene: ToyScene) -> np.ndarray:
    """(H, W, 3) uint8 image of `scene` -> (H, W) int labels read from its colours (module docstring)."""
    colour = colour_index_map(image)  # (H, W): index into COLOURS, -1 for no sprite colour
    names = list(COLOURS)
    labels = np.where(colour < 0, BACKGROUND, NO_CLASS)
    for ref in scene.refs:
        labels[colour == names.index(ref.colour)] = SHAPES.index(ref.shape) + 1
    return labels


def void_band(labels: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels with another label in their 3 x 3 neighbourhood (not scored: anti-aliased edges)."""
    band = np.zeros(labels.shape, dtype=bool)
    for value in np.unique(labels):
        region = labels == value
        band |= dilate(~region, 1) & region
    return band


def edge_jump(image: np.ndarray, mask: np.ndarray) -> tuple[float, int]:
    """(sum, count) over the 4-neighbour pixel pairs that cross the mask edge (one inside, one outside) of the mean
    absolute RGB difference of the pair, in [0, 1] (/255)."""
    img = np.asarray(image, dtype=np.float64)[..., :3] / 255.0
    total, count = 0.0, 0
    for axis in (0, 1):
        a, b = (slice(None, -1), slice(1, None))
        first = (a, slice(None)) if axis == 0 else (slice(None), a)
        second = (b, slice(None)) if axis == 0 else (slice(None), b)
        crossing = mask[first] != mask[second]  # (H-1, W) or (H, W-1)
        diff = np.abs(img[first] - img[second]).mean(axis=-1)
        total += float(diff[crossing].sum())
        count += int(crossing.sum())
    return total, count


def score_fill(image: np.ndarray, target: np.ndarray, semantic: np.ndarray, mask: np.ndarray, scene: ToyScene) -> dict:
    """The counts of one fill `image` of `target` (both (H, W, 3) uint8) repainted inside `mask` (H, W) bool, judged
    against the `semantic` map of `scene`; pooled by `FillScore.row`."""
    truth = map_classes(semantic)
    scored = mask & ~void_band(truth)
    right = pixel_classes(image, scene) == truth
    cls, bg = scored & (truth != BACKGROUND), scored & (truth == BACKGROUND)
    jump, pairs = edge_jump(image, mask)
    target_jump, _ = edge_jump(target, mask)
    outside = np.abs(image.astype(np.int64) - target.astype(np.int64))[~mask]
    return {
        "class px": int(cls.sum()),
        "class right": int(right[cls].sum()),
        "background px": int(bg.sum()),
        "background right": int(right[bg].sum()),
        "edge pairs": pairs,
        "edge jump": round(jump / max(pairs, 1), 6),
        "target edge jump": round(target_jump / max(pairs, 1), 6),
        "edge jump sum": jump,
        "target edge jump sum": target_jump,
        "known error": int(outside.max(initial=0)),
    }


def _ratio(right: int, total: int) -> float:
    return right / total if total else math.nan


@dataclass
class FillScore:
    """A variant's per-sample records (the rows of samples.csv) and their pooled table row."""

    name: str
    samples: list[dict] = field(default_factory=list)

    def row(self) -> dict[str, float | str | int]:
        def pooled(key: str, records: list[dict]) -> float:
            return _ratio(sum(r[f"{key} right"] for r in records), sum(r[f"{key} px"] for r in records))

        s = self.samples
        pairs = sum(r["edge pairs"] for r in s)
        boundary = sum(r["edge jump sum"] - r["target edge jump sum"] for r in s) / pairs if pairs else math.nan
        row: dict[str, float | str | int] = {"model": self.name, "class acc": pooled("class", s)}
        for mode in MODES:
            row[f"class acc ({mode})"] = pooled("class", [r for r in s if r["mode"] == mode])
        row.update({
            "background acc": pooled("background", s),
            "boundary error": boundary,
            "known-region error": max((r["known error"] for r in s), default=0),
            "samples": len(s),
            "class px": sum(r["class px"] for r in s),
        })  # fmt: skip
        return row
