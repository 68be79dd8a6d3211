"""The on-disk feature cache: safetensors shards written as the build goes, read lazily one sample at a time.

A cache is a folder: `index.json` (what it was built from, the grid, the shards done so far) and
`shard-NNNNNN.safetensors`, each holding up to `shard_size` samples. Per-sample tensors are stacked; per-ref tensors
are flat over the shard's refs, unpadded, with `ref_offsets` marking each sample's rows, so a scene with 3 refs
stores 3 rows whatever `max_refs` is. Padding to `max_refs` happens only when a batch is collated (`collate`).
Shards are written atomically under unique temporary names and the index is rewritten after each one, so an
interrupted build resumes from the last complete shard (`ShardWriter.resume`).

A cache of one size (the toy world's, or real data with buckets off) stacks its latents (n, L, C) and names its
`grid` in the index. A bucketed cache (resolution buckets, datasets/buckets.py) holds samples of several token grids:
its latents are flat rows (sum L, C) with `latent_offsets` (n + 1,) and `grids` (n, 2) (h, w) per sample, and the
index lists its buckets with their sample counts; a batch is collated from samples of one grid only.
"""

from __future__ import annotations

import bisect
import json
from collections import OrderedDict
from pathlib import Path

import torch

from moviepostproduction.errors import WeightsError
from moviepostproduction.files import save_safetensors, write_json_atomic

FORMAT_VERSION = "2"  # 1: one padded safetensors file per split (refused: rebuild)
INDEX = "index.json"
SHARD_NAME = "shard-{:06d}.safetensors"
SAMPLE_FIELDS = ("latents", "t5", "pooled")  # one row per sample
REF_FIELDS = ("clip", "dino", "dino_patches", "bboxes", "depth", "spans")  # one row per ref, flat over the shard
GRIDS = "grids"  # (n, 2) int64 token grid (h, w) per sample: bucketed caches only
OPEN_SHARDS = 4  # shard files kept open (memory-mapped) by a reader


def sample_bytes(
    *,
    latent_tokens: int,
    latent_dim: int,
    text_tokens: int,
    t5_dim: int,
    pooled_dim: int,
    refs: int,
    clip_dim: int,
    dino_dim: int,
    patch_tokens: int = 0,
    width: int = 2,
    bucketed: bool = False,
) -> int:
    """Bytes of one sample's tensors in a shard, the safetensors header aside: features in `width` bytes (bf16 /
    fp16), pooled CLIP and boxes in fp32, depth and ref offsets int64, spans 2 x int32; `patch_tokens` 0 when the
    DINO patch tokens are not stored. Nothing scales with `max_refs`; a shard adds one more int64 offset. A
    `bucketed` cache's sample also stores its grid (2 x int64) and latent offset (int64), and its shard one more
    offset (`latent_tokens`: the sample's own bucket's h * w)."""
    per_sample = width * (latent_tokens * latent_dim + text_tokens * t5_dim) + 4 * pooled_dim + 8
    per_sample += 3 * 8 if bucketed else 0
    per_ref = width * (clip_dim + dino_dim + patch_tokens * dino_dim) + 4 * 4 + 8 + 2 * 4
    return per_sample + refs * per_ref


def concat_parts(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Encoded parts (`feature_cache.encode_samples` output: per-sample fields + `ref_counts` + flat per-ref fields)
    joined in order; a field absent from the parts (patches not stored) stays absent."""
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def part_grid(part: dict[str, torch.Tensor]) -> tuple[int, int]:
    """The one token grid of a bucketed part's samples; a ValueError naming the grids when they differ."""
    grids = sorted({tuple(g) for g in part[GRIDS].tolist()})
    if len(grids) != 1:
        raise ValueError(f"samples of several token grids ({', '.join(f'{h}x{w}' for h, w in grids)})")
    return grids[0]


def stacked_latents(part: dict[str, torch.Tensor]) -> torch.Tensor:
    """The part's latents (B, L, C): as stored in a cache of one size, reshaped from a bucketed part's flat rows."""
    if GRIDS not in part:
        return part["latents"]
    h, w = part_grid(part)
    return part["latents"].view(-1, h * w, part["latents"].shape[-1])  # (B, L, C)


def flat_latents(part: dict[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A part of one grid with stacked latents (B, L, C) in the bucketed layout: flat rows and `grids` (B, 2)."""
    b = part["latents"].shape[0]
    out = {**part, "latents": part["latents"].flatten(0, 1)}  # (B L, C)
    out[GRIDS] = torch.tensor([list(grid)] * b, dtype=torch.long).reshape(b, 2)
    return out


def split_part(part: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """A bucketed part (flat latents, `grids`) as one part per sample, in order."""
    refs = [0, *part["ref_counts"].cumsum(0).tolist()]
    rows = [0, *part[GRIDS].prod(1).cumsum(0).tolist()]
    out = []
    for i in range(len(part["ref_counts"])):
        one = {k: v[i : i + 1] for k, v in part.items() if k in (*SAMPLE_FIELDS, "ref_counts", GRIDS)}
        one |= {k: v[refs[i] : refs[i + 1]] for k, v in part.items() if k in REF_FIELDS}
        one["latents"] = part["latents"][rows[i] : rows[i + 1]]
        out.append(one)
    return out


def collate(part: dict[str, torch.Tensor], max_refs: int) -> dict[str, torch.Tensor]:
    """A batch padded to `max_refs`: (B, R, ...) per-ref fields, `valid` (B, R) and the caption spans as a (B, R, T)
    bool mask; floating fields as float32. `part` holds B samples in the flat layout (`ref_counts` (B,)); a bucketed
    part's samples must share one grid (their latents come back stacked (B, L, C))."""
    counts = part["ref_counts"].tolist()
    b, tokens = len(counts), part["t5"].shape[1]
    if max(counts, default=0) > max_refs:
        raise ValueError(f"a sample has {max(counts)} refs, more than max_refs={max_refs}")
    part = {**part, "latents": stacked_latents(part)}
    valid = torch.zeros(b, max_refs, dtype=torch.bool)
    for i, r in enumerate(counts):
        valid[i, :r] = True
    out = {name: part[name].float() if part[name].is_floating_point() else part[name] for name in SAMPLE_FIELDS}
    for name in REF_FIELDS:
        if name == "spans" or name not in part:
            continue
        flat = part[name]  # (sum refs, ...)
        padded = flat.new_zeros(b, max_refs, *flat.shape[1:])  # (B, R, ...)
        padded[valid] = flat
        out[name] = padded.float() if padded.is_floating_point() else padded
    spans = torch.zeros(b, max_refs, tokens, dtype=torch.bool)  # (B, R, T)
    token = torch.arange(tokens)
    flat_spans = part["spans"].long()  # (sum refs, 2) half-open [start, stop); (0, 0) for no caption
    spans[valid] = (token >= flat_spans[:, :1]) & (token < flat_spans[:, 1:])
    out["spans"], out["valid"] = spans, valid
    return out


class ShardWriter:
    """Appends encoded parts to a cache folder, one shard file per `shard_size` samples, and keeps its index."""

    def __init__(self, root: str | Path, meta: dict[str, str], shard_size: int, info: dict | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root, self.meta, self.shard_size = Path(root), dict(meta), shard_size
        self.info = dict(info or {})  # recorded, not checked (e.g. the device and dtype the encoders ran in)
        self.shards: list[dict] = []
        self.grid: tuple[int, int] | None = None
        self.buckets: dict[tuple[int, int], int] | None = None  # bucketed: samples per token grid (h, w)
        self.pending: list[dict[str, torch.Tensor]] = []
        self.pending_samples = 0
        self.patches: bool | None = None  # whether the parts hold DINO patch tokens

    @classmethod
    def resume(cls, root: str | Path, meta: dict[str, str], shard_size: int, info: dict | None = None) -> ShardWriter:
        """A writer that continues an interrupted build of `root` (its complete shards kept), or starts one."""
        writer = cls(root, meta, shard_size, info)
        index = read_index(root, meta) if (Path(root) / INDEX).is_file() else None
        if index is not None:
            writer.shards = index["shards"]
            writer.grid = tuple(index["grid"]) if index["grid"] else None
            writer.patches = index.get("patches")
            if index.get("buckets") is not None:
                writer.buckets = {tuple(b["grid"]): b["samples"] for b in index["buckets"]}
        return writer

    @property
    def done(self) -> int:
        """Samples in the complete shards (what a resumed build skips)."""
        return sum(s["samples"] for s in self.shards)

    def add(self, part: dict[str, torch.Tensor], grid: tuple[int, int] | None) -> None:
        """Append an encoded part: of one `grid` (stacked latents), or bucketed (grid None, flat latents + grids)."""
        if (GRIDS in part) != (grid is None) or (grid is None and self.grid) or (grid and self.buckets is not None):
            raise WeightsError(
                f"{self.root}: a cache is either of one size or bucketed, not both; delete it to rebuild"
            )
        if grid is None:
            self.buckets = self.buckets or {}
        elif self.grid is None:
            self.grid = grid
        elif grid != self.grid:
            raise WeightsError(
                f"{self.root}: a scene's token grid {grid[0]}x{grid[1]} differs from the cache's "
                f"{self.grid[0]}x{self.grid[1]}: every scene of a split must share one size (or train with "
                "resolution buckets: recipe `buckets:`)"
            )
        self.patches = "dino_patches" in part if self.patches is None else self.patches
        self.pending.append(part)
        self.pending_samples += len(part["ref_counts"])
        while self.pending_samples >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        """Write the last, shorter shard and mark the cache complete."""
        if self.pending_samples:
            self._flush(self.pending_samples)
        if not self.shards:
            raise WeightsError(f"{self.root}: no samples to encode")
        self._write_index(complete=True)

    def _flush(self, n: int) -> None:
        joined = concat_parts(self.pending)
        counts, grids = joined["ref_counts"], joined.get(GRIDS)
        cut = {k: n for k in (*SAMPLE_FIELDS, "ref_counts", GRIDS)} | dict.fromkeys(REF_FIELDS, int(counts[:n].sum()))
        if grids is not None:  # flat latent rows: the first n samples' h * w each
            cut["latents"] = int(grids[:n].prod(1).sum())
        head = {k: v[: cut[k]] for k, v in joined.items()}
        rest = {k: v[cut[k] :] for k, v in joined.items()}
        state = {k: v for k, v in head.items() if k != "ref_counts"}
        state["ref_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts[:n].cumsum(0)])  # (n + 1,)
        if grids is not None:
            state["latent_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), grids[:n].prod(1).cumsum(0)])
            for h, w in grids[:n].tolist():
                self.buckets[(h, w)] = self.buckets.get((h, w), 0) + 1
        refs = cut["clip"]
        name = SHARD_NAME.format(len(self.shards))
        save_safetensors(state, self.root / name, metadata={"version": FORMAT_VERSION, "samples": str(n)})
        self.shards.append({"file": name, "samples": n, "refs": refs})
        self.pending = [rest] if len(rest["ref_counts"]) else []
        self.pending_samples = len(rest["ref_counts"])
        self._write_index(complete=False)

    def _write_index(self, complete: bool) -> None:
        index = {"version": FORMAT_VERSION, "meta": self.meta, "info": self.info, "complete": complete}
        index |= {"grid": list(self.grid) if self.grid else None, "patches": self.patches, "shards": self.shards}
        if self.buckets is not None:
            index["buckets"] = [{"grid": list(g), "samples": k} for g, k in sorted(self.buckets.items())]
        write_json_atomic(index, self.root / INDEX)


def read_index(root: str | Path, expect: dict[str, str] | None = None) -> dict:
    """A cache folder's index, checked against what the run expects (model dir, data, sizes)."""
    path = Path(root) / INDEX
    try:
        index = json.loads(path.read_text())
        version, meta = index["version"], index["meta"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"{path}: not a readable feature-cache index ({exc}); delete {root} to rebuild") from None
    if version != FORMAT_VERSION:
        raise WeightsError(
            f"{path}: feature cache format {version!r}, not {FORMAT_VERSION!r}; delete {root} to rebuild"
        )
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise WeightsError(
                f"{root}: feature cache was built with {key}={meta.get(key)!r}, not {want!r}; delete it to rebuild"
            )
    return index


class ShardedFeatures:
    """A complete cache folder read lazily: a sample's rows are sliced out of its shard (memory-mapped by
    safetensors' `safe_open`), other shards are never opened; at most `OPEN_SHARDS` stay open."""

    def __init__(self, root: str | Path, max_refs: int, expect: dict[str, str] | None = None):
        self.root, self.max_refs = Path(root), max_refs
        index = read_index(root, expect)
        if not index["complete"]:
            raise WeightsError(f"{self.root}: feature cache is incomplete (an interrupted build); run mpp train again")
        self.shards = index["shards"]
        self.bucketed = index.get("buckets") is not None
        self.buckets = {tuple(b["grid"]): b["samples"] for b in index.get("buckets") or []}  # (h, w) -> samples
        single = list(self.buckets) if self.bucketed else [tuple(index["grid"])]
        self.grid: tuple[int, int] | None = single[0] if len(single) == 1 else None  # None: several buckets
        self._grids: torch.Tensor | None = None
        self.info = index.get("info", {})
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["samples"])
        self.opened: OrderedDict[str, object] = OrderedDict()  # file name -> safe_open handle, least recent first
        self.ever_opened: set[str] = set()
        self.has_patches = bool(index.get("patches"))

    def __len__(self) -> int:
        return self.starts[-1]

    def sample_grids(self) -> torch.Tensor:
        """(N, 2) the token grid (h, w) of every sample: a bucketed cache's read from each shard's `grids` once
        (a few bytes a sample; the shard's other tensors are not read)."""
        if self._grids is None:
            if not self.bucketed:
                self._grids = torch.tensor([list(self.grid)], dtype=torch.long).expand(len(self), 2)
            else:
                self._grids = torch.cat([self._shard(k).get_tensor(GRIDS) for k in range(len(self.shards))])
        return self._grids

    def grid_of(self, index: torch.Tensor | list[int]) -> tuple[int, int]:
        """The token grid (h, w) of the samples of `index`, which must share one (a batch of `ComposeTask.batches`)."""
        if self.grid is not None:
            return self.grid
        grids = sorted({tuple(g) for g in self.sample_grids()[torch.as_tensor(index)].tolist()})
        if len(grids) != 1:
            raise ValueError(f"samples {list(index)} mix the token grids {grids}")
        return grids[0]

    def _shard(self, k: int):
        from safetensors import SafetensorError, safe_open

        name = self.shards[k]["file"]
        if name in self.opened:
            self.opened.move_to_end(name)
            return self.opened[name]
        try:
            handle = safe_open(str(self.root / name), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise WeightsError(
                f"{self.root / name}: missing or corrupt cache shard ({exc}); delete {self.root} to rebuild"
            ) from None
        self.opened[name] = handle
        self.ever_opened.add(name)
        if len(self.opened) > OPEN_SHARDS:
            self.opened.popitem(last=False)
        return handle

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Sample `i` in the flat layout (its refs unpadded, `ref_counts` (1,)), read from its shard alone."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of a feature cache of {len(self)}")
        k = bisect.bisect_right(self.starts, i) - 1
        fh, j = self._shard(k), i - self.starts[k]
        a, b = (int(v) for v in fh.get_slice("ref_offsets")[j : j + 2])
        out = {name: fh.get_slice(name)[j : j + 1] for name in SAMPLE_FIELDS}
        out |= {name: fh.get_slice(name)[a:b] for name in REF_FIELDS if name in set(fh.keys())}
        out["ref_counts"] = torch.tensor([b - a])
        if self.bucketed:  # flat latent rows, as written: `collate` stacks a batch of one grid
            c, d = (int(v) for v in fh.get_slice("latent_offsets")[j : j + 2])
            out["latents"], out[GRIDS] = fh.get_slice("latents")[c:d], fh.get_slice(GRIDS)[j : j + 1]
        return out

    def part(self, index: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """The samples of `index`, in order, in the flat layout."""
        return concat_parts([self.sample(int(i)) for i in index])

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch padded to `max_refs` (`collate`): the fields `FeatureCache.select` gives. Read outside any autocast
        region the trainer runs the step in (CPU bf16 autocast refuses to concatenate the fp16 features)."""
        with torch.autocast("cpu", enabled=False):
            return collate(self.part(index), self.max_refs)
