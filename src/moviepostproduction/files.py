"""Safetensors checkpoints: atomic writes, checked reads, and key reports for warm starts.

Only safetensors are ever read, so no untrusted pickle is unpickled. Writes go to a temp file in the target's
folder and are renamed into place, so a killed process never leaves half a file under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moviepostproduction.errors import WeightsError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` atomically (temp file + fsync + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    os.chmod(tmp, default_file_mode())  # safetensors creates 0600 files; a shared model dir must stay readable
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


@contextmanager
def staged_copy(
    source: str | Path, out: str | Path, *, leave_out: Iterable[str] = (), replace: bool = False
) -> Iterator[Path]:
    """Build the folder `out` under a temporary name beside it and rename it into place when the block ends without
    an error, so a killed or failed build never leaves half a folder under the final name, and an `out` being
    replaced stays whole until then. The temporary folder (yielded) starts as a copy of `source` less its top-level
    entries named in `leave_out`; a failed block removes it. An existing `out` is replaced only with `replace`
    (else a WeightsError naming it, before anything is copied)."""
    out = Path(out)
    if out.exists() and not replace:
        raise WeightsError(f"{out} exists; pick a new directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    root, skip = Path(source), set(leave_out)
    try:
        shutil.copytree(root, tmp, ignore=lambda d, names: [n for n in names if n in skip] if Path(d) == root else [])
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left on failure: a successful rename moved it


def build_once(target: str | Path, build: Callable[[Path], object]) -> Path:
    """`target` when it already holds a model_index.json; else `build(folder)` fills a temporary folder beside it,
    which is renamed into place. Concurrent callers never see half a dir; the loser of a race keeps the winner's."""
    target = Path(target)
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging / "dir")
        try:
            os.replace(staging / "dir", target)
        except OSError:
            if not (target / "model_index.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def save_pretrained_readable(model, folder: str | Path) -> Path:
    """A diffusers / transformers model's (or the adapter's) `save_pretrained`, safetensors by default in all of
    them, with the files given the umask's mode: the safetensors writer underneath creates them 0600."""
    folder = Path(folder)
    model.save_pretrained(folder)
    mode = default_file_mode()
    for file in folder.rglob("*"):
        if file.is_file():
            os.chmod(file, mode)
    return folder


def default_file_mode() -> int:
    """The mode a plain new file of this process gets: 0o666 less the umask (os.umask can only be read by setting
    it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def load_safetensors(path: str | Path, what: str = "a safetensors checkpoint") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, pickled, truncated or corrupt file is a one-line WeightsError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: refusing a pickle checkpoint ({path.suffix}); expected {what} (.safetensors)")
    if not path.is_file():
        raise WeightsError(f"missing {path} (expected {what})")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        with open(path, "rb") as fh:
            head = fh.read(2)
        # Only after safetensors parsing failed: a pickle stream or torch.save zip gets a clearer message.
        if head[:1] == b"\x80" or head == b"PK":
            raise WeightsError(
                f"{path}: is a pickle/torch.save file, not safetensors; refusing to unpickle it"
            ) from None
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


@dataclass
class KeyReport:
    """What a (warm-start) load did: keys loaded, left at init, ignored, or skipped for shape."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}, "
            f"shape-mismatched {len(self.mismatched)}"
        )


def match_keys(module: nn.Module, state: dict[str, torch.Tensor]) -> tuple[KeyReport, dict[str, torch.Tensor]]:
    """Compare a checkpoint with a module: the report and the entries that can be loaded."""
    own = module.state_dict()
    report = KeyReport()
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
            report.loaded.append(key)
    report.missing = [k for k in own if k not in state]
    return report, usable


def load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> KeyReport:
    """Load every key whose name and shape match; report the rest (warm start, DESIGN 5)."""
    report, usable = match_keys(module, state)
    module.load_state_dict(usable, strict=False)
    return report


def load_strict(module: nn.Module, path: str | Path, what: str) -> None:
    """Load a checkpoint that must match `module` exactly; any difference is a WeightsError naming keys."""
    report, usable = match_keys(module, load_safetensors(path, what))
    if not report.exact:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (
                ("missing", report.missing),
                ("unexpected", report.unexpected),
                ("mismatched", report.mismatched),
            )
            if keys
        )
        raise WeightsError(f"{path}: does not match {what} ({detail})")
    module.load_state_dict(usable, strict=True)


STORAGE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def cast_safetensors_files(folder: str | Path, dtype: torch.dtype) -> None:
    """Store every floating tensor of every .safetensors under `folder` as `dtype` (rewritten atomically, metadata
    kept); loaders cast back to the dtype they are asked for."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        state = load_safetensors(file)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_safetensors(cast, file, metadata=read_metadata(file) or None)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a text file whole or not at all (temp file beside it + rename): a reader never sees half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(data: dict, path: str | Path) -> Path:
    return write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", path)
