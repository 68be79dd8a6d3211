"""Assemble-Attn groups planned into attention calls: a few batched calls for all groups, whatever their number.

A group of length l ([layout token ; its box's image tokens]) costs l^2 of attention work. Two plans:
- size buckets (`bucket_rows`): groups sorted by length are split into at most MAX_BUCKETS buckets, each one attention
  call of one group per row, padded to its bucket's longest group; the split minimises sum(rows * S^2) exactly
  (dynamic programming). The only mask is which keys of a row are real, (rows, S) bools: a prefix, as varlen
  kernels take it, and none at all when a bucket's groups are equally long.
- shared (`shared_rows`): for crowded or large boxes, where sum l^2 passes the covered tokens squared, one attention
  per sample over its covered tokens gives every group's output exactly (`compose.assemble_shared`), no mask.
`pack_rows` builds either, or on request the cheaper by a cost model. Pure index arithmetic on a `LayoutPacking`;
no weights.
"""

from __future__ import annotations

import numpy as np
import torch

from moviepostproduction.compose.conditioning import MAX_BUCKETS, LayoutPacking, PackedRows, RowBucket, SharedCover

PATHS = ("auto", "buckets", "shared")
# Per query-key pair, the shared path's QK^T and PV come with two rank-G matmuls and a few elementwise passes that a
# fused attention kernel does not pay; measured on CPU (docs/benchmarks.md), 4096 tokens, FLUX.1-dev heads.
SHARED_OVERHEAD = 1.5
# Below this many query-key pairs (one fully covered 1024-token frame) the attention is a small part of a block and
# the few fused bucket calls beat the shared path's dozen ops per chunk; "auto" keeps the buckets there.
MIN_SHARED_PAIRS = 2**20
MIN_GAIN = 0.05  # one more bucket (call) only if it cuts the attention work by more than this fraction


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


def bucket_rows(packing: LayoutPacking, num_tokens: int, max_buckets: int = MAX_BUCKETS) -> PackedRows:
    """Size-bucket rows for the groups of `packing`; `num_tokens` = B * N, the number of flat image tokens."""
    device = packing.token_index.device
    covered = packing.cover.reshape(num_tokens).nonzero().squeeze(1)  # (M,)
    position = torch.zeros(num_tokens, dtype=torch.long, device=device)
    position[covered] = torch.arange(covered.numel(), device=device)  # flat token -> row of the covered table
    real = packing.key_mask  # (G, 1 + L): slot 0 is the layout token, always real, then the box's tokens
    g, width = real.shape
    lengths = real.sum(1).tolist()

    offsets, shapes, total = [0] * g, [], 0  # flat slot of each group's first slot; (rows, S, padded) per bucket
    for members in size_buckets(lengths, max_buckets):
        s = max(lengths[i] for i in members)
        for p, i in enumerate(members):
            offsets[i] = total + p * s
        shapes.append((len(members), s, any(lengths[i] < s for i in members)))
        total += len(members) * s
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
    for rows, s, padded in shapes:
        part = slice(at, at + rows * s)
        buckets.append(RowBucket(source[part].view(rows, s), segment[part].view(rows, s), target[part], padded))
        at += rows * s
    return PackedRows(covered=covered, buckets=tuple(buckets), group_slots=slots[:, 1:], max_buckets=max_buckets)


def shared_rows(packing: LayoutPacking, num_tokens: int, max_buckets: int = MAX_BUCKETS) -> PackedRows:
    """The shared plan: each sample's covered tokens, and which of its groups' boxes hold each (`SharedCover`)."""
    device = packing.token_index.device
    covered = packing.cover.reshape(num_tokens).nonzero().squeeze(1)  # (M,)
    position = torch.zeros(num_tokens, dtype=torch.long, device=device)
    position[covered] = torch.arange(covered.numel(), device=device)
    real = packing.key_mask[:, 1:]  # (G, L)
    membership = torch.zeros(covered.numel(), packing.num_groups, dtype=torch.bool, device=device)  # (M, G)
    membership[position[packing.token_index[real]], packing.slot_groups()] = True
    n = num_tokens // packing.cover.shape[0]
    rows_per_sample = torch.bincount(torch.div(covered, n, rounding_mode="floor"), minlength=packing.cover.shape[0])
    groups_per_sample = torch.bincount(packing.group_batch, minlength=packing.cover.shape[0])
    if packing.num_groups and not bool((packing.group_batch[1:] >= packing.group_batch[:-1]).all()):
        raise ValueError("LayoutPacking.group_batch must be ascending (groups sample by sample)")
    spans, m0, g0 = [], 0, 0
    for rows, groups in zip(rows_per_sample.tolist(), groups_per_sample.tolist(), strict=True):
        if groups:
            spans.append((m0, m0 + rows, g0, g0 + groups))
        m0, g0 = m0 + rows, g0 + groups
    cover = SharedCover(membership=membership, spans=tuple(spans))
    return PackedRows(covered=covered, buckets=(), group_slots=None, max_buckets=max_buckets, shared=cover)


def bucket_work(lengths: list[int], max_buckets: int = MAX_BUCKETS) -> int:
    """Query-key pairs of the size-bucket plan: rows x S^2 per bucket."""
    return sum(len(run) * max(lengths[i] for i in run) ** 2 for run in size_buckets(lengths, max_buckets))


def shared_work(packing: LayoutPacking, head_dim: int) -> float:
    """Query-key pairs of the shared plan in bucket-plan units: per sample M_b (M_b + G_b) pairs, each paying its
    QK^T and PV (2 head_dim) plus the two rank-G_b matmuls (2 G_b), times SHARED_OVERHEAD."""
    covered = (packing.cover > 0).sum(1).double()  # (B,)
    groups = torch.bincount(packing.group_batch, minlength=covered.numel()).double()  # (B,)
    pairs = covered * (covered + groups) * (1 + groups / head_dim)
    return float(pairs[groups > 0].sum()) * SHARED_OVERHEAD


def pack_rows(
    packing: LayoutPacking,
    num_tokens: int,
    max_buckets: int = MAX_BUCKETS,
    head_dim: int = 128,
    path: str = "buckets",
) -> PackedRows:
    """The Assemble-Attn plan of `packing` (`num_tokens` = B * N flat image tokens): `bucket_rows` or `shared_rows`
    as `path` asks, or on "auto" (`ConditionedFlux`'s default) the one with less work (`bucket_work` against
    `shared_work`, from MIN_SHARED_PAIRS on) when planned without autograd. Planned under autograd (training), "auto"
    takes the buckets: the fused kernels they run keep only log-sum-exps for the backward, the shared path its
    (heads, M, M) scores.
    The result remembers the request, so a forward can tell whether it was planned for it."""
    if path not in PATHS:
        raise ValueError(f"assemble path={path!r}: choose from {PATHS}")
    if path == "auto" and torch.is_grad_enabled():
        path_taken = "buckets"
    elif path == "auto":
        buckets = bucket_work(packing.key_mask.sum(1).tolist(), max_buckets)
        path_taken = "shared" if buckets >= MIN_SHARED_PAIRS and shared_work(packing, head_dim) < buckets else "buckets"
    else:
        path_taken = path
    build = shared_rows if path_taken == "shared" else bucket_rows
    rows = build(packing, num_tokens, max_buckets)
    rows.path = path
    return rows
