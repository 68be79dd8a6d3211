"""`mpp prepare-data --from-coco / --from-scenes`: real samples written as shards into a staged folder.

Everything is checked before work starts (the options, OUT, the whole COCO JSON); the shards are then written into a
temporary folder beside OUT, renamed into place only when complete: a failed or killed run leaves OUT as it was and
no temporary file behind. With --overwrite only OUT's train/, heldout/ and manifest.json are replaced (anything else
a user keeps there stays), and only once the new ones are complete.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from moviepostproduction.datasets.coco import CocoFilters, read_coco
from moviepostproduction.datasets.coco_sample import coco_sample
from moviepostproduction.datasets.depth_rule import DepthModel
from moviepostproduction.datasets.problems import Tally
from moviepostproduction.datasets.real_format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    RealSample,
    ShardWriter,
    split_of,
)
from moviepostproduction.datasets.scenes import SceneFilters, scene_files, scene_samples
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.files import output_error, write_json_atomic

MAX_REFS_LIMIT = 1000
MAX_PIXELS_LIMIT = 8192 * 8192
MAX_SHARD_SIZE = 10_000_000
Items = Iterable[tuple[str, RealSample | None]]  # (source name, sample or None when the source gave none)


@dataclass(frozen=True)
class PrepareConfig:
    """The options shared by --from-coco and --from-scenes (docs/training-data.md)."""

    min_area: float = 0.001  # box area as a fraction of the image; smaller refs are left out
    max_refs: int = 50  # refs per sample: the largest boxes (COCO) or the first listed (scenes)
    max_pixels: int = 2048 * 2048  # targets above are scaled down (aspect kept) before their sides go to x16
    heldout_frac: float = 0.1  # a stable hash of the source name picks the held-out images
    shard_size: int = 1000
    lossless: bool = False  # targets as PNG instead of JPEG (quality 95, 4:4:4)
    skip_bad: bool = False
    overwrite: bool = False

    def check(self) -> None:
        checks = [
            ("--min-area", self.min_area, 0.0 <= self.min_area < 1.0, "must be in [0, 1)"),
            ("--max-refs", self.max_refs, 1 <= self.max_refs <= MAX_REFS_LIMIT, f"must be in [1, {MAX_REFS_LIMIT}]"),
            ("--max-pixels", self.max_pixels, 256 <= self.max_pixels <= MAX_PIXELS_LIMIT,
             f"must be in [256, {MAX_PIXELS_LIMIT}]"),
            ("--heldout-frac", self.heldout_frac, 0.0 <= self.heldout_frac < 1.0, "must be in [0, 1)"),
            ("--shard-size", self.shard_size, 1 <= self.shard_size <= MAX_SHARD_SIZE,
             f"must be in [1, {MAX_SHARD_SIZE}]"),
        ]  # fmt: skip
        if problems := [Problem(flag, value, message) for flag, value, ok, message in checks if not ok]:
            raise ValidationError(problems)


def check_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, an OUT that is a file or a non-empty folder without `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValidationError([Problem("out", out, "is a file, not a directory")])
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValidationError([Problem("out", out, "is not empty; pass --overwrite to replace its shards")])
    return out


@contextmanager
def staged_out(out: Path) -> Iterator[Path]:
    """A temporary folder beside `out` (a unique name), whose train/, heldout/ and manifest.json replace `out`'s
    when the block ends without an error; removed whatever happens."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise output_error(out, exc) from None
    try:
        yield tmp
        out.mkdir(exist_ok=True)
        _swap(tmp, out)
    except OSError as exc:
        raise output_error(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, out: Path) -> None:
    """Move `new`'s splits and manifest into `out`, `out`'s old ones aside into `new` (removed with it); on a failure
    the old ones are put back."""
    old = Path(tempfile.mkdtemp(prefix=".old.", dir=new))
    moved = []
    try:
        for name in (*SPLITS, MANIFEST):
            if (out / name).exists():
                (out / name).rename(old / name)
                moved.append(name)
        for name in (*SPLITS, MANIFEST):
            if (new / name).exists():
                (new / name).rename(out / name)
    except OSError:
        for name in moved:
            if (out / name).exists():
                (out / name).rename(new / f"{name}.failed")
            (old / name).rename(out / name)
        raise


def write_real_dataset(
    out: str | Path,
    items: Items,
    *,
    config: PrepareConfig,
    tally: Tally,
    source: dict,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write `items` into OUT's splits (staged); returns the manifest. `progress(1)` per item."""
    out = check_out(out, config.overwrite)
    with staged_out(out) as tmp:
        writers = {split: ShardWriter(tmp / split, config.shard_size, lossless=config.lossless) for split in SPLITS}
        try:
            for name, sample in items:
                if sample is not None:
                    writer = writers[split_of(name, config.heldout_frac)]
                    sample.key = f"{writer.count:08d}"
                    writer.write(sample)
                    tally.images += 1
                    tally.refs += len(sample.refs)
                if progress is not None:
                    progress(1)
            for writer in writers.values():
                writer.close()
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        splits = {s: {"count": w.count, "shards": [f"{s}/{n}" for n in w.shards]} for s, w in writers.items()}
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "source": source,
            "config": {k: v for k, v in asdict(config).items() if k not in ("overwrite", "skip_bad")},
            "splits": splits,
            "refs": tally.refs,
            "bytes": sum(w.bytes for w in writers.values()),
            "skipped": dict(sorted(tally.skipped.items())),
        }
        write_json_atomic(manifest, tmp / MANIFEST)
    return manifest


def _bar(total: int, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="image", desc="prepare-data", disable=None if show else True)


def prepare_coco(
    out: str | Path,
    instances: str | Path,
    images: str | Path,
    captions: str | Path | None = None,
    *,
    config: PrepareConfig | None = None,
    depth_model: str | Path | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[dict, Tally]:
    """COCO instances (+ captions) -> OUT; returns the manifest and the counts. Everything the JSON alone can show is
    checked before the first image is read."""
    config = config or PrepareConfig()
    config.check()
    check_out(out, config.overwrite)
    tally = Tally(skip_bad=config.skip_bad)
    filters = CocoFilters(min_area=config.min_area, max_refs=config.max_refs)
    model = DepthModel(depth_model, device) if depth_model is not None else None  # refused before the JSON is read
    plans = read_coco(instances, images, captions, filters=filters, tally=tally)
    items = (
        (plan.file_name, coco_sample(plan, "", source=Path(instances), tally=tally,
                                     max_pixels=config.max_pixels, depth_model=model))
        for plan in plans
    )  # fmt: skip
    source = {
        "kind": "coco",
        "instances": str(instances),
        "images": str(images),
        "captions": str(captions) if captions is not None else None,
        "depth_model": str(depth_model) if depth_model is not None else None,
    }
    with _bar(len(plans), progress) as bar:
        manifest = write_real_dataset(out, items, config=config, tally=tally, source=source, progress=bar.update)
    return manifest, tally


def prepare_scenes(
    out: str | Path, scenes: str | Path, *, config: PrepareConfig | None = None, progress: bool = False
) -> tuple[dict, Tally]:
    """Scene files with their target images -> OUT; returns the manifest and the counts."""
    config = config or PrepareConfig()
    config.check()
    check_out(out, config.overwrite)
    tally = Tally(skip_bad=config.skip_bad)
    files = scene_files(scenes)
    filters = SceneFilters(min_area=config.min_area, max_refs=config.max_refs)
    samples = scene_samples(files, filters=filters, tally=tally, max_pixels=config.max_pixels)
    source = {"kind": "scenes", "scenes": str(scenes)}
    with _bar(len(files), progress) as bar:
        manifest = write_real_dataset(out, samples, config=config, tally=tally, source=source, progress=bar.update)
    return manifest, tally
