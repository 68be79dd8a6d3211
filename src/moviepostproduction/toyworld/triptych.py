"""Fill training data from the toy world (seed 004): triptychs [visible | target | semantic].

target is a toy scene, semantic its per-class colour map (`SEMANTIC_COLOURS`, black background), and visible the
target with a hole cut out (shown mid grey, the value 0 that the masked image has in [-1, 1]). The hole is one of:
- "sprites": the whole silhouettes of a random non-empty subset of the sprites, dilated a little (re-create an
  object from the semantic map: the map says which class goes where);
- "box": a random rectangle (classic inpainting);
- "extend": a band along one edge (set extension / outpainting).
Deterministic: triptych `index` of `seed` draws from its own stream, independent of how many are generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.synthetic import SPLITS, ToyScene, ToyWorldConfig, generate_scene

__all__ = ["MASK_MODES", "Triptych", "TriptychBatch", "TriptychConfig", "collate", "make_hole", "make_triptych"]

MASK_MODES: tuple[str, ...] = ("sprites", "box", "extend")
HOLE_GREY = 128  # uint8 closest to 0 in [-1, 1]
_STREAM = 4  # seed-stream id of the hole draws (the scene itself uses [seed, split, index])


@dataclass(frozen=True)
class TriptychConfig:
    world: ToyWorldConfig = field(default_factory=lambda: ToyWorldConfig(size=64, ref_size=32))
    modes: tuple[str, ...] = MASK_MODES
    dilate: int = 2  # pixels added around sprite silhouettes (covers their anti-aliased rim)
    box_range: tuple[float, float] = (0.25, 0.6)  # box side, fraction of the image side
    band_range: tuple[float, float] = (0.2, 0.45)  # extension band width, fraction of the image side

    def __post_init__(self) -> None:
        problems = [Problem("modes", m, f"must be one of {MASK_MODES}") for m in self.modes if m not in MASK_MODES]
        if not self.modes:
            problems.append(Problem("modes", self.modes, "needs at least one mask mode"))
        if self.dilate < 0:
            problems.append(Problem("dilate", self.dilate, "must be >= 0"))
        for name in ("box_range", "band_range"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 1:
                problems.append(Problem(name, (lo, hi), "needs 0 < low <= high < 1"))
        if problems:
            raise ValidationError(problems, source="TriptychConfig")


@dataclass
class Triptych:
    target: np.ndarray  # (H, W, 3) uint8: the toy scene
    semantic: np.ndarray  # (H, W, 3) uint8: class colours of the visible sprite pixels, black elsewhere
    mask: np.ndarray  # (H, W) bool: True = repaint
    caption: str
    mode: str

    @property
    def visible(self) -> np.ndarray:
        """(H, W, 3) uint8: the target with the hole in mid grey."""
        out = self.target.copy()
        out[self.mask] = HOLE_GREY
        return out

    def image(self) -> Image.Image:
        """The seed's training picture: [visible | target | semantic] side by side."""
        return Image.fromarray(np.concatenate([self.visible, self.target, self.semantic], axis=1))


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels == 0:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
    return np.asarray(img) > 127


def make_hole(mode: str, scene: ToyScene, rng: np.random.Generator, cfg: TriptychConfig) -> np.ndarray:
    """(H, W) bool repaint mask of one mode; never empty."""
    h, w = scene.labels.shape
    if mode == "sprites":
        n = len(scene.refs)
        chosen = rng.permutation(n)[: int(rng.integers(1, n + 1))]
        mask = np.zeros((h, w), dtype=bool)
        for i in chosen:
            mask |= scene.refs[int(i)].mask
        return _dilate(mask, cfg.dilate)
    mask = np.zeros((h, w), dtype=bool)
    if mode == "box":
        bh, bw = (max(1, round(rng.uniform(*cfg.box_range) * s)) for s in (h, w))
        y0, x0 = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mask[y0 : y0 + bh, x0 : x0 + bw] = True
        return mask
    if mode == "extend":
        side = int(rng.integers(4))  # left, right, top, bottom
        span = w if side < 2 else h
        band = max(1, round(rng.uniform(*cfg.band_range) * span))
        region = [slice(None), slice(None)]
        region[1 if side < 2 else 0] = slice(0, band) if side % 2 == 0 else slice(span - band, span)
        mask[tuple(region)] = True
        return mask
    raise ValidationError([Problem("mode", mode, f"must be one of {MASK_MODES}")])


def make_triptych(index: int, seed: int, cfg: TriptychConfig | None = None, *, split: str = "train") -> Triptych:
    """Triptych `index` of the `split` stream of `seed`."""
    cfg = cfg or TriptychConfig()
    scene = generate_scene(index, seed, cfg.world, split=split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index, _STREAM]))
    mode = cfg.modes[int(rng.integers(len(cfg.modes)))]
    return Triptych(scene.image, scene.semantic, make_hole(mode, scene, rng, cfg), scene.caption, mode)


@dataclass
class TriptychBatch:
    target: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    semantic: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    mask: torch.Tensor  # (B, 1, H, W) float, 1 = repaint
    captions: list[str]


def _pixels(arrays: list[np.ndarray]) -> torch.Tensor:
    stacked = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    return stacked.float() / 127.5 - 1.0


def collate(items: list[Triptych]) -> TriptychBatch:
    masks = torch.from_numpy(np.stack([t.mask for t in items]))[:, None].float()  # (B, 1, H, W)
    return TriptychBatch(
        _pixels([t.target for t in items]), _pixels([t.semantic for t in items]), masks, [t.caption for t in items]
    )
