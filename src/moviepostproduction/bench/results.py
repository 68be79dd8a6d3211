"""What one `mpp bench` case measured: the timings of a (mode, tokens, refs) case, prepare and the encoders."""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class CaseResult:
    """One (mode, tokens, refs) case. Times in seconds, memory in MiB above the level before the call."""

    mode: str
    tokens: int
    text_tokens: int
    refs: int
    covered: float  # fraction of image tokens inside some box
    regions: int  # distinct modulation regions of the image stream (AdaLN linear runs once per region)
    layout_slots: int  # Assemble-Attn attention slots (rows x row length after packing; 0 without refs or shared)
    plain_times: tuple[float, ...]
    conditioned_times: tuple[float, ...]
    plain_peak_mib: float | None = None
    conditioned_peak_mib: float | None = None
    boxes: str = "small"
    layout_path: str = ""  # the Assemble-Attn plan of the scene: "buckets" or "shared" ("" without refs)
    mask_bytes: int = 0  # bytes of the masks that plan hands to attention per layout block (`PackedRows.mask_bytes`)

    @property
    def plain_s(self) -> float:
        return statistics.median(self.plain_times)

    @property
    def conditioned_s(self) -> float:
        return statistics.median(self.conditioned_times)

    @property
    def ratio(self) -> float:
        return self.conditioned_s / self.plain_s

    @property
    def round_ratios(self) -> tuple[float, ...]:
        """Conditioned / plain within each round (measured minutes apart at most): the spread shows the noise."""
        return tuple(c / p for c, p in zip(self.conditioned_times, self.plain_times, strict=True))


@dataclass(frozen=True)
class PrepareResult:
    """`adapter.prepare` (paid once per scene) against one conditioned forward step (paid every step)."""

    tokens: int
    refs: int
    prepare_s: float
    step_s: float | None  # median conditioned forward of the same case; None without forward mode

    @property
    def fraction(self) -> float | None:
        return None if self.step_s is None else self.prepare_s / self.step_s


@dataclass(frozen=True)
class EncoderResult:
    """The reference image encoders on `refs` images in one batch: paid once per scene (cached per image file)."""

    refs: int
    seconds: float
    encoders: str
