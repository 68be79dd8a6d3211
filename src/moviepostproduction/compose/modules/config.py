"""Configuration of the conditioning modules (DESIGN 2). Defaults equal FLUX.1-dev; tiny configs are derived."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

from moviepostproduction.encoders.checks import MAX_LAYERS, MAX_WIDTH, count
from moviepostproduction.errors import shown
from moviepostproduction.layout import fourier_dim
from moviepostproduction.scene import DEPTHS

MAX_REFS = 4096  # refs one scene may give the adapter (scenes default to at most 50)

__all__ = ["DEPTHS", "PRESETS", "ConditioningConfig"]


@dataclass(frozen=True)
class ConditioningConfig:
    hidden_dim: int = 3072  # D: backbone hidden size
    clip_dim: int = 768  # C: CLIP image-embed width
    dino_dim: int = 1024  # G: DINO CLS width
    instance_dim: int = 1024  # width of the spatial and visual halves before fusion
    dense_k: int = 4  # DenseSample K x K points per box
    fourier_freqs: int = 16  # 16 points x (2 coords x sin/cos x 16) = 1024 (seed 001)
    alpha_hidden: int = 256
    num_double_blocks: int = 19
    num_single_blocks: int = 38
    modulation_rank: int = 64  # low-rank per-block projections of the ModulationHead
    feedback_rank: int = 16
    layout_blocks: tuple[int, ...] | None = None  # double blocks with Assemble-Attn; None = every 3rd
    grounding_ratio: float = 0.3  # fraction of denoising steps (from t=1) with Assemble-Attn active
    soft_masks: bool = False
    soft_sigma: float = 1.5  # in tokens
    max_refs: int = 50
    box_position_freqs: int = 0  # > 0: Assemble-Attn adds a BoxPositionEncoding per layout block (0: off, DESIGN 3)
    box_position_rank: int = 64  # its hidden width
    box_patch_rank: int = 0  # > 0: Assemble-Attn lays each ref's DINO patch tokens into its box (0: off; design note)
    # Occlusion priority where boxes overlap (compose/modules/occlusion.py): the log-weight of a fg, mg, bg ref, and
    # within one depth label each ref listed earlier (nearer) weighs e^order_priority times the next one. All 0: the
    # overlapping refs are averaged (DESIGN 3).
    depth_priority: tuple[float, float, float] = (0.0, 0.0, 0.0)
    order_priority: float = 0.0

    def __post_init__(self) -> None:
        for name in ("depth_priority", "layout_blocks"):  # as JSON and YAML give them
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = [f"{name}={_shown(getattr(self, name))} {message}" for name, message in self._problems()]
        if problems:
            raise ValueError("invalid ConditioningConfig: " + "; ".join(problems))

    def _problems(self) -> Iterator[tuple[str, str]]:
        """(field, what it must be) for each bad field; counts are bounded so that a typo (10**9 blocks) is refused
        before any module is built."""
        for name, check in COUNTS.items():
            if message := check(getattr(self, name)):
                yield name, message
        depth = self.depth_priority
        if not isinstance(depth, tuple) or len(depth) != len(DEPTHS) or not all(map(_is_finite, depth)):
            yield "depth_priority", f"must be {len(DEPTHS)} finite numbers ({', '.join(DEPTHS)})"
        if not _is_finite(self.order_priority) or self.order_priority < 0:
            yield "order_priority", "must be a finite number >= 0"
        if not (_is_finite(self.grounding_ratio) and 0.0 <= self.grounding_ratio <= 1.0):
            yield "grounding_ratio", "must be a number in [0, 1]"
        if not (_is_finite(self.soft_sigma) and self.soft_sigma > 0):
            yield "soft_sigma", "must be a finite number > 0 (tokens)"
        if not isinstance(self.soft_masks, bool):
            yield "soft_masks", "must be true or false"
        blocks, double = self.layout_blocks, self.num_double_blocks
        if blocks is not None and not (isinstance(blocks, tuple) and all(_is_int(b) for b in blocks)):
            yield "layout_blocks", "must be a list of block indices or null"
        elif COUNTS["num_double_blocks"](double) is None and any(
            not 0 <= b < double for b in self.resolved_layout_blocks
        ):
            yield "layout_blocks", f"must index double blocks in [0, {double})"

    @property
    def spatial_dim(self) -> int:
        return fourier_dim(self.dense_k, self.fourier_freqs)

    @property
    def uses_occlusion_priority(self) -> bool:
        """False: overlapping boxes are averaged (DESIGN 3), and no weights are computed."""
        return any(self.depth_priority) or self.order_priority > 0

    @property
    def resolved_layout_blocks(self) -> tuple[int, ...]:
        if self.layout_blocks is None:
            return tuple(range(0, self.num_double_blocks, 3))
        return tuple(self.layout_blocks)

    @classmethod
    def for_transformer(cls, transformer, **overrides) -> ConditioningConfig:
        """Derive D and block counts from a diffusers FluxTransformer2DModel's config."""
        cfg = transformer.config
        base = dict(
            hidden_dim=cfg.num_attention_heads * cfg.attention_head_dim,
            num_double_blocks=cfg.num_layers,
            num_single_blocks=cfg.num_single_layers,
        )
        return cls(**{**base, **overrides})

    def with_(self, **changes) -> ConditioningConfig:
        return replace(self, **changes)


def _is_finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _shown(value) -> str:
    """A value as the config file gave it: JSON's lists were made tuples above."""
    return shown(list(value) if isinstance(value, tuple) else value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The integer fields and their bounds (encoders/checks.py: the maxima of every model dir config).
COUNTS = {
    **dict.fromkeys(("hidden_dim", "clip_dim", "dino_dim", "instance_dim", "alpha_hidden"), count(1, MAX_WIDTH)),
    **dict.fromkeys(("modulation_rank", "feedback_rank", "box_position_rank", "box_patch_rank"), count(0, MAX_WIDTH)),
    **dict.fromkeys(("num_double_blocks", "num_single_blocks"), count(0, MAX_LAYERS)),
    "dense_k": count(2, 64),  # K x K points per box, corners included
    "fourier_freqs": count(1, 1024),
    "box_position_freqs": count(0, 1024),
    "max_refs": count(1, MAX_REFS),
}


PRESETS: dict[str, ConditioningConfig] = {
    "flux-dev": ConditioningConfig(),
    "tiny": ConditioningConfig(
        hidden_dim=32,
        clip_dim=16,
        dino_dim=24,
        instance_dim=32,
        dense_k=2,
        fourier_freqs=4,
        alpha_hidden=16,
        num_double_blocks=2,
        num_single_blocks=1,
        modulation_rank=4,
        feedback_rank=4,
        layout_blocks=(0, 1),
    ),
}
