"""Bad input met while importing data: one line naming the file and the record, or skipped and counted."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from moviepostproduction.errors import MppError, one_line, shown_path

# Why a record was left out, in the order the summary line lists them. Filters (always applied, always counted)
# come first; the rest are bad input, an error unless --skip-bad.
FILTERS = ("crowd", "small", "over max refs", "no refs")
BAD = (
    "bad annotation",
    "bad image record",
    "unknown category",
    "unknown image",
    "bbox outside image",
    "bad segmentation",
    "empty mask",
    "missing image",
    "unreadable image",
    "image size mismatch",
    "bad caption",
    "bad scene",
)


class DataProblem(MppError):
    """A malformed record: `{file}: {record}: {message}`; `reason` is its summary-line counter."""

    def __init__(self, file: object, record: str, message: str, reason: str):
        self.reason = reason
        super().__init__(f"{shown_path(file)}: {one_line(record, 80)}: {one_line(message, 300)}")


@dataclass
class Tally:
    """Counts of what was kept and what was skipped, by reason; `skip_bad` decides whether bad input is fatal."""

    skip_bad: bool = False
    skipped: Counter = field(default_factory=Counter)
    images: int = 0
    refs: int = 0

    def bad(self, problem: DataProblem) -> None:
        """Count `problem` when skipping bad input, else raise it."""
        if not self.skip_bad:
            raise problem
        self.skipped[problem.reason] += 1

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def summary(self) -> str:
        order = [*FILTERS, *BAD, *sorted(set(self.skipped) - set(FILTERS) - set(BAD))]
        parts = [f"{reason} {self.skipped[reason]}" for reason in order if self.skipped[reason]]
        return f"{self.images} images written, {self.refs} refs kept; skipped: {', '.join(parts) or 'none'}"
