"""The toy world (DESIGN 6): procedural scenes of textured sprites on procedural backgrounds, with per-sprite
reference images, bboxes, depth labels, captions, masks and a semantic map. No weights can be downloaded,
so the project trains its default model on this world.

Deterministic: sample `index` of `seed` (and split) comes from its own numpy Generator, so it is the same
whatever the number of samples generated, and train / held-out splits are stable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.backgrounds import BACKGROUNDS, render_background
from moviepostproduction.toyworld.sprites import (
    COLOURS,
    PATTERNS,
    SEMANTIC_COLOURS,
    SHAPES,
    SpriteRaster,
    mask_bbox,
    render_sprite,
)
from moviepostproduction.toyworld.world_config import HELDOUT_COMBOS, ToyWorldConfig

__all__ = [
    "COLOURS",
    "DEPTHS",
    "GENERATOR_VERSION",
    "HELDOUT_COMBOS",
    "PATTERNS",
    "SHAPES",
    "SPLITS",
    "ToyRef",
    "ToyScene",
    "ToyWorldConfig",
    "generate_scene",
    "named_phrase",
]

# Bump whenever a change alters any generated pixel or label; the shard manifest records it.
GENERATOR_VERSION = "1"
DEPTHS: tuple[str, ...] = ("fg", "mg", "bg")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}  # split -> seed-stream id

# depth -> (diameter range, centre-y range), as fractions of the image side: front sprites are big and low,
# back sprites small and near the horizon.
_DEPTH_LAYOUT = {
    "fg": ((0.34, 0.48), (0.55, 0.75)),
    "mg": ((0.22, 0.32), (0.45, 0.65)),
    "bg": ((0.13, 0.20), (0.3, 0.55)),
}
_EXTRA_DEPTH_P = (0.1, 0.45, 0.45)  # the first ref is always fg; the others draw fg / mg / bg with these odds
_PATTERN_WORDS = {"solid": "", "stripes": "striped", "dots": "dotted", "checker": "checkered"}
_PLACEMENT_TRIES = 12


@dataclass
class ToyRef:
    shape: str
    colour: str
    pattern: str
    depth: str
    bbox: tuple[float, float, float, float]  # normalised xyxy of the whole (unoccluded) sprite
    caption: str  # "a red striped star"
    image: np.ndarray  # (ref_size, ref_size, 3) uint8: the sprite alone on white, re-rendered with jitter
    mask: np.ndarray  # (H, W) bool: the whole sprite
    visible_mask: np.ndarray  # (H, W) bool: the part not hidden by sprites in front

    @property
    def visible(self) -> float:
        return float(self.visible_mask.sum() / max(1, self.mask.sum()))


@dataclass
class ToyScene:
    index: int
    seed: int
    split: str
    background: str
    caption: str
    image: np.ndarray  # (H, W, 3) uint8
    semantic: np.ndarray  # (H, W, 3) uint8: SEMANTIC_COLOURS[shape] over visible sprite pixels, black elsewhere
    labels: np.ndarray  # (H, W) uint8: 0 background, i + 1 where ref i is visible
    refs: list[ToyRef] = field(default_factory=list)  # front to back: refs[0] is fg

    def meta(self) -> dict:
        """JSON-ready labels; the scene part follows the scene-file format (DESIGN 1)."""
        height, width = self.labels.shape
        return {
            "index": self.index,
            "seed": self.seed,
            "split": self.split,
            "generator_version": GENERATOR_VERSION,
            "caption": self.caption,
            "width": width,
            "height": height,
            "background": self.background,
            "refs": [
                {
                    "image": f"ref{i}.png",
                    "bbox": list(r.bbox),
                    "depth": r.depth,
                    "caption": r.caption,
                    "shape": r.shape,
                    "colour": r.colour,
                    "pattern": r.pattern,
                    "visible": round(r.visible, 4),
                }
                for i, r in enumerate(self.refs)
            ],
        }


def describe(colour: str, pattern: str, shape: str) -> str:
    """Caption of one sprite: "a red striped star", "an orange ring"."""
    phrase = " ".join(w for w in (colour, _PATTERN_WORDS[pattern], shape) if w)
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def named_phrase(phrase: str, caption: str) -> str | None:
    """A ref's phrase where the scene caption names it, else None: a dense world's caption names only its nearest
    `caption_refs` refs, and the others are conditioned by image and box alone (in training and in `mpp eval`)."""
    return phrase if phrase in caption else None


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(rng: np.random.Generator, refs: list[ToyRef], background: str) -> str:
    bg = BACKGROUNDS[background]
    front = _join([r.caption for r in refs if r.depth == "fg"])
    back_refs = [r.caption for r in refs if r.depth != "fg"]
    if back_refs:
        back = _join(back_refs)
        templates = (
            f"{front} in front of {back} on a {bg} background",
            f"{back} behind {front}, {bg} background",
            f"a {bg} scene with {front} in front of {back}",
        )
    else:
        templates = (f"{front} on a {bg} background", f"a {bg} scene with {front}", f"{front}, {bg} background")
    return templates[int(rng.integers(len(templates)))]


def _identities(rng: np.random.Generator, n: int, cfg: ToyWorldConfig, split: str) -> list[tuple[str, str, str]]:
    """(shape, colour, pattern) per ref, colours distinct (with `colour_repeats`: (shape, colour) pairs distinct);
    held-out combinations never reach the train split."""
    held = set(cfg.heldout_combos)
    free = list(COLOURS)
    used: set[tuple[str, str]] = set()
    out = []
    for i in range(n):
        pairs = [(s, c) for s in SHAPES for c in free if split == "heldout" or (s, c) not in held]
        pairs = [p for p in pairs if p not in used]
        if split == "heldout" and i == 0 and held and rng.random() < cfg.heldout_combo_prob:
            pairs = sorted(held)
        shape, colour = pairs[int(rng.integers(len(pairs)))]
        used.add((shape, colour))
        if not cfg.colour_repeats:
            free.remove(colour)
        out.append((shape, colour, PATTERNS[int(rng.integers(len(PATTERNS)))]))
    return out


def _draw_kwargs(rng: np.random.Generator, cfg: ToyWorldConfig) -> dict:
    return {
        "angle_deg": float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)),
        "phase": (float(rng.random()), float(rng.random())),
        "supersample": cfg.supersample,
    }


def _reference_image(rng: np.random.Generator, identity: tuple[str, str, str], cfg: ToyWorldConfig) -> np.ndarray:
    """The sprite alone on white, with its own scale / rotation / offset / pattern phase (not a crop)."""
    r = cfg.ref_size
    canvas = np.full((r, r, 3), 255.0, dtype=np.float32)
    radius = 0.5 * r * rng.uniform(0.72, 0.9)
    slack = 0.5 * r - radius
    centre = (0.5 * r + rng.uniform(-slack, slack), 0.5 * r + rng.uniform(-slack, slack))
    sprite = render_sprite(*identity, canvas_hw=(r, r), centre=centre, radius=radius, **_draw_kwargs(rng, cfg))
    sprite.composite(canvas)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _place(
    rng: np.random.Generator,
    identity: tuple[str, str, str],
    depth: str,
    diameter: float,
    cfg: ToyWorldConfig,
    behind: list[tuple[np.ndarray, np.ndarray]],
    over: np.ndarray | None = None,
) -> tuple[SpriteRaster, np.ndarray]:
    """Render one sprite at a random spot of its depth band, retrying so that every (full, visible) mask
    pair in `behind` keeps >= cfg.min_visible of its pixels; falls back to the least occluding try.
    `over`: the full mask of a farther sprite to overlap heavily instead: the centre is drawn within half a radius
    of that sprite's box centre (any height), and every farther sprite keeps >= cfg.overlap_min_visible."""
    size, radius = cfg.size, diameter / 2.0
    y_lo, y_hi = np.clip(np.asarray(_DEPTH_LAYOUT[depth][1]) * size, radius + 1, size - radius - 1)
    least = cfg.min_visible if over is None else cfg.overlap_min_visible
    best, best_mask, best_score = None, None, -1.0
    for _ in range(_PLACEMENT_TRIES):
        if over is None:
            centre = (rng.uniform(radius + 1, size - radius - 1), rng.uniform(y_lo, y_hi))
        else:
            x0, y0, x1, y1 = np.asarray(mask_bbox(over)) * size
            jitter = rng.uniform(-0.5, 0.5, size=2) * radius
            centre = tuple(
                np.clip(((x0 + x1) / 2 + jitter[0], (y0 + y1) / 2 + jitter[1]), radius + 1, size - radius - 1)
            )
        sprite = render_sprite(
            *identity, canvas_hw=(size, size), centre=centre, radius=radius, **_draw_kwargs(rng, cfg)
        )
        mask = sprite.full_mask((size, size))
        score = min((float((v & ~mask).sum() / f.sum()) for f, v in behind), default=1.0)
        if score > best_score:
            best, best_mask, best_score = sprite, mask, score
        if score >= least:
            break
    return best, best_mask


def generate_scene(index: int, seed: int, cfg: ToyWorldConfig | None = None, *, split: str = "train") -> ToyScene:
    """Scene `index` of the `split` stream of `seed`."""
    cfg = cfg or ToyWorldConfig()
    if split not in SPLITS:
        raise ValidationError([Problem("split", split, f"must be one of {sorted(SPLITS)}")])
    if index < 0 or seed < 0:
        raise ValidationError([Problem("index" if index < 0 else "seed", min(index, seed), "must be >= 0")])
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS[split], index]))
    size = cfg.size
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    n = int(rng.integers(cfg.min_refs, cfg.max_refs + 1))
    identities = _identities(rng, n, cfg, split)
    depths = ["fg"] + [str(d) for d in rng.choice(DEPTHS, size=n - 1, p=_EXTRA_DEPTH_P)]
    diameters = [rng.uniform(*_DEPTH_LAYOUT[d][0]) * size * cfg.size_scale for d in depths]
    # Dense options: drawn only when asked for, so the default world's random stream is untouched.
    small = rng.random(n) < cfg.small_prob if cfg.small_prob > 0 else np.zeros(n, dtype=bool)
    small[0] = False  # the first drawn sprite stays a full-size fg one, so every scene has one to judge identity on
    diameters = [rng.uniform(*cfg.small_diameter) * size if small[i] else d for i, d in enumerate(diameters)]
    heavy = rng.random(n) < cfg.overlap_prob if cfg.overlap_prob > 0 else np.zeros(n, dtype=bool)
    # Front to back: depth first, then bigger = nearer. Drawn in reverse so nearer sprites occlude.
    order = sorted(range(n), key=lambda i: (DEPTHS.index(depths[i]), -diameters[i]))

    canvas = render_background(background, size, rng)
    full: dict[int, np.ndarray] = {}  # ref -> (H, W) bool whole sprite
    visible: dict[int, np.ndarray] = {}  # ref -> (H, W) bool part not hidden by nearer sprites
    for i in reversed(order):
        over = full[list(full)[int(rng.integers(len(full)))]] if heavy[i] and full else None
        sprite, mask = _place(
            rng, identities[i], depths[i], diameters[i], cfg, [(full[j], visible[j]) for j in full], over
        )
        sprite.composite(canvas)
        for j in visible:
            visible[j] &= ~mask
        full[i], visible[i] = mask, mask.copy()

    refs = []
    for i in order:
        shape, colour, pattern = identities[i]
        refs.append(
            ToyRef(
                shape=shape,
                colour=colour,
                pattern=pattern,
                depth=depths[i],
                bbox=mask_bbox(full[i]),
                caption=describe(colour, pattern, shape),
                image=_reference_image(rng, identities[i], cfg),
                mask=full[i],
                visible_mask=visible[i],
            )
        )
    semantic = np.zeros((size, size, 3), dtype=np.uint8)
    labels = np.zeros((size, size), dtype=np.uint8)
    for j, ref in enumerate(refs):
        semantic[ref.visible_mask] = SEMANTIC_COLOURS[ref.shape]
        labels[ref.visible_mask] = j + 1
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    caption = _caption(rng, refs[: cfg.caption_refs], background)  # [:None]: every ref
    return ToyScene(index, seed, split, background, caption, image, semantic, labels, refs)
