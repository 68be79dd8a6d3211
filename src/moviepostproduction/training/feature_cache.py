"""Cached encoder features of shard data sets (DESIGN 5: "cached encoder features").

The frozen encoders run once per sample, never per training step: VAE latents of the scene (packed FLUX
tokens), T5 + pooled CLIP text embeddings with each ref caption's token span, CLIP / DINO features of every
ref crop (CLS and, when the adapter lays them into boxes, patch tokens), and the labels (bbox, depth).
`write_cache` runs one copy of each encoder in this process, on `cache_device` (bf16 on CUDA, fp32 on the CPU), and
writes the features as it goes into a cache folder of safetensors shards (training/feature_shards.py: unpadded
per-ref rows, resumable, read lazily); worker processes only decode the tar shards (training/sample_stream.py).
`build_cache` keeps a small set in memory instead (`FeatureCache`, padded to `max_refs`), for tests and previews.

With resolution `buckets` (datasets/buckets.py; recipe `buckets:`), each target is scaled to cover its bucket (the
nearest aspect ratio) and centre-cropped, its boxes mapped into the crop, and the refs whose box the crop leaves out
dropped (counted in the log). The build still reads and writes the samples in the data set's order (so a resumed
build skips exactly the samples written): a batch of the build is split by bucket for the VAE, which only ever
encodes images of one size, and its samples are put back in order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.datasets.buckets import NATIVE, Bucket, fit_bucket, native_size_problem
from moviepostproduction.errors import WeightsError
from moviepostproduction.sampling import pack_latents
from moviepostproduction.scene import DEPTHS
from moviepostproduction.toyworld.shards import ToySample
from moviepostproduction.training.feature_shards import (
    GRIDS,
    INDEX,
    ShardedFeatures,
    ShardWriter,
    collate,
    concat_parts,
    flat_latents,
    part_grid,
    read_index,
    split_part,
)
from moviepostproduction.training.sample_stream import CacheSample, iter_samples, shard_length

__all__ = [
    "FeatureCache",
    "build_cache",
    "encode_samples",
    "open_cache",
    "shard_length",
    "write_cache",
]

logger = logging.getLogger(__name__)

FIELDS = ("latents", "t5", "pooled", "spans", "bboxes", "depth", "valid", "clip", "dino")
OPTIONAL_FIELDS = ("dino_patches",)


@dataclass
class FeatureCache:
    """N samples in memory; R = max refs (padded, `valid` marks real refs); L image tokens; T text tokens."""

    latents: torch.Tensor  # (N, L, 4 C_lat) packed clean latents
    t5: torch.Tensor  # (N, T, d_t5)
    pooled: torch.Tensor  # (N, d_clip)
    spans: torch.Tensor  # (N, R, T) bool: T5 tokens of ref r's caption
    bboxes: torch.Tensor  # (N, R, 4)
    depth: torch.Tensor  # (N, R) long
    valid: torch.Tensor  # (N, R) bool
    clip: torch.Tensor  # (N, R, C)
    dino: torch.Tensor  # (N, R, G)
    grid: tuple[int, int]  # image-token grid (h, w)
    dino_patches: torch.Tensor | None = None  # (N, R, P, G); None when the patch tokens were not stored

    @property
    def fields(self) -> tuple[str, ...]:
        return FIELDS + tuple(name for name in OPTIONAL_FIELDS if getattr(self, name) is not None)

    @property
    def has_patches(self) -> bool:
        return self.dino_patches is not None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def sample_grids(self) -> torch.Tensor:
        """(N, 2) every sample's token grid: the one grid an in-memory cache holds."""
        return torch.tensor([list(self.grid)], dtype=torch.long).expand(len(self), 2)

    def grid_of(self, index: torch.Tensor | list[int]) -> tuple[int, int]:
        del index
        return self.grid

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch: every field indexed by `index`, as float32 / bool / long."""
        out = {}
        for name in self.fields:
            value = getattr(self, name)[index]
            out[name] = value.float() if value.is_floating_point() else value
        return out


def storage_dtype(encoder_dtype: torch.dtype) -> torch.dtype:
    """Features are stored in 16 bits: bf16 / fp16 encoders' own dtype (no rounding), fp32 encoders' as fp16."""
    return encoder_dtype if encoder_dtype in (torch.bfloat16, torch.float16) else torch.float16


def _pixels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]


@torch.no_grad()
def encode_samples(
    samples: list[ToySample],
    text_encoder,
    image_encoder,
    vae,
    max_refs: int,
    max_text_tokens: int,
    patches: bool = True,
) -> dict[str, torch.Tensor]:
    """Features of a list of samples (one batch of the build) in the flat layout: per-sample fields stacked,
    `ref_counts` (B,), per-ref fields over the batch's first `max_refs` refs of each sample, unpadded, on the CPU."""
    store = storage_dtype(vae.dtype)
    scenes = torch.stack([_pixels(s.scene) for s in samples])
    latents = pack_latents(vae.encode(scenes)).to("cpu", store)  # (B, L, 4 C_lat)
    t5, pooled, spans = [], [], []
    for s in samples:
        emb, found, _ = text_encoder.encode_spans(s.caption, s.ref_captions, max_text_tokens)
        t5.append(emb.t5[0].to("cpu", store))  # (T, d_t5)
        pooled.append(emb.pooled[0].to("cpu", torch.float32))
        spans += [span or (0, 0) for span in found[: len(s.refs[:max_refs])]]
    refs = [Image.fromarray(r) for s in samples for r in s.refs[:max_refs]]
    emb = image_encoder.encode(refs)
    counts = torch.tensor([len(s.refs[:max_refs]) for s in samples], dtype=torch.long)
    part = {
        "latents": latents,
        "t5": torch.stack(t5),  # (B, T, d_t5)
        "pooled": torch.stack(pooled),  # (B, d_clip)
        "ref_counts": counts,
        "clip": emb.clip.to("cpu", store),  # (sum refs, C)
        "dino": emb.dino_cls.to("cpu", store),  # (sum refs, G)
        "bboxes": torch.from_numpy(np.concatenate([s.bboxes[:max_refs] for s in samples])).float(),  # (sum refs, 4)
        "depth": torch.tensor([DEPTHS.index(d) for s in samples for d in s.depths[:max_refs]], dtype=torch.long),
        "spans": torch.tensor(spans, dtype=torch.int32).reshape(-1, 2),  # (sum refs, 2) [start, stop)
    }
    if patches:
        part["dino_patches"] = emb.dino_patches.to("cpu", store)  # (sum refs, P, G)
    return part


def in_bucket(sample, buckets: list[Bucket]) -> tuple[CacheSample, int]:
    """A sample with its target fitted to its bucket (`fit_bucket`) and the refs the crop leaves out dropped; the
    number dropped."""
    image, boxes = fit_bucket(sample.scene, sample.bboxes, buckets)
    keep = [i for i, box in enumerate(boxes) if box is not None]
    bboxes = np.asarray([boxes[i] for i in keep], dtype=np.float64).reshape(-1, 4)  # (R', 4)
    refs, captions, depths = ([seq[i] for i in keep] for seq in (sample.refs, sample.ref_captions, sample.depths))
    return CacheSample(image, refs, sample.caption, captions, bboxes, depths), len(boxes) - len(keep)


def encode_by_bucket(samples: list, grid_of, encode) -> dict[str, torch.Tensor]:
    """`encode` (a list of samples of one size -> a part) per size among `samples`, the results joined back in the
    samples' order in the bucketed layout (flat latents, `grids`); `grid_of(sample)`: its token grid."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.scene.shape[:2], []).append(i)
    placed: list[dict[str, torch.Tensor] | None] = [None] * len(samples)
    for members in groups.values():
        part = flat_latents(encode([samples[i] for i in members]), grid_of(samples[members[0]]))
        for i, one in zip(members, split_part(part), strict=True):
            placed[i] = one
    return concat_parts(placed)


def encoded_parts(
    shards: str | Path,
    text_encoder,
    image_encoder,
    vae,
    *,
    max_refs: int,
    max_text_tokens: int,
    skip: int = 0,
    limit: int | None = None,
    batch_size: int = 32,
    workers: int = 1,
    patches: bool = True,
    progress: bool = True,
    buckets: list[Bucket] | str | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], tuple[int, int] | None]]:
    """(encoded part, token grid) per batch of samples skip .. limit - 1 of a shard dir, in order; with `buckets`,
    (bucketed part, None): every target fitted to its bucket (`NATIVE`: kept at its own size), the part in the
    bucketed layout (feature_shards.py)."""
    from tqdm import tqdm

    total = None if limit is None else max(0, limit - skip)
    bar = tqdm(total=total, desc=f"features {Path(shards).name}", unit="scene", disable=not progress)
    pending: list[ToySample | CacheSample] = []
    dropped = 0

    def grid_of(sample) -> tuple[int, int]:
        h, w = sample.scene.shape[:2]
        return h // (2 * vae.downsample), w // (2 * vae.downsample)

    def encode(samples: list) -> dict[str, torch.Tensor]:
        return encode_samples(samples, text_encoder, image_encoder, vae, max_refs, max_text_tokens, patches)

    def encoded() -> tuple[dict[str, torch.Tensor], tuple[int, int] | None]:
        bar.update(len(pending))
        if buckets is not None:
            return encode_by_bucket(pending, grid_of, encode), None
        sizes = {s.scene.shape[:2] for s in pending}
        if len(sizes) > 1:
            raise WeightsError(
                f"{shards}: scenes of sizes {sorted(sizes)} in one split; every scene must share one size "
                "(or train with resolution buckets: recipe `buckets:`)"
            )
        return encode(pending), grid_of(pending[0])

    for sample in iter_samples(shards, skip=skip, limit=limit, workers=workers):
        if buckets == NATIVE:
            height, width = sample.scene.shape[:2]
            if problem := native_size_problem(width, height, 2 * vae.downsample):
                raise WeightsError(f"{shards}: a target of {problem} (recipe `buckets:`)")
        elif buckets is not None:
            sample, lost = in_bucket(sample, buckets)
            dropped += lost
        pending.append(sample)
        if len(pending) == batch_size:
            yield encoded()
            pending = []
    if pending:
        yield encoded()
    bar.close()
    if dropped:
        logger.info("%s: %d refs dropped, their boxes outside the bucket crop of their target", shards, dropped)


def build_cache(
    shards: str | Path,
    text_encoder,
    image_encoder,
    vae,
    *,
    max_refs: int,
    max_text_tokens: int,
    limit: int | None = None,
    batch_size: int = 32,
    workers: int = 1,
    patches: bool = True,
    progress: bool = True,
    buckets: list[Bucket] | str | None = None,
) -> FeatureCache:
    """Every sample of a shard dir (or the first `limit`) encoded into memory, padded: for small sets only, of one
    token grid (with `buckets`, a list or `NATIVE`, a set whose samples fall in several is refused: the sharded
    cache holds those)."""
    parts = list(
        encoded_parts(
            shards,
            text_encoder,
            image_encoder,
            vae,
            max_refs=max_refs,
            max_text_tokens=max_text_tokens,
            limit=limit,
            batch_size=batch_size,
            workers=workers,
            patches=patches,
            progress=progress,
            buckets=buckets,
        )
    )
    if not parts:
        raise WeightsError(f"{shards}: no samples to encode")
    part = concat_parts([p for p, _ in parts])
    grid = parts[0][1]
    if GRIDS in part:
        try:
            grid = part_grid(part)
        except ValueError as exc:
            raise WeightsError(f"{shards}: {exc}; an in-memory FeatureCache holds one grid (use write_cache)") from None
    batch = collate(part, max_refs)
    for name in FIELDS + OPTIONAL_FIELDS:  # the stored 16-bit dtypes, as a cache holds them
        if name in part and name != "spans" and part[name].is_floating_point():
            batch[name] = batch[name].to(part[name].dtype)
    return FeatureCache(**{k: batch[k] for k in FIELDS + OPTIONAL_FIELDS if k in batch}, grid=grid)


def write_cache(
    shards: str | Path,
    root: str | Path,
    encoders,
    *,
    meta: dict[str, str],
    max_refs: int,
    max_text_tokens: int,
    limit: int | None = None,
    batch_size: int = 32,
    shard_size: int = 256,
    workers: int = 1,
    patches: bool = True,
    progress: bool = True,
    buckets: list[Bucket] | str | None = None,
) -> ShardedFeatures:
    """The cache folder `root` of a shard dir, written shard by shard; a folder left by an interrupted build of the
    same `meta` continues after its last complete shard. `encoders`: a `cache_encoders.CacheEncoders`; `buckets`:
    resolution buckets (None: every scene of the split must share one size; `NATIVE`: each keeps its own).
    `meta` should name the buckets, so that a build is only resumed with the same ones."""
    writer = ShardWriter.resume(root, meta, shard_size, info=encoders.info)
    if writer.done:
        logger.info("%s: resuming after %d cached samples", root, writer.done)
    for part, grid in encoded_parts(
        shards,
        encoders.text,
        encoders.image,
        encoders.vae,
        max_refs=max_refs,
        max_text_tokens=max_text_tokens,
        skip=writer.done,
        limit=limit,
        batch_size=batch_size,
        workers=workers,
        patches=patches,
        progress=progress,
        buckets=buckets,
    ):
        writer.add(part, grid)
    writer.close()
    return ShardedFeatures(root, max_refs, expect=meta)


def open_cache(root: str | Path, max_refs: int, expect: dict[str, str]) -> ShardedFeatures | None:
    """The complete cache at `root`, None when it is still to be built (absent or interrupted). A cache of the
    single-file format before version 2 (`root`.safetensors) is refused with the command that rebuilds it."""
    root = Path(root)
    old = root.with_suffix(".safetensors")
    if old.is_file():
        raise WeightsError(
            f"{old}: a feature cache of the old single-file format (padded, read whole); rebuild it: rm {old} "
            "and run mpp train again"
        )
    if not (root / INDEX).is_file() or not read_index(root, expect)["complete"]:
        return None
    return ShardedFeatures(root, max_refs, expect=expect)
