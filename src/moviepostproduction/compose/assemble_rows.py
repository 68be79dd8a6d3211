"""Assemble-Attn groups packed into attention rows: a few batched calls for all groups, whatever their number.

A group of length l ([layout token ; its box's image tokens]) costs l^2 of attention work, but a batched call
pads every row to one width S and computes S^2 per row whatever its mask hides. Two ideas keep the padding
small (docs/benchmarks.md):
- size buckets: groups sorted by length are split into at most MAX_BUCKETS buckets, each one attention call
  padded to its own longest group; the split minimises sum(rows * S^2) exactly (dynamic programming);
- row packing: inside a bucket, groups are packed first-fit-decreasing into rows of S slots, several short
  groups sharing one row, and a block-diagonal mask keeps each group to its own keys.
Pure index arithmetic on a `LayoutPacking`; no weights.
"""

from __future__ import annotations

import numpy as np
import torch

from moviepostproduction.compose.conditioning import MAX_BUCKETS, LayoutPacking, PackedRows, RowBucket

MIN_GAIN = 0.05  # one more bucket (call) only if it cuts the attention work by more than this fraction


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


def size_buckets(lengths: list[int], max_buckets: int = MAX_BUCKETS) -> list[list[int]]:
    """Group indices split into at most `max_buckets` runs of the length-sorted order, longest run last.

    The split minimises sum over buckets of count * longest^2 (each group padded to its bucket's longest): cost[k, i]
    is the least work for the i shortest groups in k buckets, over the start j of the last bucket. The fewest
    buckets within MIN_GAIN of the least work are used.
    """
    n = len(lengths)
    if n == 0:
        return []
    order = sorted(range(n), key=lengths.__getitem__)
    square = np.asarray([lengths[i] for i in order], dtype=np.float64) ** 2
    k_max = min(max_buckets, n)
    cost = np.full((k_max + 1, n + 1), np.inf)
    cost[0, 0] = 0.0
    start = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    for k in range(1, k_max + 1):
        for i in range(1, n + 1):
            options = cost[k - 1, :i] + (i - np.arange(i)) * square[i - 1]  # last bucket = groups j .. i-1
            start[k, i] = int(options.argmin())
            cost[k, i] = options[start[k, i]]
    best = cost[1:, n].min()
    k = 1 + int(np.flatnonzero(cost[1:, n] <= best * (1 + MIN_GAIN))[0])
    runs, i = [], n
    for level in range(k, 0, -1):
        j = int(start[level, i])
        runs.append(order[j:i])
        i = j
    return runs[::-1]


def pack_rows(packing: LayoutPacking, num_tokens: int, max_buckets: int = MAX_BUCKETS) -> PackedRows:
    """Rows for the groups of `packing`; `num_tokens` = B * N, the number of flat image tokens."""
    device = packing.token_index.device
    covered = packing.cover.reshape(num_tokens).nonzero().squeeze(1)  # (M,)
    position = torch.zeros(num_tokens, dtype=torch.long, device=device)
    position[covered] = torch.arange(covered.numel(), device=device)  # flat token -> row of the covered table
    real = packing.key_mask  # (G, 1 + L): slot 0 is the layout token, always real, then the box's tokens
    g, width = real.shape
    lengths = real.sum(1).tolist()

    offsets, shapes, total = [0] * g, [], 0  # flat slot of each group's first slot; (rows, S) per bucket
    for members in size_buckets(lengths, max_buckets):
        s = max(lengths[i] for i in members)
        place = first_fit_rows([lengths[i] for i in members], s)
        for i, (p, at) in zip(members, place, strict=True):
            offsets[i] = total + p * s + at
        rows = 1 + max(p for p, _ in place)
        shapes.append((rows, s))
        total += rows * s
    offset = torch.tensor(offsets, dtype=torch.long, device=device)  # (G,)
    slots = (offset[:, None] + torch.arange(width, device=device)).clamp(max=max(total - 1, 0))  # (G, 1 + L)
    layout = covered.numel() + torch.arange(g, device=device)[:, None]  # (G, 1): layout rows follow the image's
    dump = torch.full_like(layout, covered.numel())

    def scatter(values: torch.Tensor, fill: int) -> torch.Tensor:
        flat = torch.full((total,), fill, dtype=torch.long, device=device)
        flat[slots[real]] = values[real]
        return flat

    source = scatter(torch.cat([layout, position[packing.token_index]], dim=1), 0)  # (total,)
    segment = scatter(torch.arange(g, device=device)[:, None].expand_as(real), -1)
    target = scatter(torch.cat([dump, position[packing.token_index]], dim=1), covered.numel())
    buckets, at = [], 0
    for rows, s in shapes:
        part = slice(at, at + rows * s)
        buckets.append(RowBucket(source[part].view(rows, s), segment[part].view(rows, s), target[part]))
        at += rows * s
    return PackedRows(covered=covered, buckets=tuple(buckets), group_slots=slots[:, 1:], max_buckets=max_buckets)
