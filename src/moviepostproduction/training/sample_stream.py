"""Decoded shard samples in order for the cache build: in this process, or decoded by worker processes.

A split of either shard format is read: the toy world's (`toyworld/shards.py`) or real data's
(`datasets/real_format.py`, "mpp-real-wds" in the data set's manifest.json), the latter as `CacheSample`s.

The encoders run once, in the building process; worker processes only decode the tar shards (PNG + JSON), which is
what keeps an accelerator busy. Worker w decodes shard files w, w + W, ... into its own bounded queue and the
consumer reads the queues in file order, so the samples come in `iter_shards` order and at most
`workers * PREFETCH` decoded samples wait in memory, whatever the data set's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from moviepostproduction.datasets.real_format import SHARD_READ_ERRORS, unreadable_shard
from moviepostproduction.errors import MppError
from moviepostproduction.toyworld.shards import iter_shards

PREFETCH = 8  # decoded samples each worker may hold ahead of the encoders
_END = "end"
REAL_FORMAT = "mpp-real-wds"  # datasets/real_format.FORMAT


@dataclass
class CacheSample:
    """What the cache build reads of a real-data sample, named as a toy `ToySample` names it."""

    scene: np.ndarray  # (H, W, 3) uint8, the target
    refs: list[np.ndarray]  # RGBA crops (alpha = the instance mask)
    caption: str
    ref_captions: list[str | None]
    bboxes: np.ndarray  # (R, 4) normalised x0, y0, x1, y1
    depths: list[str]


def _real_samples(file: str) -> Iterator[CacheSample]:
    from moviepostproduction.datasets.real_format import iter_real_samples

    for s in iter_real_samples(file):
        yield CacheSample(s.image, [r.crop for r in s.refs], s.caption, s.ref_captions, s.bboxes, s.depths)


def is_real(shards: Path) -> bool:
    """Whether a split folder belongs to a real-data set (its parent's manifest.json says so)."""
    manifest = shards.parent / "manifest.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == REAL_FORMAT
    except (OSError, ValueError, AttributeError):
        return False  # the toy reader then names the problem


def shard_length(file: Path) -> int:
    """Samples in a shard file, from its tar headers (the members of one sample share the key before the first dot)."""
    import tarfile

    try:
        with tarfile.open(file, "r") as tar:
            return len({Path(m.name).name.partition(".")[0] for m in tar if m.isfile()})
    except SHARD_READ_ERRORS as exc:
        raise unreadable_shard(file, exc) from None


def plan(shards: str | Path, skip: int = 0, limit: int | None = None) -> list[tuple[str, int, int | None, bool]]:
    """(file, samples to skip in it, samples to take or None for all, real format) per shard file that contributes:
    samples skip .. limit - 1 of the dir. Whole files are skipped from their tar headers, without decoding."""
    path = Path(shards)
    if not path.is_dir():
        raise MppError(f"{path}: no such shard directory")
    jobs: list[tuple[str, int, int | None, bool]] = []
    real, left = is_real(path), None if limit is None else limit - skip
    for file in sorted(path.glob("shard-*.tar")):
        if left is not None and left <= 0:
            break  # the shards past the limit are not even opened
        if skip == 0 and left is None:
            jobs.append((str(file), 0, None, real))
            continue
        length = shard_length(file)
        if skip >= length:
            skip -= length
            continue
        take = length - skip if left is None else min(length - skip, left)
        jobs.append((str(file), skip, take, real))
        skip, left = 0, None if left is None else left - take
    return jobs


def _file_samples(job: tuple[str, int, int | None, bool]) -> Iterator:
    file, first, take, real = job
    return islice((_real_samples if real else iter_shards)(file), first, None if take is None else first + take)


def iter_samples(shards: str | Path, *, skip: int = 0, limit: int | None = None, workers: int = 1) -> Iterator:
    """Samples skip .. limit - 1 of a shard dir in order; decoded by `workers` processes when more than one."""
    jobs = plan(shards, skip, limit)
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield from _file_samples(job)
        return
    yield from _from_workers(jobs, min(workers, len(jobs)))


def _decode_files(jobs: list[tuple[str, int, int | None, bool]], queue) -> None:
    """Worker: every sample of its files into its queue, an end marker after each file; an error ends it."""
    try:
        for job in jobs:
            for sample in _file_samples(job):
                queue.put(sample)
            queue.put(_END)
    except MppError as exc:
        queue.put(("error", str(exc)))


def _from_workers(jobs: list, workers: int) -> Iterator:
    from multiprocessing import get_context
    from queue import Empty

    ctx = get_context("spawn")
    queues = [ctx.Queue(PREFETCH) for _ in range(workers)]
    procs = [ctx.Process(target=_decode_files, args=(jobs[w::workers], queues[w]), daemon=True) for w in range(workers)]
    for proc in procs:
        proc.start()
    try:
        for k in range(len(jobs)):
            queue = queues[k % workers]
            while True:
                try:
                    item = queue.get(timeout=1.0)
                except Empty:
                    if not procs[k % workers].is_alive():  # killed (out of memory) or an unexpected error
                        raise MppError(f"{jobs[k][0]}: the process decoding it died") from None
                    continue
                if isinstance(item, str) and item == _END:
                    break
                if isinstance(item, tuple):
                    raise MppError(item[1])  # a worker's one-line error (a corrupt shard)
                yield item
    finally:
        for proc in procs:
            proc.terminate()  # done, or an error ended the build: the others stop at once
        for proc in procs:
            proc.join()
