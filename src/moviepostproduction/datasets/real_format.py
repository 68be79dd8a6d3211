"""The real-data training sample (docs/training-data.md) and its WebDataset tar shards.

Layout of OUT: `train/shard-000000.tar ...`, `heldout/shard-000000.tar ...`, `manifest.json` (format
"mpp-real-wds"). One sample = consecutive members sharing a key (`%08d`, its index in the split):
`KEY.image.jpg` (or `.image.png` with --lossless) the target, RGB, any size whose sides are multiples of 16;
`KEY.ref0.png ... KEY.ref{R-1}.png` the refs, RGBA crops of the target's source pixels (alpha = instance mask);
`KEY.scene.json` a scene file in the Scene schema (docs/scene-format.md) whose ref images name those members;
`KEY.meta.json` where the sample came from (source file, image and annotation ids, depth source). Readable with
the `webdataset` package or, without it, with `iter_real_samples`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.errors import MppError
from moviepostproduction.files import default_file_mode
from moviepostproduction.scene import scene_from_dict

FORMAT = "mpp-real-wds"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
SPLITS = ("train", "heldout")
JPEG_QUALITY = 95  # with 4:4:4 chroma: re-encoding a camera JPEG at this setting changes it by ~1 level on average
SHARD_READ_ERRORS = (tarfile.TarError, EOFError, OSError)  # what reading a truncated or damaged tar raises


@dataclass
class RealRef:
    """One reference of a sample: an RGBA crop placed at a normalised box."""

    crop: np.ndarray  # (h, w, 4) uint8, alpha = the instance mask inside the box
    bbox: tuple[float, float, float, float]  # normalised x0, y0, x1, y1 on the target
    depth: str  # "fg" | "mg" | "bg"
    caption: str | None  # None: the scene file gave the ref none


@dataclass
class RealSample:
    """One training sample: the target image, its caption and its refs, front to back."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8; H and W multiples of 16
    caption: str
    refs: list[RealRef]
    meta: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def bboxes(self) -> np.ndarray:
        return np.asarray([r.bbox for r in self.refs], dtype=np.float64).reshape(-1, 4)  # (R, 4)

    @property
    def depths(self) -> list[str]:
        return [r.depth for r in self.refs]

    @property
    def ref_captions(self) -> list[str | None]:
        return [r.caption for r in self.refs]

    def scene_dict(self) -> dict:
        """The sample's scene file (Scene schema); ref images are the member names `refI.png`."""
        refs = [
            {"image": f"ref{i}.png", "bbox": [float(v) for v in r.bbox], "depth": r.depth}
            | ({"caption": r.caption} if r.caption is not None else {})
            for i, r in enumerate(self.refs)
        ]
        return {"caption": self.caption, "width": self.width, "height": self.height, "refs": refs}


def canvas_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The stored target size of a `width` x `height` image: scaled down (aspect kept) to at most `max_pixels`, then
    each side rounded to the nearest multiple of 16 (at least 16): the Scene schema's rule. Normalised boxes are
    unchanged by it; the aspect ratio moves by at most 8 / side (1.25 % at 640 pixels)."""
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    return tuple(max(16, int(round(side * scale / 16)) * 16) for side in (width, height))  # type: ignore[return-value]


def split_of(name: str, heldout_frac: float) -> str:
    """ "heldout" for a stable `heldout_frac` of source names (a hash of the name, so a re-run with other filters or
    more images keeps every image in its split), else "train"."""
    digest = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return "heldout" if digest / 2**64 < heldout_frac else "train"


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def sample_members(sample: RealSample, *, lossless: bool = False) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order they are written; the scene is validated by the Scene schema
    first (a sample that `load_scene` would refuse is never written)."""
    scene = sample.scene_dict()
    scene_from_dict(scene, base_dir=".", check_images=False, max_refs=max(len(sample.refs), 1))
    key = sample.key
    image = (f"{key}.image.png", _png(sample.image)) if lossless else (f"{key}.image.jpg", _jpeg(sample.image))
    members = [image]
    members += [(f"{key}.ref{i}.png", _png(r.crop)) for i, r in enumerate(sample.refs)]
    members.append((f"{key}.scene.json", json.dumps(scene, sort_keys=True).encode()))
    members.append((f"{key}.meta.json", json.dumps({"key": key, **sample.meta}, sort_keys=True).encode()))
    return members


def _decode(data: bytes, mode: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != mode:
            raise ValueError(f"is {img.mode}, expected {mode}")
        return np.asarray(img).copy()


def decode_real_sample(raw: Mapping[str, object]) -> RealSample:
    """A `webdataset` raw sample ({"__key__": ..., "image.jpg": bytes, "scene.json": ..., ...}) -> RealSample."""
    scene = json.loads(raw["scene.json"])
    image = raw["image.png"] if "image.png" in raw else raw["image.jpg"]
    refs = [
        RealRef(_decode(raw[ref["image"]], "RGBA"), tuple(ref["bbox"]), ref["depth"], ref.get("caption"))
        for ref in scene["refs"]
    ]
    meta = json.loads(raw["meta.json"])
    sample = RealSample(str(raw["__key__"]), _decode(image, "RGB"), scene["caption"], refs, meta)
    if (sample.width, sample.height) != (scene["width"], scene["height"]):
        raise ValueError(f"image is {sample.width}x{sample.height}, the scene says {scene['width']}x{scene['height']}")
    sample.meta.pop("key", None)
    return sample


def iter_real_samples(path: str | Path) -> Iterator[RealSample]:
    """Samples of a shard file, or of every `shard-*.tar` in a folder (a split: OUT/train), in order, without
    `webdataset`. A damaged shard or sample is a one-line MppError naming the file and the sample."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("shard-*.tar"))
        if not files and (path / MANIFEST).is_file():
            raise MppError(f"{path}: holds the splits, not shards; read {path / 'train'} or {path / 'heldout'}")
    elif path.is_file():
        files = [path]
    else:
        raise MppError(f"{path}: no such shard file or folder")
    for file in files:
        yield from _shard_samples(file)


def _shard_samples(file: Path) -> Iterator[RealSample]:
    return tar_samples(file, decode_real_sample, (KeyError, ValueError, TypeError, OSError), "")


def unreadable_shard(file: Path, exc: BaseException) -> MppError:
    return MppError(f"{file}: not a readable tar shard ({exc}); write the data set again with mpp prepare-data")


def tar_samples(file: Path, decode, errors: tuple[type[BaseException], ...], damage: str) -> Iterator:
    """The samples of one WebDataset tar shard (toy or real): members grouped by key (the name before the first
    dot) and handed to `decode` as {"__key__": key, ext: bytes}, in order. A broken tar, or a sample `decode`
    refuses with one of `errors` (KeyError: a missing member), is a one-line MppError naming the file and the
    sample; `damage` is put before the advice to write the data set again."""
    current: dict[str, object] = {}

    def decoded():
        try:
            return decode(current)
        except errors as exc:
            what = f"missing member {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise MppError(
                f"{file}: sample {current['__key__']!r} is incomplete or corrupt ({what}); {damage}write the data "
                "set again with mpp prepare-data"
            ) from None

    try:
        with tarfile.open(file, "r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = os.path.basename(member.name).partition(".")
                if current and current["__key__"] != key:
                    yield decoded()
                    current = {}
                current.setdefault("__key__", key)
                current[ext] = tar.extractfile(member).read()
    except SHARD_READ_ERRORS as exc:
        raise unreadable_shard(file, exc) from None
    if current:
        yield decoded()


class ShardWriter:
    """Writes one split's samples into `folder/shard-%06d.tar`, `shard_size` samples per shard, in order. Each shard
    is written under a unique temporary name and renamed when complete; `close()` finishes the last one."""

    def __init__(self, folder: Path, shard_size: int, *, lossless: bool = False):
        self.folder, self.shard_size, self.lossless = folder, shard_size, lossless
        self.count, self.shards, self.bytes = 0, [], 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        folder.mkdir(parents=True, exist_ok=True)  # an empty split is an empty folder

    def write(self, sample: RealSample) -> None:
        if self._tar is None:
            name = SHARD_PATTERN.format(len(self.shards))
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
            self._tmp, self.shards = Path(tmp), [*self.shards, name]
            self._tar = tarfile.open(fileobj=os.fdopen(fd, "wb"), mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        for member, data in sample_members(sample, lossless=self.lossless):
            info = tarfile.TarInfo(member)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.count += 1
        if self.count % self.shard_size == 0:
            self._finish()

    def _finish(self) -> None:
        fileobj = self._tar.fileobj
        self._tar.close()
        fileobj.close()
        os.chmod(self._tmp, default_file_mode())  # mkstemp creates 0600; shards are shared files
        os.replace(self._tmp, self.folder / self.shards[-1])
        self._tar = self._tmp = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (its temporary file); finished shards stay."""
        if self._tar is not None:
            fileobj = self._tar.fileobj
            self._tar = None
            fileobj.close()
            self._tmp.unlink(missing_ok=True)


def read_real_manifest(out: str | Path) -> dict:
    """OUT's manifest.json, checked to be this format."""
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise MppError(f"{path}: no manifest (run `mpp prepare-data --from-coco` or `--from-scenes` first)") from None
    except (OSError, ValueError) as exc:
        raise MppError(f"{path}: not a readable manifest ({str(exc).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise MppError(f"{path}: format {got!r} is not {FORMAT!r} (a toy-world data set?)")
    return manifest
