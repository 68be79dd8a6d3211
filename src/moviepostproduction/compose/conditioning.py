"""The per-scene conditioning cache and the pure index builders behind it (DESIGN 3, "Caching").

Everything here depends on the scene only, never on the noisy latent, so it is built once per generation and
reused at every denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

import torch


@dataclass
class RefBatch:
    """Scene tensors for B samples padded to R refs; `valid` marks real refs."""

    bboxes: torch.Tensor  # (B, R, 4) normalised xyxy
    depth: torch.Tensor  # (B, R) long index into DEPTHS
    valid: torch.Tensor  # (B, R) bool
    clip: torch.Tensor  # (B, R, C) CLIP image embeds
    dino: torch.Tensor  # (B, R, G) DINO CLS
    text_spans: torch.Tensor | None = None  # (B, R, T) bool: text tokens of ref r's caption
    dino_patches: torch.Tensor | None = None  # (B, R, P, G) DINO patch tokens (box patches only)

    def __post_init__(self) -> None:
        b, r = self.valid.shape
        expected = {"bboxes": (b, r, 4), "depth": (b, r), "clip": (b, r), "dino": (b, r), "dino_patches": (b, r)}
        for name, shape in expected.items():
            value = getattr(self, name)
            got = tuple(value.shape[: len(shape)]) if value is not None else shape
            if got != shape:
                raise ValueError(f"RefBatch.{name} has leading shape {got}, expected {shape} from valid")
        for name in ("bboxes", "clip", "dino", "dino_patches"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise ValueError(f"RefBatch.{name} contains NaN or Inf")

    @property
    def num_refs(self) -> int:
        return self.valid.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> RefBatch:
        """Floating tensors to `dtype` / `device` (masks and indices keep their dtype; absent fields stay None)."""

        def move(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            return x.to(device=device, dtype=dtype if x.is_floating_point() else None)

        return RefBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class RegionMap:
    """Tokens covered by the same refs with the same weights share one temb: U regions instead of N tokens."""

    index: torch.Tensor  # (B, N) long: region of each token
    coef: torch.Tensor  # (B, U, R) float: weight of ref r's offset in region u (mask value x alpha)

    @property
    def num_regions(self) -> int:
        return self.coef.shape[1]


@dataclass
class LayoutPacking:
    """All (sample, ref) groups of Assemble-Attn packed for one batched call."""

    token_index: torch.Tensor  # (G, L) long: flat index b * N + n of the image tokens in each group's box
    key_mask: torch.Tensor  # (G, 1 + L) bool: layout token + real tokens are True, padding False
    group_batch: torch.Tensor  # (G,) long
    group_ref: torch.Tensor  # (G,) long
    cover: torch.Tensor  # (B, N) float: how many boxes cover each token (overlaps are averaged)
    coords: torch.Tensor | None = None  # (G, L, 2) float: each token's centre in its box's frame (box_token_coords)
    group_weight: torch.Tensor | None = None  # (G,) float > 0: occlusion priority of each group (None: all 1)
    cover_weight: torch.Tensor | None = None  # (B, N) float: sum of the covering groups' weights (None: cover)

    @property
    def num_groups(self) -> int:
        return self.token_index.shape[0]

    def slot_groups(self) -> torch.Tensor:
        """(S,) long: the group of each real image-token slot, in the order of `token_index[key_mask[:, 1:]]`."""
        real = self.key_mask[:, 1:]  # (G, L)
        return torch.arange(self.num_groups, device=real.device)[:, None].expand_as(real)[real]

    def weighted(self, values: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """values (S, D) times their group's occlusion weight; returned as they are (no work) when there is none.

        groups (S,): each row's group (< 0 for padding rows, whose value is discarded anyway); None: the rows are the
        real slots in `slot_groups` order.
        """
        if self.group_weight is None:
            return values
        groups = self.slot_groups() if groups is None else groups.clamp(min=0)
        return values * self.group_weight.index_select(0, groups).to(values.dtype)[:, None]

    def denominator(self) -> torch.Tensor:
        """(B, N): what a token's summed (weighted) group values are divided by, the weighted average's norm."""
        return self.cover if self.cover_weight is None else self.cover_weight


MAX_BUCKETS = 4  # Assemble-Attn calls per layout block at most, whatever the number of refs (assemble_rows.py)


@dataclass
class RowBucket:
    """One attention call: P rows of S slots, one group per row: [layout token ; its box's tokens ; padding]."""

    source: torch.Tensor  # (P, S) long: row of the table [covered image tokens (M) ; layout tokens (G)]
    segment: torch.Tensor  # (P, S) long: group of each slot, -1 on padding
    target: torch.Tensor  # (P * S,) long: row of each slot's image token in `covered`; M for layout and padding
    padded: bool = True  # some row is shorter than S (False: every group fills its row, no mask at all)

    @property
    def key_mask(self) -> torch.Tensor | None:
        """(P, 1, 1, S) bool: the real keys of each row (a prefix), broadcast over heads and queries; None when no
        row has padding. P x S bools, never a (slots x slots) mask."""
        return (self.segment >= 0)[:, None, None, :] if self.padded else None


@dataclass
class SharedCover:
    """Assemble-Attn as one attention per sample over its covered tokens (`compose.assemble_shared`)."""

    membership: torch.Tensor  # (M, G) bool: covered token (row of `PackedRows.covered`) m lies in group g's box
    spans: tuple[tuple[int, int, int, int], ...]  # per sample with groups: covered rows [m0, m1), groups [g0, g1)


@dataclass
class PackedRows:
    """The groups of a `LayoutPacking` ready for Assemble-Attn: size buckets of rows (slots numbered bucket after
    bucket), or, for crowded / large boxes, one shared attention per sample (`shared`; then no buckets)."""

    covered: torch.Tensor  # (M,) long: flat image tokens b * N + n inside some box, ascending
    buckets: tuple[RowBucket, ...]
    group_slots: torch.Tensor | None  # (G, L) long: flat slot of each group's image tokens (padding: clamped); None
    max_buckets: int = MAX_BUCKETS  # the budget of attention calls it was packed for
    shared: SharedCover | None = None
    path: str = "buckets"  # the requested path ("auto", "buckets", "shared"), see `assemble_rows.pack_rows`

    @property
    def num_slots(self) -> int:
        return sum(b.source.numel() for b in self.buckets)

    @property
    def mask_bytes(self) -> int:
        """Bytes of the masks this plan hands to attention: key masks per bucket, or the shared path's membership as
        the float32 matrix it computes with."""
        if self.shared is not None:
            return self.shared.membership.numel() * 4
        return sum(b.source.numel() for b in self.buckets if b.padded)


@dataclass
class Conditioning:
    """What `CompositionAdapter.prepare` computes once per scene for `ConditionedFlux`."""

    alpha: torch.Tensor  # (B, R)
    valid: torch.Tensor  # (B, R) bool
    foreground: torch.Tensor  # (B, R) bool: valid and alpha >= 0.5
    layout_tokens: torch.Tensor  # (B, R, D)
    shared_offsets: torch.Tensor  # (B, R, D)
    pool_weights: torch.Tensor  # (B, R, N): rows sum to 1 over each box (feedback pooling)
    image_regions: RegionMap  # double blocks, image stream
    text_regions: RegionMap | None  # double blocks, text stream (None: no caption spans)
    joint_regions: RegionMap  # single blocks, [text ; image] (foreground refs only)
    packing: LayoutPacking
    grid: tuple[int, int]
    ref_patches: torch.Tensor | None = None  # (B, R, P, G) DINO patch tokens, when the adapter lays them into boxes
    token_extent: torch.Tensor | None = None  # (B, R, 2) one image token's size in each box's frame (same condition)
    rows: PackedRows | None = None  # Assemble-Attn rows of `packing`, built once per scene (`ConditionedFlux.prepare`)

    @property
    def num_refs(self) -> int:
        return self.alpha.shape[1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """Move floating tensors to `dtype`/`device` (index tensors keep their integer dtype); no copy of a tensor
        that is already there."""

        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(device=device, dtype=dtype if x.is_floating_point() else None)
            if is_dataclass(x):  # RegionMap, LayoutPacking, PackedRows and its buckets
                return type(x)(**{f.name: move(getattr(x, f.name)) for f in fields(x)})
            if isinstance(x, tuple):
                return tuple(move(v) for v in x)
            return x

        return move(self)


def build_regions(masks: torch.Tensor, weights: torch.Tensor, priority: torch.Tensor | None = None) -> RegionMap:
    """masks (B, R, N) in [0, 1], weights (B, R) -> RegionMap with coef = mask value x weight.

    Regions are the distinct columns of `masks` per sample (padded to the batch's largest U with zero rows), numbered
    in the lexicographic order of their mask values. One `torch.unique` over every sample's columns at once, keyed by
    the sample index: a loop of one call per sample synchronised a GPU B times per forward.
    priority (B, R) > 0 (`occlusion_priority`): coef of ref r in a region with mask values m is further multiplied
    by p_r sum(m) / sum(m p), so overlapping refs share the region's total weight by priority; all 1: unchanged.
    """
    b, r, n = masks.shape
    device = masks.device
    if r == 0:
        return RegionMap(index=torch.zeros(b, n, dtype=torch.long, device=device), coef=masks.new_zeros(b, 1, 0))
    # Detached for grouping only: the coefficients below stay differentiable through `weights`. The key's dtype holds
    # both the sample index and every mask value exactly (a widening cast of the masks).
    key_dtype = torch.promote_types(masks.dtype, torch.float32)
    sample = torch.arange(b, device=device).repeat_interleave(n)  # (B N,)
    columns = masks.detach().transpose(1, 2).reshape(b * n, r).to(key_dtype)  # (B N, R)
    keys = torch.cat([sample[:, None].to(key_dtype), columns], dim=1)  # (B N, 1 + R)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (U_all, 1 + R) sorted by sample first, (B N,)
    owner = uniq[:, 0].long()  # (U_all,) sample of each region
    count = torch.bincount(owner, minlength=b)  # (B,) regions per sample
    first = count.cumsum(0) - count  # (B,) first region of each sample in `uniq`
    index = (inverse - first[sample]).view(b, n)  # (B, N) region of each token within its sample
    u = int(count.max()) if b > 0 else 1
    region_masks = masks.new_zeros(b, u, r)
    local = torch.arange(uniq.shape[0], device=device) - first[owner]  # (U_all,)
    region_masks[owner, local] = uniq[:, 1:].to(masks.dtype)
    coef = region_masks * weights[:, None, :]  # (B, U, R)
    if priority is not None:
        p = priority[:, None, :].to(coef.dtype)  # (B, 1, R)
        total, weighted = region_masks.sum(-1, keepdim=True), (region_masks * p).sum(-1, keepdim=True)  # (B, U, 1)
        coef = coef * p * torch.where(weighted > 0, total / weighted.clamp(min=torch.finfo(coef.dtype).tiny), 1.0)
    return RegionMap(index=index, coef=coef)


def build_packing(
    masks: torch.Tensor, valid: torch.Tensor, coords: torch.Tensor | None = None, priority: torch.Tensor | None = None
) -> LayoutPacking:
    """Hard masks (B, R, N) bool and valid (B, R) -> padded groups of token indices for one attention call.

    coords (B, R, N, 2): box-frame token coordinates (`layout.box_token_coords`), gathered per group slot.
    priority (B, R) > 0: occlusion weights (`occlusion_priority`); overlaps are then averaged with these weights.
    """
    b, r, n = masks.shape
    masks = masks & valid[..., None]
    group_b, group_r = (masks.any(-1)).nonzero(as_tuple=True)  # (G,), (G,)
    group_masks = masks[group_b, group_r]  # (G, N)
    lengths = group_masks.sum(-1)  # (G,)
    length = int(lengths.max()) if lengths.numel() else 0
    rows, cols = group_masks.nonzero(as_tuple=True)  # sorted by group, then token
    starts = torch.cumsum(lengths, 0) - lengths
    slot = torch.arange(rows.numel(), device=masks.device) - starts[rows]
    token_index = torch.zeros(group_b.numel(), length, dtype=torch.long, device=masks.device)
    token_index[rows, slot] = group_b[rows] * n + cols
    real = torch.arange(length, device=masks.device) < lengths[:, None]  # (G, L)
    key_mask = torch.cat([real.new_ones(real.shape[0], 1), real], dim=1)
    group_coords = None
    if coords is not None:
        group_coords = coords.new_zeros(group_b.numel(), length, 2)
        group_coords[rows, slot] = coords[group_b[rows], group_r[rows], cols]
    group_weight = cover_weight = None
    if priority is not None:
        group_weight = priority[group_b, group_r]  # (G,)
        cover_weight = (masks.to(priority.dtype) * priority[..., None]).sum(1)  # (B, N)
    return LayoutPacking(
        token_index=token_index,
        key_mask=key_mask,
        group_batch=group_b,
        group_ref=group_r,
        cover=masks.sum(1).float(),
        coords=group_coords,
        group_weight=group_weight,
        cover_weight=cover_weight,
    )


def without_modulation(cond: Conditioning) -> Conditioning:
    """The same conditioning with the modulation pathway off (ablations): no per-token offsets, no feedback."""

    def zero(regions: RegionMap | None) -> RegionMap | None:
        return None if regions is None else RegionMap(regions.index, torch.zeros_like(regions.coef))

    return replace(
        cond,
        foreground=torch.zeros_like(cond.foreground),
        image_regions=zero(cond.image_regions),
        text_regions=zero(cond.text_regions),
        joint_regions=zero(cond.joint_regions),
    )
