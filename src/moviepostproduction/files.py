"""Safetensors checkpoints: atomic writes, checked reads, and key reports for warm starts.

Only safetensors are ever read, so no untrusted pickle is unpickled. Writes go to a temp file in the target's
folder and are renamed into place, so a killed process never leaves half a file under the final name.
Files a user names (scene files, recipes, images) are opened by `open_regular` (a FIFO or a device never is, sizes
are bounded first); `read_structured` turns a JSON / YAML one into plain data within bounds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from moviepostproduction.errors import FileProblem, MppError, WeightsError, parse_structured, shown_path

if TYPE_CHECKING:  # torch loads only with what needs it, so that reading a scene file does not (2 s)
    import torch
    from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# -------------------------------------------------------------------------------------------------- outputs
NAME_MAX = 255  # bytes in one file or folder name (Linux and macOS file systems)


class OutputError(MppError):
    """An output path that cannot be written (a folder, read-only, a full disk): one line naming the path."""


def output_error(path: str | Path, exc: OSError) -> OutputError:
    """The one-line error for an OSError met while writing `path`."""
    return OutputError(f"cannot write {shown_path(path)}: {os.strerror(exc.errno) if exc.errno else exc}")


def check_output(path: str | Path, field: str = "-o", *, folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: an existing folder (a file when `folder`), a
    folder that cannot be created (a file on the way) or written (read-only, no permission), a name too long. One
    line naming `field` and the path; nothing is created."""
    path = Path(path)
    shown = f"{field} {shown_path(path)}"
    if max(len(os.fsencode(part)) for part in path.parts) > NAME_MAX:
        raise OutputError(f"{shown}: a file or folder name is longer than {NAME_MAX} bytes")
    try:
        if path.is_dir() != folder and path.exists():
            kind, wanted = ("file", "folder") if folder else ("directory", "file")
            raise OutputError(f"{shown}: is an existing {kind}; give a {wanted} name")
        parent = path if path.is_dir() else path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent  # the nearest existing ancestor: the one the folders would be created in
    except OSError as exc:  # a loop of symbolic links, a path too long as a whole
        raise OutputError(f"{shown}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    if not parent.is_dir():
        raise OutputError(f"{shown}: cannot create its folder, {shown_path(parent)} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write in {shown_path(parent)} (read-only or permission denied)")
    return path


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary file beside `path` (a unique name: concurrent writers of one path never share it); when
    the block ends without an error it replaces `path` whole. Any OSError on the way (a read-only folder, a full
    disk, `path` an existing folder) is a one-line `OutputError` naming `path`; the temporary file is removed and an
    earlier file at `path` is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(path, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_file_mode())  # mkstemp (and safetensors) create 0600; outputs are shared files
        os.replace(tmp, path)
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        with suppress(FileNotFoundError):
            tmp.unlink()  # only there on failure: a successful replace moved it


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `state` atomically (`atomic_output` + fsync)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    return path


@contextmanager
def staged_copy(
    source: str | Path | None, out: str | Path, *, leave_out: Iterable[str] = (), replace: bool = False
) -> Iterator[Path]:
    """Build the folder `out` under a temporary name beside it and rename it into place when the block ends without
    an error, so a killed or failed build never leaves half a folder under the final name, and an `out` being
    replaced stays whole until then. The temporary folder (yielded) starts as a copy of `source` less its top-level
    entries named in `leave_out` (empty for source None); a failed block removes it. An existing `out` is replaced
    only with `replace` (else a WeightsError naming it, before anything is copied)."""
    out = Path(out)
    if out.exists() and not replace:
        raise WeightsError(f"{out} exists; pick a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # unique per build
        tmp.chmod(0o777 & ~(0o666 & ~default_file_mode()))  # mkdtemp's 0700 would hide the folder from others
    except OSError as exc:
        raise output_error(out, exc) from None
    skip = set(leave_out)
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old")  # the replaced folder, until the new one is in place
    try:
        if source is not None:
            root = Path(source)
            shutil.copytree(
                root,
                tmp,
                ignore=lambda d, names: [n for n in names if n in skip] if Path(d) == root else [],
                dirs_exist_ok=True,
            )
        yield tmp
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except OSError:
            if old.exists():
                old.rename(out)  # the earlier folder back under its name
            raise
    except OSError as exc:
        raise output_error(out, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left on failure: a successful rename moved it
        shutil.rmtree(old, ignore_errors=True)


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


def __getattr__(name: str) -> object:
    if name == "STORAGE_DTYPES":  # {"fp16": torch.float16, "bf16": ..., "fp32": ...}, built when first asked for
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cast_safetensors_files(folder: str | Path, dtype: torch.dtype) -> None:
    """Store every floating tensor of every .safetensors under `folder` as `dtype` (rewritten atomically, metadata
    kept); loaders cast back to the dtype they are asked for."""
    for file in sorted(Path(folder).rglob("*.safetensors")):
        state = load_safetensors(file)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_safetensors(cast, file, metadata=read_metadata(file) or None)


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write a UTF-8 text file whole or not at all (`atomic_output`): a reader never sees half of it."""
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(data: dict, path: str | Path) -> Path:
    return write_text_atomic(json.dumps(data, indent=2, sort_keys=True) + "\n", path)


# ---------------------------------------------------------------------------------- files a user names, read
MAX_STRUCTURED_BYTES = 1 << 20  # a scene file or a recipe: a few KiB in practice
_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}
_REASONS = {errno.ELOOP: "path has a symlink loop", errno.ENAMETOOLONG: "path is too long", errno.ENOENT: "not found"}
_REASONS |= {errno.ENOTDIR: "not found", errno.EACCES: "cannot be read (permission denied)"}


def resolve_input(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> Path:
    """`path` (relative to `base_dir`, `~` expanded) made absolute, links followed, nothing opened; a FileProblem for
    a link loop, over 4095 bytes (255 a name), an unknown `~user` (`./~x` names a file `~x`), a NUL or a surrogate."""
    text = os.fspath(path)
    if (expanded := os.path.expanduser(text)).startswith("~"):
        raise FileProblem(text, f"path starts with an unknown user ({expanded.split(os.sep)[0]})")
    try:
        full = os.fsencode(os.path.join(base_dir or "", expanded))
        if len(full) > 4095 or max(map(len, full.split(b"/"))) > 255:
            raise FileProblem(text, f"path is too long ({len(full)} bytes; at most 4095, 255 per name)")
        return Path(os.fsdecode(full)).resolve()
    except RuntimeError:  # Path.resolve's word for a loop
        raise FileProblem(text, "path has a symlink loop") from None
    except ValueError:  # a NUL, a lone surrogate
        raise FileProblem(text, "path is not a valid file name (a NUL or a lone surrogate in it)") from None


def _check_regular(path: Path, info: os.stat_result, max_bytes: int) -> None:
    kind = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(info.st_mode))
    if not stat.S_ISREG(info.st_mode):
        raise FileProblem(path, f"is {kind or 'a device'}, not a regular file (left unread)")
    if info.st_size > max_bytes:
        raise FileProblem(path, f"is {info.st_size} bytes, more than the {max_bytes} allowed")


@contextmanager
def open_regular(path: str | os.PathLike, max_bytes: int) -> Iterator[BinaryIO]:
    """`path` open for reading, once stat() says it is a regular file of at most `max_bytes`: a FIFO (opening blocks),
    a device (/dev/zero never ends), a socket or a folder is refused without being opened, and the file opened is
    checked again (it may have been swapped). Refusals and OSErrors are FileProblems naming `path`."""
    try:
        _check_regular(Path(path), os.stat(path), max_bytes)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise FileProblem(path, _REASONS.get(exc.errno, f"cannot be read ({exc.strerror})")) from None
    except ValueError:
        raise FileProblem(path, "path is not a valid file name (a NUL or a lone surrogate in it)") from None
    with os.fdopen(fd, "rb") as fh:
        _check_regular(Path(path), os.fstat(fd), max_bytes)
        yield fh


def read_structured(
    path: str | os.PathLike, what: str = "file", *, fmt: str | None = None, max_bytes: int = MAX_STRUCTURED_BYTES
) -> object:
    """Plain data (dict, list, str, int, float, bool, None) from a JSON or YAML file a user named (`fmt`, else by
    suffix), or one line naming the file (and line and column, or field): `resolve_input`, `open_regular`, not
    UTF-8, `errors.parse_structured` (syntax, nesting, values with aliases expanded, tags, duplicate keys, numbers)."""
    try:
        if (fmt := fmt or _FORMATS.get(Path(path).suffix.lower())) not in ("json", "yaml"):
            raise FileProblem(path, "suffix is not .json, .yaml or .yml")
        with open_regular(resolve_input(path), max_bytes) as fh:
            raw = fh.read(max_bytes + 1)
        if len(raw) > max_bytes:
            raise FileProblem(path, f"is more than the {max_bytes} bytes allowed")
        text = raw.decode("utf-8-sig")
    except FileProblem as err:
        raise FileProblem(path, f"{what} {err.reason}") from None
    except UnicodeDecodeError as err:
        line, column = raw.count(b"\n", 0, err.start) + 1, err.start - raw.rfind(b"\n", 0, err.start)
        raise FileProblem(path, f"line {line}, column {column}: {what} is not UTF-8 text") from None
    return parse_structured(text, fmt, shown_path(path))
