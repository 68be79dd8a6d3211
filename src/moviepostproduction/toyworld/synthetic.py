"""The toy world (DESIGN 6): procedural scenes of textured sprites on procedural backgrounds, with per-sprite
reference images, bboxes, depth labels, captions, masks and a semantic map. No weights can be downloaded,
so the project trains its default model on this world.

Deterministic: sample `index` of `seed` (and split) comes from its own numpy Generator, so it is the same
whatever the number of samples generated, and train / held-out splits are stable.
"""

from __future__ import annotations

import dataclasses
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
]

# Bump whenever a change alters any generated pixel or label; the shard manifest records it.
GENERATOR_VERSION = "1"
DEPTHS: tuple[str, ...] = ("fg", "mg", "bg")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}  # split -> seed-stream id

# One (shape, colour) pair per shape and per colour never appears in training: every shape and colour is
# seen, only these combinations are new in the held-out split (compositional generalisation).
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("circle", "orange"),
    ("square", "purple"),
    ("triangle", "blue"),
    ("diamond", "yellow"),
    ("star", "green"),
    ("ring", "red"),
    ("cross", "cyan"),
)

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


@dataclass(frozen=True)
class ToyWorldConfig:
    size: int = 128  # scene side in pixels (scenes are square)
    ref_size: int = 64  # reference image side in pixels
    min_refs: int = 1
    max_refs: int = 4  # <= len(COLOURS): colours are distinct within a scene, so captions are unambiguous
    supersample: int = 2  # anti-aliasing samples per pixel side
    min_visible: float = 0.5  # placement keeps at least this fraction of every occluded sprite visible
    rotation_deg: float = 10.0  # sprites rotate by U(-r, r); small, so a rotated square never becomes a diamond
    heldout_combos: tuple[tuple[str, str], ...] = HELDOUT_COMBOS
    heldout_combo_prob: float = 0.5  # chance that a held-out scene's first ref is a held-out combination

    def __post_init__(self) -> None:
        checks = [
            ("size", 32 <= self.size <= 4096, "must be in [32, 4096]"),
            ("ref_size", 16 <= self.ref_size <= 4096, "must be in [16, 4096]"),
            ("min_refs", 1 <= self.min_refs <= self.max_refs, f"must be in [1, max_refs={self.max_refs}]"),
            ("max_refs", self.max_refs <= len(COLOURS), f"must be <= {len(COLOURS)} (one colour per ref)"),
            ("supersample", 1 <= self.supersample <= 8, "must be in [1, 8]"),
            ("min_visible", 0.0 <= self.min_visible <= 1.0, "must be in [0, 1]"),
            ("rotation_deg", 0.0 <= self.rotation_deg <= 20.0, "must be in [0, 20]"),
            ("heldout_combo_prob", 0.0 <= self.heldout_combo_prob <= 1.0, "must be in [0, 1]"),
        ]
        problems = [Problem(f, getattr(self, f), msg) for f, ok, msg in checks if not ok]
        problems += [
            Problem(f"heldout_combos[{i}]", combo, "must be a (shape, colour) pair of SHAPES x COLOURS")
            for i, combo in enumerate(self.heldout_combos)
            if len(combo) != 2 or combo[0] not in SHAPES or combo[1] not in COLOURS
        ]
        held = set(self.heldout_combos)
        train_colours = {c for s in SHAPES for c in COLOURS if (s, c) not in held}
        if len(train_colours) < min(self.max_refs, len(COLOURS)):  # train scenes need max_refs distinct colours
            problems.append(Problem("heldout_combos", self.heldout_combos, "leaves too few colours for training"))
        if problems:
            raise ValidationError(problems, source="ToyWorldConfig")

    def to_dict(self) -> dict:
        """JSON-native (lists, not tuples), so a manifest reads back equal to what was written."""
        return {**dataclasses.asdict(self), "heldout_combos": [list(c) for c in self.heldout_combos]}

    @classmethod
    def from_dict(cls, data: dict) -> ToyWorldConfig:
        data = dict(data)
        if "heldout_combos" in data:
            data["heldout_combos"] = tuple(tuple(c) for c in data["heldout_combos"])
        return cls(**data)


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
    """(shape, colour, pattern) per ref, colours distinct; held-out combinations never reach the train split."""
    held = set(cfg.heldout_combos)
    free = list(COLOURS)
    out = []
    for i in range(n):
        pairs = [(s, c) for s in SHAPES for c in free if split == "heldout" or (s, c) not in held]
        if split == "heldout" and i == 0 and held and rng.random() < cfg.heldout_combo_prob:
            pairs = sorted(held)
        shape, colour = pairs[int(rng.integers(len(pairs)))]
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
) -> tuple[SpriteRaster, np.ndarray]:
    """Render one sprite at a random spot of its depth band, retrying so that every (full, visible) mask
    pair in `behind` keeps >= cfg.min_visible of its pixels; falls back to the least occluding try."""
    size, radius = cfg.size, diameter / 2.0
    y_lo, y_hi = np.clip(np.asarray(_DEPTH_LAYOUT[depth][1]) * size, radius + 1, size - radius - 1)
    best, best_mask, best_score = None, None, -1.0
    for _ in range(_PLACEMENT_TRIES):
        centre = (rng.uniform(radius + 1, size - radius - 1), rng.uniform(y_lo, y_hi))
        sprite = render_sprite(
            *identity, canvas_hw=(size, size), centre=centre, radius=radius, **_draw_kwargs(rng, cfg)
        )
        mask = sprite.full_mask((size, size))
        score = min((float((v & ~mask).sum() / f.sum()) for f, v in behind), default=1.0)
        if score > best_score:
            best, best_mask, best_score = sprite, mask, score
        if score >= cfg.min_visible:
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
    diameters = [rng.uniform(*_DEPTH_LAYOUT[d][0]) * size for d in depths]
    # Front to back: depth first, then bigger = nearer. Drawn in reverse so nearer sprites occlude.
    order = sorted(range(n), key=lambda i: (DEPTHS.index(depths[i]), -diameters[i]))

    canvas = render_background(background, size, rng)
    full: dict[int, np.ndarray] = {}  # ref -> (H, W) bool whole sprite
    visible: dict[int, np.ndarray] = {}  # ref -> (H, W) bool part not hidden by nearer sprites
    for i in reversed(order):
        sprite, mask = _place(rng, identities[i], depths[i], diameters[i], cfg, [(full[j], visible[j]) for j in full])
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
    return ToyScene(index, seed, split, background, _caption(rng, refs, background), image, semantic, labels, refs)
