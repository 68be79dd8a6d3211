"""The weight files a model dir's loaders read and the bytes they take once loaded: the pre-flight's count
(resources.ModelDims.from_model_dir), read from safetensors headers before anything loads.

What counts: in each component folder a loader reads (transformer/, text_encoder_2/, image_encoders/clip/, ...),
the files its shard index names, else the folder's own `*.safetensors`; never the single-file duplicates a hub
download keeps at the root (flux1-dev.safetensors, ae.safetensors). Each tensor counts at the dtype it is loaded
in: floating tensors at the requested dtype whatever the file stores (a bf16 file loaded in fp32 counts twice its
size), 2-D weights of a quantized component at the quantized size (`quantize.BYTES_PER_VALUE`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from moviepostproduction.encoders.quantize import BYTES_PER_VALUE, SPECS
from moviepostproduction.errors import Problem, ValidationError

__all__ = ["INDEX_SUFFIX", "component_bytes", "on_device", "quantized_bytes", "tensor_bytes", "weight_files"]

INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header
MAX_INDEX_BYTES = 16 << 20
STORED_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # floating dtypes
INTEGER_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
RESIDENT = ("adapter", "fill")  # small parts beside the transformer that offload keeps on the device (offload.py)


def _index_files(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names (its weight_map's values), in its folder."""
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            return []
        weight_map = json.loads(index.read_text()).get("weight_map", {})
    except (OSError, ValueError, RecursionError, AttributeError):
        return []  # the loader reports a broken index with its own message
    names = {v for v in weight_map.values() if isinstance(v, str)} if isinstance(weight_map, dict) else set()
    return sorted(index.parent / n for n in names if "/" not in n and (index.parent / n).is_file())


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files `from_pretrained(folder)` reads: those its shard index names, else the folder's own."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        return sorted({f for index in indexes for f in _index_files(index)})
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


def _header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n > MAX_HEADER_BYTES:
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, RecursionError):
        return None
    return header if isinstance(header, dict) else None


def tensor_bytes(path: Path, dtype_bytes: int, quantized: float | None = None) -> int:
    """Bytes of `path`'s tensors once loaded: floating ones at `dtype_bytes` a value, 2-D floating weights at
    `quantized` a value when given, integer ones as stored. An unreadable header counts the file as fp32 values
    (the fewest values a file of that size can hold: the count stays a lower bound)."""
    header = _header(path)
    if header is None:
        return int(path.stat().st_size * dtype_bytes / 4)
    total = 0.0
    for name, info in header.items():
        if name == "__metadata__" or not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            continue
        values = math.prod(int(s) for s in info["shape"] if isinstance(s, int))
        stored = info.get("dtype")
        if stored not in STORED_BYTES:
            total += values * INTEGER_BYTES.get(stored, 1)
        elif quantized is not None and len(info["shape"]) == 2 and name.endswith("weight"):
            total += values * quantized
        else:
            total += values * dtype_bytes
    return int(total)


def component_bytes(
    root: Path, components: Sequence[str], dtype_bytes: int, quantize: Mapping[str, float] | None = None
) -> dict[str, int]:
    """Loaded bytes per weight folder (relative path: "transformer", "image_encoders/clip") of the top-level
    `components`; `quantize` maps a top-level folder to the bytes per value of its quantized 2-D weights."""
    sizes: dict[str, int] = {}
    for component in components:
        top = root / component
        if not top.is_dir():
            continue
        quantized = (quantize or {}).get(component)
        for folder in [top, *sorted(p for p in top.rglob("*") if p.is_dir())]:
            files = weight_files(folder)
            if files:
                sizes[folder.relative_to(root).as_posix()] = sum(tensor_bytes(f, dtype_bytes, quantized) for f in files)
    return sizes


def quantized_bytes(quantize: Mapping[str, str] | None) -> dict[str, float]:
    """Folder -> spec ({"transformer": "nf4"}) as folder -> bytes per value of its quantized weights."""
    for folder, spec in (quantize or {}).items():
        if spec not in BYTES_PER_VALUE:
            raise ValidationError([Problem(f"quantize.{folder}", spec, f"must be one of {', '.join(SPECS)}")])
    return {folder: BYTES_PER_VALUE[spec] for folder, spec in (quantize or {}).items()}


def on_device(sizes: Mapping[str, int], offload: str | None = None) -> int:
    """The bytes of weights on the execution device at once: all of them; with model offload the largest component
    plus the resident parts; with sequential offload only the resident parts (a layer at a time besides)."""
    resident = sum(v for k, v in sizes.items() if k.split("/")[0] in RESIDENT)
    moving = [v for k, v in sizes.items() if k.split("/")[0] not in RESIDENT]
    if offload == "model":
        return resident + max(moving, default=0)
    if offload == "sequential":
        return resident
    return resident + sum(moving)


def outside_bytes(model_dir, components: Sequence[str], dtype_bytes: int) -> dict[str, int]:
    """Loaded bytes of the adapter and image encoder folders a `ModelDir` takes from outside its root (an adapter
    folder beside a stock FLUX folder, naming CLIP and DINOv2 where they were downloaded), keyed as if inside."""
    root = model_dir.root.resolve()
    places = {"adapter": model_dir.adapter.root, "image_encoders/clip": model_dir.image_clip}
    places["image_encoders/dino"] = model_dir.image_dino
    sizes = {}
    for key, folder in places.items():
        if key.split("/")[0] in components and folder.is_dir() and not folder.resolve().is_relative_to(root):
            sizes[key] = sum(tensor_bytes(f, dtype_bytes) for f in weight_files(folder))
    return sizes


# The component configs whose sizes bound the parameters they build (the VAE's is read on its own).
CONFIGS = ("transformer", "text_encoder", "text_encoder_2", "image_encoders/clip", "image_encoders/dino", "nanodit")
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KB; a larger one is left to the loaders, which report it


def positive_size(value: object) -> int:
    """A positive integer size from a config, else 0 (a missing or malformed value: the loaders report it)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def built_params(cfg: dict) -> int:
    """A lower bound on the parameters a transformer config builds (FLUX, T5, CLIP, DINOv2, NanoDiT): per layer
    the MLP's two width x ffn matrices, and the token embeddings. Real counts are several times higher."""
    layers = sum(positive_size(cfg.get(k)) for k in ("num_layers", "num_single_layers", "num_hidden_layers", "depth"))
    heads = positive_size(cfg.get("num_attention_heads")) * positive_size(cfg.get("attention_head_dim"))
    width = positive_size(cfg.get("hidden_size")) or positive_size(cfg.get("d_model")) or heads
    ratio = cfg.get("mlp_ratio")
    ok = isinstance(ratio, int | float) and not isinstance(ratio, bool) and math.isfinite(ratio) and ratio > 0
    by_ratio = int(width * min(ratio, 1e6)) if ok else 0  # capped: a lower bound may be low, never overflow
    ffn = positive_size(cfg.get("intermediate_size")) or positive_size(cfg.get("d_ff")) or by_ratio or width
    return layers * 2 * width * ffn + positive_size(cfg.get("vocab_size")) * width


def read_config(path: Path) -> dict:
    """A small JSON config as a dict, {} when absent, too large or unreadable (the loaders report those)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:  # a FIFO would block the read
            return {}
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}  # the loaders report a bad model dir with their own message; the bound uses defaults
    return data if isinstance(data, dict) else {}
