"""Cached encoder features of toy-world shards (DESIGN 5: "cached encoder features").

The frozen encoders run once per sample, never per training step: VAE latents of the scene (packed FLUX
tokens), T5 + pooled CLIP text embeddings with each ref caption's token span, CLIP / DINO features of every
ref crop (CLS and patch tokens), and the labels (bbox, depth) padded to `max_refs`. One safetensors file per split,
written atomically; a cache records the model dir and sizes it was built with and is refused for another. Caches
written before the DINO patch tokens were stored load without them (`dino_patches` None). `build_cache_in_workers`
encodes the shard files in parallel processes, one thread each (a GPU machine's cores; the encoders run on the CPU).
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.errors import WeightsError
from moviepostproduction.files import load_safetensors, read_metadata, save_safetensors
from moviepostproduction.sampling import pack_latents
from moviepostproduction.scene import DEPTHS
from moviepostproduction.toyworld.shards import SHARD_READ_ERRORS, ToySample, iter_shards, unreadable_shard

CACHE_VERSION = "1"
FIELDS = ("latents", "t5", "pooled", "spans", "bboxes", "depth", "valid", "clip", "dino")
OPTIONAL_FIELDS = ("dino_patches",)


@dataclass
class FeatureCache:
    """N samples; R = max refs (padded, `valid` marks real refs); L image tokens; T text tokens."""

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
    dino_patches: torch.Tensor | None = None  # (N, R, P, G); None in caches written before they were stored

    @property
    def fields(self) -> tuple[str, ...]:
        return FIELDS + tuple(name for name in OPTIONAL_FIELDS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch: every field indexed by `index`, as float32 / bool / long."""
        out = {}
        for name in self.fields:
            value = getattr(self, name)[index]
            out[name] = value.float() if value.is_floating_point() else value
        return out

    def save(self, path: str | Path, meta: dict[str, str]) -> Path:
        state = {}
        for name in self.fields:
            value = getattr(self, name)
            state[name] = value.to(torch.uint8) if value.dtype == torch.bool else value
        info = {**meta, "version": CACHE_VERSION, "grid": f"{self.grid[0]}x{self.grid[1]}"}
        return save_safetensors(state, path, metadata=info)

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, str] | None = None) -> FeatureCache:
        meta = read_metadata(path)
        for key, want in (expect or {}).items():
            if meta.get(key) != want:
                raise WeightsError(
                    f"{path}: feature cache was built with {key}={meta.get(key)!r}, not {want!r}; "
                    "delete it to rebuild"
                )
        state = load_safetensors(path, "a feature cache")
        h, w = (int(v) for v in meta["grid"].split("x"))
        for name in ("spans", "valid"):
            state[name] = state[name].bool()
        present = [name for name in FIELDS + OPTIONAL_FIELDS if name in state]
        return cls(**{name: state[name] for name in present}, grid=(h, w))


def _pixels(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]


@torch.no_grad()
def encode_samples(
    samples: list[ToySample], text_encoder, image_encoder, vae, max_refs: int, max_text_tokens: int
) -> dict[str, torch.Tensor]:
    """Features of a list of samples (one batch of the cache build)."""
    scenes = torch.stack([_pixels(s.scene) for s in samples])
    latents = pack_latents(vae.encode(scenes)).half()  # (B, L, 4 C_lat)
    t5, pooled = [], []
    n = len(samples)
    spans = torch.zeros(n, max_refs, max_text_tokens, dtype=torch.bool)
    for i, s in enumerate(samples):
        emb, found, _ = text_encoder.encode_spans(s.caption, s.ref_captions, max_text_tokens)
        t5.append(emb.t5[0])
        pooled.append(emb.pooled[0])
        for r, span in enumerate(found[:max_refs]):
            if span is not None:
                spans[i, r, span[0] : span[1]] = True
    refs = [Image.fromarray(r) for s in samples for r in s.refs[:max_refs]]
    emb = image_encoder.encode(refs)
    clip = torch.zeros(n, max_refs, emb.clip.shape[-1])
    dino = torch.zeros(n, max_refs, emb.dino_cls.shape[-1])
    patches = torch.zeros(n, max_refs, *emb.dino_patches.shape[1:])
    bboxes = torch.zeros(n, max_refs, 4)
    depth = torch.zeros(n, max_refs, dtype=torch.long)
    valid = torch.zeros(n, max_refs, dtype=torch.bool)
    k = 0
    for i, s in enumerate(samples):
        r = min(len(s.refs), max_refs)
        clip[i, :r], dino[i, :r] = emb.clip[k : k + r].float(), emb.dino_cls[k : k + r].float()
        patches[i, :r] = emb.dino_patches[k : k + r].float()
        bboxes[i, :r] = torch.from_numpy(s.bboxes[:r]).float()
        depth[i, :r] = torch.tensor([DEPTHS.index(d) for d in s.depths[:r]])
        valid[i, :r] = True
        k += r
    return {
        "latents": latents,
        "t5": torch.stack(t5).half(),
        "pooled": torch.stack(pooled).float(),
        "spans": spans,
        "bboxes": bboxes,
        "depth": depth,
        "valid": valid,
        "clip": clip.half(),
        "dino": dino.half(),
        "dino_patches": patches.half(),
    }


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
    progress: bool = True,
) -> FeatureCache:
    """Encode every sample of a shard dir (or the first `limit`)."""
    from tqdm import tqdm

    parts: list[dict[str, torch.Tensor]] = []
    pending: list[ToySample] = []
    grid = None
    bar = tqdm(total=limit, desc=f"features {Path(shards).name}", unit="scene", disable=not progress)
    for i, sample in enumerate(iter_shards(shards)):
        if limit is not None and i >= limit:
            break
        pending.append(sample)
        if grid is None:
            h, w = sample.scene.shape[:2]
            grid = (h // (2 * vae.downsample), w // (2 * vae.downsample))
        if len(pending) == batch_size:
            parts.append(encode_samples(pending, text_encoder, image_encoder, vae, max_refs, max_text_tokens))
            bar.update(len(pending))
            pending = []
    if pending:
        parts.append(encode_samples(pending, text_encoder, image_encoder, vae, max_refs, max_text_tokens))
        bar.update(len(pending))
    bar.close()
    if not parts:
        raise WeightsError(f"{shards}: no samples to encode")
    return joined(parts, grid)


def joined(parts: list[dict[str, torch.Tensor]], grid: tuple[int, int]) -> FeatureCache:
    """One cache of the encoded parts (dicts of every field, `encode_samples`' output), in order."""
    return FeatureCache(**{k: torch.cat([p[k] for p in parts]) for k in FIELDS + OPTIONAL_FIELDS}, grid=grid)


def shard_length(file: Path) -> int:
    """Samples in a shard file, from its tar headers (the members of one sample share the key before the first dot)."""
    try:
        with tarfile.open(file, "r") as tar:
            return len({Path(m.name).name.partition(".")[0] for m in tar if m.isfile()})
    except SHARD_READ_ERRORS as exc:
        raise unreadable_shard(file, exc) from None


def _encode_shard(job: tuple[str, str, int, int, int]) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """Worker of `build_cache_in_workers`: the first `limit` samples of one shard file, with the dir's encoders."""
    import threading

    from tqdm import tqdm

    from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
    from moviepostproduction.model_dir import ModelDir

    model_dir, shard, max_refs, max_text_tokens, limit = job
    torch.set_num_threads(1)
    tqdm.set_lock(threading.RLock())  # no bars here; tqdm's default lock is a semaphore a terminated worker would leak
    md = ModelDir.at(model_dir)
    cache = build_cache(
        shard,
        TextEncoder.load(md),
        ImageEncoder.load(md),
        Vae.load(md),
        max_refs=max_refs,
        max_text_tokens=max_text_tokens,
        limit=limit,
        progress=False,
    )
    return {name: getattr(cache, name) for name in cache.fields}, cache.grid


def build_cache_in_workers(
    model_dir: str | Path,
    shards: str | Path,
    *,
    max_refs: int,
    max_text_tokens: int,
    workers: int,
    limit: int | None = None,
    progress: bool = True,
) -> FeatureCache:
    """`build_cache` of a shard dir with the encoders of `model_dir`, one shard file per task in `workers` processes;
    the parts are joined in shard order, so the samples are those of `build_cache` in the same order (features equal up
    to float rounding: the batches of 32 start again at each shard)."""
    from multiprocessing import get_context

    from tqdm import tqdm

    jobs, left = [], limit
    for file in sorted(Path(shards).glob("shard-*.tar")):
        if left is not None and left <= 0:
            break  # the shards past the limit are not even opened
        length = shard_length(file)
        take = length if left is None else min(length, left)
        jobs.append((str(model_dir), str(file), max_refs, max_text_tokens, take))
        left = None if left is None else left - take
    if not jobs:
        raise WeightsError(f"{shards}: no samples to encode")
    parts = []
    pool = get_context("spawn").Pool(min(workers, len(jobs)))
    try:
        done = pool.imap(_encode_shard, jobs)
        for part in tqdm(
            done, total=len(jobs), desc=f"features {Path(shards).name}", unit="shard", disable=not progress
        ):
            parts.append(part)
        pool.close()
    except BaseException:
        pool.terminate()  # a worker's error (a corrupt shard: MppError) ends the others at once
        raise
    finally:
        pool.join()  # every worker reaped before returning or raising
    return joined([fields for fields, _ in parts], parts[0][1])
