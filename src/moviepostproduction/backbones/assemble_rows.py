"""Assemble-Attn groups packed into attention rows: several short groups share a row, one call for all.

Padding every group to the longest box wastes most of the attention when box sizes differ (a crowded scene
has a few large and many small boxes). Groups are packed first-fit-decreasing into rows as long as the
longest group, and a block-diagonal mask keeps each group to its own keys, so the attention does the same
work per group with far less padding. Pure index arithmetic on a `LayoutPacking`; no weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import LayoutPacking


@dataclass
class PackedRows:
    """Slot s of row p holds one token of one group; P rows of S = 1 + longest group slots each."""

    covered: torch.Tensor  # (M,) long: flat image tokens b * N + n inside some box, ascending
    source: torch.Tensor  # (P, S) long: row of the table [covered image tokens (M) ; layout tokens (G)]
    segment: torch.Tensor  # (P, S) long: group of each slot, -1 on padding
    target: torch.Tensor  # (P * S,) long: row of each slot's image token in `covered`; M for layout and padding
    group_slots: torch.Tensor  # (G, L) long: flat slot of each group's image tokens (padding: clamped, unused)

    @property
    def mask(self) -> torch.Tensor:
        """(P, S, S) bool: a slot attends to the slots of its own group (padding only to padding, never empty)."""
        return self.segment[:, :, None] == self.segment[:, None, :]


def first_fit_rows(lengths: list[int], width: int) -> list[tuple[int, int]]:
    """(row, start) per group: first-fit decreasing into rows of `width` slots (every length <= width)."""
    free: list[int] = []  # slots left in each row
    place = [(0, 0)] * len(lengths)
    for g in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((p for p, left in enumerate(free) if left >= lengths[g]), len(free))
        if row == len(free):
            free.append(width)
        place[g] = (row, width - free[row])
        free[row] -= lengths[g]
    return place


def pack_rows(packing: LayoutPacking, num_tokens: int) -> PackedRows:
    """Rows for the groups of `packing`; `num_tokens` = B * N, the number of flat image tokens."""
    device = packing.token_index.device
    covered = packing.cover.reshape(num_tokens).nonzero().squeeze(1)  # (M,)
    position = torch.zeros(num_tokens, dtype=torch.long, device=device)
    position[covered] = torch.arange(covered.numel(), device=device)  # flat token -> row of the covered table
    real = packing.key_mask  # (G, 1 + L): slot 0 is the layout token, always real
    g, width = real.shape
    place = first_fit_rows(real.sum(1).tolist(), width)
    rows = max((p for p, _ in place), default=-1) + 1
    offset = torch.tensor([p * width + s for p, s in place], dtype=torch.long, device=device)  # (G,)
    slots = (offset[:, None] + torch.arange(width, device=device)).clamp(max=max(rows * width - 1, 0))  # (G, 1 + L)
    layout = covered.numel() + torch.arange(g, device=device)[:, None]  # (G, 1): layout rows follow the image's
    source_index = torch.cat([layout, position[packing.token_index]], dim=1)  # (G, 1 + L)
    dump = torch.full_like(layout, covered.numel())
    target_index = torch.cat([dump, position[packing.token_index]], dim=1)  # (G, 1 + L)
    group = torch.arange(g, device=device)[:, None].expand_as(real)  # (G, 1 + L)

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        flat = torch.full((rows * width,), fill, dtype=torch.long, device=device)
        flat[slots[real]] = values[real]
        return flat

    return PackedRows(
        covered=covered,
        source=scatter(source_index, 0).view(rows, width),
        segment=scatter(group, -1).view(rows, width),
        target=scatter(target_index, covered.numel()),
        group_slots=slots[:, 1:],
    )
