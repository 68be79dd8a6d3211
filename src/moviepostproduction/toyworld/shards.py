"""WebDataset-format tar shards of the toy world, written atomically and byte-for-byte deterministically.

Layout of OUT: `train/shard-000000.tar ...`, `heldout/shard-000000.tar ...`, `manifest.json`. One sample =
consecutive members sharing a key: `%06d.scene.png`, `.ref0.png` ... `.ref{R-1}.png`, `.semantic.png`,
`.labels.png` (0 = background, i + 1 = ref i visible) and `.json` (ToyScene.meta()). Readable with the
`webdataset` package or, without it, with `iter_shards` below.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.datasets.real_format import tar_samples
from moviepostproduction.errors import MppError, Problem, ValidationError
from moviepostproduction.files import write_json_atomic
from moviepostproduction.toyworld.synthetic import (
    GENERATOR_VERSION,
    ToyScene,
    ToyWorldConfig,
    generate_scene,
    named_phrase,
)

MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT = "mpp-toyworld-wds"


@dataclass
class ToySample:
    """One sample read back from a shard."""

    key: str
    scene: np.ndarray  # (H, W, 3) uint8
    refs: list[np.ndarray]  # R x (ref_size, ref_size, 3) uint8, front to back
    semantic: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) uint8
    meta: dict

    @property
    def caption(self) -> str:
        return self.meta["caption"]

    @property
    def bboxes(self) -> np.ndarray:
        return np.asarray([r["bbox"] for r in self.meta["refs"]], dtype=np.float64).reshape(-1, 4)  # (R, 4)

    @property
    def depths(self) -> list[str]:
        return [r["depth"] for r in self.meta["refs"]]

    @property
    def ref_captions(self) -> list[str | None]:
        """Each ref's phrase where the scene caption names it, else None (`synthetic.named_phrase`)."""
        return [named_phrase(r["caption"], self.caption) for r in self.meta["refs"]]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes with no timestamp or other varying chunk (PIL writes none unless asked)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)  # ~2x faster than 6, ~20 % larger
    return buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).copy()


def scene_members(scene: ToyScene, key: str) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order they are written."""
    members = [(f"{key}.scene.png", encode_png(scene.image))]
    members += [(f"{key}.ref{i}.png", encode_png(r.image)) for i, r in enumerate(scene.refs)]
    members += [(f"{key}.semantic.png", encode_png(scene.semantic)), (f"{key}.labels.png", encode_png(scene.labels))]
    meta = {"key": key, **scene.meta()}
    members.append((f"{key}.json", json.dumps(meta, sort_keys=True).encode()))
    return members


def decode_sample(sample: Mapping[str, object]) -> ToySample:
    """A `webdataset` raw sample ({"__key__": ..., "scene.png": bytes, ...}) -> ToySample."""
    meta = json.loads(sample["json"])
    refs = [_decode_png(sample[f"ref{i}.png"]) for i in range(len(meta["refs"]))]
    return ToySample(
        key=str(sample["__key__"]),
        scene=_decode_png(sample["scene.png"]),
        refs=refs,
        semantic=_decode_png(sample["semantic.png"]),
        labels=_decode_png(sample["labels.png"]),
        meta=meta,
    )


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class ShardJob:
    """Samples start..stop-1 of one split, to be written to `path`."""

    path: Path
    split: str
    start: int
    stop: int
    seed: int
    cfg: ToyWorldConfig


def write_shard(job: ShardJob, progress: Callable[[int], None] | None = None) -> int:
    """Write one shard under a temporary name and rename it when complete, so a killed run never leaves a
    partial shard under a final name. Returns the number of samples written."""
    tmp = job.path.with_name(f".{job.path.name}.tmp-{os.getpid()}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(job.start, job.stop):
                scene = generate_scene(index, job.seed, job.cfg, split=job.split)
                for member, data in scene_members(scene, f"{index:06d}"):
                    _add(tar, member, data)
                if progress is not None:
                    progress(1)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, job.path)
    return job.stop - job.start


def _run(jobs: list[ShardJob], workers: int, progress: Callable[[int], None] | None) -> None:
    if workers == 1:
        for job in jobs:
            write_shard(job, progress)
        return
    # Shards are independent and each sample has its own seed, so the bytes do not depend on `workers`.
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        for count in pool.map(write_shard, jobs):
            if progress is not None:
                progress(count)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _clear(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ValidationError([Problem("out", out, "is a file, not a directory")])
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise ValidationError([Problem("out", out, "is not empty; pass --overwrite to replace its shards")])
    # Remove only what this writer produces; anything else the user put in OUT stays.
    for split in ("train", "heldout"):
        for old in [*(out / split).glob("shard-*.tar"), *(out / split).glob(".shard-*.tar.tmp-*")]:
            old.unlink()
    (out / MANIFEST).unlink(missing_ok=True)


MAX_SCENES = 10_000_000  # per dataset: bounded before any shard is written (about 100 GB of toy shards)


def write_dataset(
    out: str | Path,
    n: int,
    seed: int = 0,
    cfg: ToyWorldConfig | None = None,
    *,
    heldout_frac: float = 0.1,
    shard_size: int = 1000,
    overwrite: bool = False,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Generate `n` scenes (round(n * heldout_frac) of them held out) into OUT; returns the manifest.

    `progress(k)` is called as samples complete (per sample with one worker, per shard with several).
    """
    cfg = cfg or ToyWorldConfig()
    checks = [
        ("n", n, 1 <= n <= MAX_SCENES, f"must be in [1, {MAX_SCENES}]"),
        ("seed", seed, 0 <= seed < 2**64, "must be in [0, 2**64)"),
        ("heldout_frac", heldout_frac, 0.0 <= heldout_frac < 1.0, "must be in [0, 1)"),
        ("shard_size", shard_size, 1 <= shard_size <= MAX_SCENES, f"must be in [1, {MAX_SCENES}]"),
        ("workers", workers, 1 <= workers <= 256, "must be in [1, 256]"),
    ]
    problems = [Problem(f, v, msg) for f, v, ok, msg in checks if not ok]
    if problems:
        raise ValidationError(problems)
    out = Path(out)
    _clear(out, overwrite)
    n_heldout = int(n * heldout_frac + 0.5)
    counts = {"train": n - n_heldout, "heldout": n_heldout}
    jobs, splits = [], {}
    for split, count in counts.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        names = [SHARD_PATTERN.format(k) for k in range((count + shard_size - 1) // shard_size)]
        jobs += [
            ShardJob(out / split / name, split, k * shard_size, min(count, (k + 1) * shard_size), seed, cfg)
            for k, name in enumerate(names)
        ]
        splits[split] = {"count": count, "shards": [f"{split}/{name}" for name in names]}
    _run(jobs, workers, progress)
    manifest = {
        "format": FORMAT,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n": n,
        "heldout_frac": heldout_frac,
        "shard_size": shard_size,
        "config": cfg.to_dict(),
        "splits": splits,
    }
    write_json_atomic(manifest, out / MANIFEST)
    return manifest


def read_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MppError(f"{path}: no toy-world manifest (run `mpp prepare-data` first)") from None


def iter_shards(path: str | Path) -> Iterator[ToySample]:
    """Samples of a shard file, or of every `shard-*.tar` in a directory (sorted), without `webdataset`.

    A truncated or corrupt shard (a broken tar, a sample missing a member, an undecodable PNG or JSON) is a one-line
    MppError naming the file and the sample."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("shard-*.tar"))
    elif path.is_file():
        files = [path]
    else:
        raise MppError(f"{path}: no such shard file or directory")
    for file in files:
        yield from _shard_samples(file)


def _shard_samples(file: Path) -> Iterator[ToySample]:
    return tar_samples(file, decode_sample, (KeyError, ValueError, OSError), "the shard is truncated or damaged: ")
