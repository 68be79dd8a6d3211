"""What a run's feature cache was built from (index.json `meta`), and the resolution buckets it is built with.

`mpp train` reuses OUT/cache/SPLIT/ only when every key matches the recipe's: the model dir, the data set, the refs
and text sizes, the sample limit, whether DINO patch tokens are stored, the `buckets:` setting, and the adapter's
image encoders, named by content (`encoder_fingerprint`) so that a cache built with other CLIP / DINOv2 weights
(another folder, or the same folder with other files) is refused with "delete it to rebuild".

Recipe `buckets:` (docs/training.md, "Cached features"):
- `auto` (the default): real-format data (`mpp prepare-data --from-coco / --from-scenes`) is bucketed with
  `BucketSpec.auto` of its train split's largest target (1024^2 pixels, or the largest square within that target's
  area when smaller: a split is never upscaled past its largest target); the toy world's single-size shards are not
  bucketed;
- `null` or `false`: no buckets (every scene of a split must share one size);
- `{area: 1048576, step: 64, max_ratio: 4}` (each key optional): these buckets, for any data set;
- `native`: every target trains at its own size (sides multiples of 16 px), one size per batch: for a data set of a
  few sizes, such as toy scenes at 128 px mixed with dense ones at 320 px (docs/training.md).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from moviepostproduction.datasets.buckets import NATIVE, BucketSpec, target_sizes
from moviepostproduction.errors import Problem, ValidationError

BUCKET_KEYS = {"area": int, "step": int, "max_ratio": (int, float)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SAMPLED = 1 << 20  # bytes of a weight file hashed at its middle and at its end


def buckets_problem(name: str, value: object) -> Problem | None:
    """The one-line problem of a recipe `buckets:` value, None when it is usable."""
    if value is None or value is False or value in ("auto", NATIVE):
        return None
    if not isinstance(value, dict):
        return Problem(name, value, "must be auto, native, null (no buckets) or a mapping {area, step, max_ratio}")
    for key, item in value.items():
        kind = BUCKET_KEYS.get(key)
        if kind is None:
            return Problem(f"{name}.{key}", item, f"unknown key (known: {', '.join(BUCKET_KEYS)})")
        if not isinstance(item, kind) or isinstance(item, bool):
            return Problem(f"{name}.{key}", item, "must be a number" if key == "max_ratio" else "must be an integer")
    try:
        BucketSpec(**value)
    except ValidationError as err:
        problem = err.problems[0]
        return Problem(name, value, problem.message)
    return None


def buckets_key(value: object) -> str:
    """The recipe's `buckets:` setting as the cache key names it: auto, off or area/step/max_ratio."""
    if value is None or value is False:
        return "off"
    return value if isinstance(value, str) else BucketSpec(**value).key


def _largest_target(train: Path, limit: int | None) -> int:
    return max((w * h for w, h in target_sizes(train, limit)), default=0)


def resolve_buckets(value: object, data: str | Path, limit: int | None) -> BucketSpec | str | None:
    """The buckets a cache of data set `data` is built with (module docstring): a spec, `NATIVE` or None; `limit`:
    the train samples used."""
    from moviepostproduction.training.sample_stream import is_real

    if value == NATIVE:
        return NATIVE
    if value is None or value is False:
        return None
    if isinstance(value, dict):
        return BucketSpec(**value)
    train = Path(data) / "train"
    if not is_real(train):
        return None
    largest = _largest_target(train.resolve(), limit)
    return BucketSpec.auto(largest) if largest else None


def encoder_fingerprint(folder: str | Path) -> str:
    """A short content hash of an encoder folder: its JSON / text files whole, and of each weight file its name,
    size and 1 MiB at its middle and at its end (a fine-tune of the same size differs there; its header does not)."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        digest.update(name.encode("utf-8", "surrogatepass") + b"\0")
        if path.suffix in WEIGHT_SUFFIXES:
            size = path.stat().st_size
            digest.update(str(size).encode())
            with path.open("rb") as fh:
                for start in (max(0, size // 2 - SAMPLED // 2), max(0, size - SAMPLED)):
                    fh.seek(start)
                    digest.update(fh.read(SAMPLED))
        elif path.suffix in (".json", ".txt"):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_meta(recipe, md, limit: int | None, patches: bool) -> dict[str, str]:
    """The key of a cache of `recipe`'s data (index.json `meta`), `md` the model dir with the adapter's encoders."""
    return {
        "model": str(Path(recipe.model).resolve()),
        "data": str(Path(recipe.data).resolve()),
        "max_refs": str(recipe.max_refs),
        "max_text_tokens": str(recipe.max_text_tokens),
        "limit": str(limit),
        "patches": str(patches),  # DINO patch tokens: stored only for an adapter that lays them into boxes
        "buckets": buckets_key(recipe.buckets),
        "image_encoders": f"clip {encoder_fingerprint(md.image_clip)}, dino {encoder_fingerprint(md.image_dino)}",
    }
