"""NanoDiT checkpoints: atomic safetensors saving, strict loading with an explicit allow-list of new keys.

In a model dir NanoDiT lives in `nanodit/` as `config.json` + `model.safetensors` (`save_nanodit_dir`,
`load_nanodit_dir`), read by `mpp vary --model DIR`.

Warm start (seed 003): a checkpoint of the pre-patch model lacks every `patch_*` parameter. `load_nanodit`
loads all matching tensors, keeps the fresh initialisation of the allowed new ones and reports the rest;
anything else missing, unexpected or of the wrong shape is an error, never silently re-initialised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moviepostproduction.encoders.checks import (
    MAX_LAYERS,
    MAX_WIDTH,
    boolean,
    config_problems,
    count,
    first_line,
    fit_problem,
    positive,
)
from moviepostproduction.errors import MppError, WeightsError, shown
from moviepostproduction.files import save_safetensors
from moviepostproduction.vary.nanodit import NanoDiT, NanoDiTConfig

__all__ = [
    "CONFIG_NAME",
    "FOLDER",
    "FORMAT",
    "INFO_NAME",
    "WEIGHTS_NAME",
    "WarmStartReport",
    "load_nanodit",
    "load_nanodit_dir",
    "save_nanodit",
    "save_nanodit_dir",
]

logger = logging.getLogger(__name__)

FORMAT = "mpp-nanodit"  # safetensors metadata "format"; the config travels as JSON in metadata "config"
FOLDER = "nanodit"  # the model-dir sub-folder
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INFO_NAME = "info.json"  # optional provenance: label, training command, validation numbers
# The bounds of a NanoDiT config read from a file, checked before NanoDiTConfig (which checks the rest) and before
# any module is built: a typo such as depth 10**9 is one line, not a hang.
CONFIG_KEYS = {
    "depth": count(1, MAX_LAYERS),
    **dict.fromkeys(
        (
            "in_channels",
            "sample_size",
            "patch_size",
            "hidden_size",
            "num_heads",
            "text_dim",
            "dino_dim",
            "dino_patches",
        ),
        count(1, MAX_WIDTH),
    ),
    "mlp_ratio": positive,
    "qk_norm": boolean,
}


@dataclass(frozen=True)
class WarmStartReport:
    """What `load_nanodit` did with each key (sorted names)."""

    loaded: tuple[str, ...]  # taken from the file
    missing: tuple[str, ...]  # in the model, absent from the file
    unexpected: tuple[str, ...]  # in the file, absent from the model
    mismatched: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (key, file shape, model shape)
    initialized: tuple[str, ...]  # kept at their fresh init: allowed missing + allowed mismatched keys

    @property
    def exact(self) -> bool:
        """True when the file held exactly the model's keys and shapes."""
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return (
            f"{len(self.loaded)} loaded, {len(self.initialized)} newly initialised, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.mismatched)} shape-mismatched"
        )


def save_nanodit(model: NanoDiT, path: str | Path) -> Path:
    """Write the weights, with the config as JSON metadata, to `path` atomically (temp file + os.replace)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MppError(f"{path}: NanoDiT checkpoints are written as .safetensors")
    metadata = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(model.config))}
    return save_safetensors(model.state_dict(), path, metadata=metadata)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, in one open; never unpickles anything."""
    from safetensors import SafetensorError, safe_open

    if path.suffix != ".safetensors":  # pickle formats (.pt / .bin / .ckpt) can run code when opened
        raise WeightsError(f"{path}: not a .safetensors file; NanoDiT only loads safetensors checkpoints")
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


def _config_from_metadata(path: Path, metadata: dict[str, str]) -> NanoDiTConfig:
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise WeightsError(f"{path}: no NanoDiT config in the file's metadata; pass the config explicitly")
    return parse_config(metadata["config"], f"{path}: invalid NanoDiT config in metadata")


def parse_config(text: str, where: str) -> NanoDiTConfig:
    """A NanoDiTConfig from JSON text; anything else is one WeightsError line starting with `where`."""
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, an int of 5000 digits
        raise WeightsError(f"{where} ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{where} (must be a JSON object, got {shown(raw)})")
    if problems := config_problems(raw, CONFIG_KEYS):
        raise WeightsError(f"{where} ({problems[0]})")
    try:
        return NanoDiTConfig(**raw)
    except (TypeError, ValueError) as exc:  # TypeError: an unknown key; NanoDiTValueError: one line per problem
        raise WeightsError(f"{where} ({'; '.join(str(exc).splitlines())})") from None


def load_nanodit(
    path: str | Path,
    cfg: NanoDiTConfig | None = None,
    *,
    strict_new: Sequence[str] = ("patch_",),
    strict: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[NanoDiT, WarmStartReport]:
    """Build a NanoDiT for `cfg` (default: the config stored in the file) and load `path` into it.

    Keys starting with a prefix in `strict_new` may be missing or shape-mismatched: they keep their fresh
    initialisation (seeded by `generator`). With `strict`, any other missing, unexpected or mismatched key
    raises a WeightsError naming the file and the keys; without it they are only reported (and logged).
    """
    path = Path(path)
    tensors, metadata = _read(path)
    cfg = cfg if cfg is not None else _config_from_metadata(path, metadata)
    if strict:  # the parameters that must come from the file, counted on the meta device before any is allocated
        with torch.device("meta"):
            skeleton = NanoDiT(cfg)
        needed = sum(p.numel() for k, p in skeleton.named_parameters() if not k.startswith(tuple(strict_new)))
        if problem := fit_problem(needed, sum(t.numel() for t in tensors.values())):
            raise WeightsError(f"{path}: its config describes a NanoDiT {problem}")
    model = NanoDiT(cfg)
    if generator is not None:
        model.initialize_weights(generator)
    own = model.state_dict()

    def allowed(key: str) -> bool:
        return key.startswith(tuple(strict_new))

    mismatched = tuple(
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in sorted(tensors.items())
        if k in own and v.shape != own[k].shape
    )
    bad_shape = {k for k, _, _ in mismatched}
    report = WarmStartReport(
        loaded=tuple(sorted(k for k in tensors if k in own and k not in bad_shape)),
        missing=tuple(sorted(k for k in own if k not in tensors)),
        unexpected=tuple(sorted(k for k in tensors if k not in own)),
        mismatched=mismatched,
        initialized=tuple(sorted(k for k in own if (k not in tensors or k in bad_shape) and allowed(k))),
    )
    errors = [
        *(f"missing {k}" for k in report.missing if not allowed(k)),
        *(f"unexpected {k}" for k in report.unexpected),
        *(f"{k} has shape {fs} in the file, {ms} in the model" for k, fs, ms in mismatched if not allowed(k)),
    ]
    if errors and strict:
        raise WeightsError(f"{path}: does not fit NanoDiT ({'; '.join(errors)})")
    for problem in errors:
        logger.warning("%s: %s (not loaded, strict=False)", path, problem)
    if report.initialized:
        logger.info("%s: newly initialised (warm start): %s", path, ", ".join(report.initialized))

    with torch.no_grad():
        for key in report.loaded:
            own[key].copy_(tensors[key])  # state_dict tensors share storage with the parameters
    logger.info("%s: %s", path, report.summary())
    return model.to(device=device, dtype=dtype), report


def save_nanodit_dir(model: NanoDiT, folder: str | Path, info: dict | None = None) -> Path:
    """`folder/config.json` + `folder/model.safetensors` (the model-dir layout) and, given, `folder/info.json`
    (provenance: "label" is shown by `mpp vary`), each written atomically."""
    from moviepostproduction.files import write_json_atomic

    folder = Path(folder)
    save_nanodit(model, folder / WEIGHTS_NAME)
    write_json_atomic(dataclasses.asdict(model.config), folder / CONFIG_NAME)
    if info is not None:
        write_json_atomic(info, folder / INFO_NAME)
    return folder


def load_nanodit_dir(
    folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> NanoDiT:
    """Strictly load `folder/config.json` + `folder/model.safetensors`; a missing file names its path."""
    folder = Path(folder)
    config_path, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise WeightsError(f"missing {config_path} (the NanoDiT config of mpp vary, written by save_nanodit_dir)")
    if not weights.is_file():
        raise WeightsError(f"missing {weights} (the NanoDiT weights of mpp vary)")
    try:
        text = config_path.read_text()
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{config_path}: not a valid NanoDiT config ({first_line(exc)})") from None
    cfg = parse_config(text, f"{config_path}: not a valid NanoDiT config")
    model, _ = load_nanodit(weights, cfg, strict_new=(), device=device, dtype=dtype)
    return model.eval()
