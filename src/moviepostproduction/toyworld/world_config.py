"""ToyWorldConfig: what the toy world draws (canvas, ref counts, sprites, placement, the held-out pairs), checked at
construction; the defaults are the 1-4-ref world, `ToyWorldConfig.dense()` the dense one of issue 44."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.sprites import COLOURS, SHAPES

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
MAX_DENSE_REFS = 16  # with colour_repeats (issue 44: 16 refs per shot in the toy world); pairs stay distinct


@dataclass(frozen=True)
class ToyWorldConfig:
    size: int = 128  # scene side in pixels (scenes are square)
    ref_size: int = 64  # reference image side in pixels
    min_refs: int = 1
    max_refs: int = 4  # <= len(COLOURS): colours distinct in a scene, so captions are unambiguous (else <= 16)
    supersample: int = 2  # anti-aliasing samples per pixel side
    min_visible: float = 0.5  # placement keeps at least this fraction of every occluded sprite visible
    rotation_deg: float = 10.0  # sprites rotate by U(-r, r); small, so a rotated square never becomes a diamond
    heldout_combos: tuple[tuple[str, str], ...] = HELDOUT_COMBOS
    heldout_combo_prob: float = 0.5  # chance that a held-out scene's first ref is a held-out combination
    # Dense scenes (issue 44); the defaults are the 1-4-ref world, whose scenes these leave bit for bit as they were.
    colour_repeats: bool = False  # False: colours distinct in a scene; True: (shape, colour) pairs distinct instead
    size_scale: float = 1.0  # every sprite diameter times this (crowded scenes need smaller sprites)
    overlap_prob: float = 0.0  # chance that a ref is placed over a farther one (heavy overlap), if there is one
    overlap_min_visible: float = 0.15  # what such a placement leaves visible of every farther sprite, at least
    small_prob: float = 0.0  # chance that a ref after the first gets a small box (small_diameter, not its depth's)
    small_diameter: tuple[float, float] = (0.08, 0.1)  # fraction of the side, not scaled: below every bg sprite
    caption_refs: int | None = None  # the scene caption names the first (nearest) this many refs; None: all

    def __post_init__(self) -> None:
        checks = [
            ("size", 32 <= self.size <= 4096, "must be in [32, 4096]"),
            ("ref_size", 16 <= self.ref_size <= 4096, "must be in [16, 4096]"),
            ("min_refs", 1 <= self.min_refs <= self.max_refs, f"must be in [1, max_refs={self.max_refs}]"),
            ("max_refs", self.max_refs <= self.most_refs, f"must be <= {self.most_refs} ({self._per_ref})"),
            ("supersample", 1 <= self.supersample <= 8, "must be in [1, 8]"),
            ("min_visible", 0.0 <= self.min_visible <= 1.0, "must be in [0, 1]"),
            ("rotation_deg", 0.0 <= self.rotation_deg <= 20.0, "must be in [0, 20]"),
            ("heldout_combo_prob", 0.0 <= self.heldout_combo_prob <= 1.0, "must be in [0, 1]"),
            ("size_scale", 0.25 <= self.size_scale <= 1.0, "must be in [0.25, 1]"),
            ("overlap_prob", 0.0 <= self.overlap_prob <= 1.0, "must be in [0, 1]"),
            ("overlap_min_visible", 0.0 <= self.overlap_min_visible <= self.min_visible, "must be in [0, min_visible]"),
            ("small_prob", 0.0 <= self.small_prob <= 1.0, "must be in [0, 1]"),
            ("caption_refs", self.caption_refs is None or _count(self.caption_refs), "must be >= 1 (or None: all)"),
            (
                "small_diameter",
                _span(self.small_diameter) and 0.02 <= self.small_diameter[0] <= self.small_diameter[1] <= 0.5,
                "must be (low, high) with 0.02 <= low <= high <= 0.5",
            ),
        ]
        problems = [Problem(f, getattr(self, f), msg) for f, ok, msg in checks if not ok]
        problems += [
            Problem(f"heldout_combos[{i}]", combo, "must be a (shape, colour) pair of SHAPES x COLOURS")
            for i, combo in enumerate(self.heldout_combos)
            if len(combo) != 2 or combo[0] not in SHAPES or combo[1] not in COLOURS
        ]
        held = set(self.heldout_combos)
        train_colours = {c for s in SHAPES for c in COLOURS if (s, c) not in held}
        if len(train_colours) < min(self.max_refs, len(COLOURS)) and not self.colour_repeats:  # distinct colours
            problems.append(Problem("heldout_combos", self.heldout_combos, "leaves too few colours for training"))
        if problems:
            raise ValidationError(problems, source="ToyWorldConfig")

    @property
    def most_refs(self) -> int:
        return MAX_DENSE_REFS if self.colour_repeats else len(COLOURS)

    @property
    def _per_ref(self) -> str:
        return "one (shape, colour) pair per ref" if self.colour_repeats else "one colour per ref; colour_repeats: 16"

    @classmethod
    def dense(cls, **overrides) -> ToyWorldConfig:
        """The dense world of issue 44 (docs/toy-world.md): up to 16 refs on a 320 px canvas, colours repeating,
        sprites at 0.8 of their size, a quarter of the refs placed over a farther one, a fifth with a small box, and
        the scene caption naming the 4 nearest refs (the toy T5's 64 tokens hold 4 sprite phrases, not 5)."""
        preset = {"size": 320, "max_refs": MAX_DENSE_REFS, "colour_repeats": True, "size_scale": 0.8,
                  "overlap_prob": 0.25, "small_prob": 0.2, "caption_refs": 4}  # fmt: skip
        return cls(**{**preset, **overrides})

    def to_dict(self) -> dict:
        """JSON-native (lists, not tuples), so a manifest reads back equal to what was written. The dense fields
        are left out while they hold their defaults, so the manifests of the 1-4-ref world are as they were."""
        data = {**dataclasses.asdict(self), "heldout_combos": [list(c) for c in self.heldout_combos]}
        data["small_diameter"] = list(self.small_diameter)
        plain = ToyWorldConfig()
        return {k: v for k, v in data.items() if k not in _DENSE_FIELDS or getattr(self, k) != getattr(plain, k)}

    @classmethod
    def from_dict(cls, data: dict) -> ToyWorldConfig:
        data = dict(data)
        if "heldout_combos" in data:
            data["heldout_combos"] = tuple(tuple(c) for c in data["heldout_combos"])
        if "small_diameter" in data:
            data["small_diameter"] = tuple(data["small_diameter"])
        return cls(**data)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _span(value: object) -> bool:
    """A (low, high) pair of plain numbers."""
    pair = isinstance(value, tuple | list) and len(value) == 2
    return pair and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)


_DENSE_FIELDS = (
    "colour_repeats",
    "size_scale",
    "overlap_prob",
    "overlap_min_visible",
    "small_prob",
    "small_diameter",
    "caption_refs",
)
