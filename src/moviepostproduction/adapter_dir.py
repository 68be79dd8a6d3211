"""An adapter folder (`--adapter DIR`): what moviepostproduction adds to a stock FLUX.1 folder, kept apart from it.

    ADAPTER/
      config.json                 the CompositionAdapter's config (ConditioningConfig; grounding_ratio)
      model.safetensors           its weights
      adapter_index.json          optional: where the image encoders are, and the sampling defaults it was tuned for
      image_encoders/clip, /dino  copies of the image encoders (`mpp init-adapter --copy-encoders`)
      transformer_lora/pytorch_lora_weights.safetensors   optional LoRA of the FLUX transformer (diffusers format)

adapter_index.json:
    {"image_encoders": {"clip": "/models/clip-vit-large-patch14", "dino": "/models/dinov2-large"},
     "sampling": {"ref_guidance_scale": 1.5, "noise_temperature": 1.0, "max_text_tokens": 512}}
Encoder paths may be relative (to the adapter folder). Where the index names none, the adapter's own
image_encoders/ copies are used, else the model dir's (the combined layout of the shipped toy model, whose
adapter/ sits inside its model dir). docs/model-directory.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moviepostproduction.encoders.checks import first_line, regular_file
from moviepostproduction.errors import WeightsError

ADAPTER_INDEX = "adapter_index.json"
ADAPTER_CONFIG = "config.json"
LORA_FILE = "transformer_lora/pytorch_lora_weights.safetensors"
ENCODERS = ("clip", "dino")
SAMPLING_KEYS = ("max_text_tokens", "ref_guidance_scale", "noise_temperature")  # grounding_ratio: config.json
INDEX_KEYS = ("image_encoders", "sampling", "_class_name")
MAX_INDEX_BYTES = 1 << 16


def _index_error(path: Path, reason: str) -> WeightsError:
    return WeightsError(f"adapter {path.parent}: {path.name} {reason}")


def read_index(root: Path) -> dict[str, Any]:
    """adapter_index.json as a checked dict ({} when absent): known keys only, encoder paths as strings,
    sampling values by name (their values are checked by `SamplingDefaults`)."""
    path = root / ADAPTER_INDEX
    if not path.exists():
        return {}
    regular_file(path, "an adapter index (JSON)", root, MAX_INDEX_BYTES)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise _index_error(path, f"is not valid JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise _index_error(path, "must be a JSON object")
    if unknown := sorted(set(data) - set(INDEX_KEYS)):
        raise _index_error(path, f"has unknown key {unknown[0][:40]!r} (known: {', '.join(INDEX_KEYS[:2])})")
    encoders = data.get("image_encoders", {})
    if not isinstance(encoders, dict) or not set(encoders) <= set(ENCODERS):
        raise _index_error(path, 'image_encoders must map "clip" and/or "dino" to folder paths')
    for name, value in encoders.items():
        if not isinstance(value, str) or not value or len(value) > 4096 or "\0" in value:
            raise _index_error(path, f"image_encoders.{name} must be a folder path (got {str(value)[:40]!r})")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict) or not set(sampling) <= set(SAMPLING_KEYS):
        bad = sorted(set(sampling) - set(SAMPLING_KEYS))[:1] if isinstance(sampling, dict) else [sampling]
        raise _index_error(path, f"sampling has unknown key {str(bad[0])[:40]!r} (known: {', '.join(SAMPLING_KEYS)})")
    return data


@dataclass(frozen=True)
class AdapterDir:
    """Paths of an adapter folder and of the image encoders it uses; see the module docstring."""

    root: Path
    image_clip: Path
    image_dino: Path
    sampling: dict[str, Any] = field(default_factory=dict)  # named sampling defaults (adapter_index.json)

    @classmethod
    def at(cls, root: str | Path, *, model_root: Path | None = None) -> AdapterDir:
        """The adapter at `root` (which need not exist yet: a model dir without one still loads for panorama and
        fill); its image encoders as the index names them, else its own copies, else `model_root`'s."""
        base = Path(root).expanduser()
        index = read_index(base) if base.is_dir() else {}
        named = index.get("image_encoders", {})
        found = {}
        for name in ENCODERS:
            own = base / "image_encoders" / name
            if name in named:
                found[name] = (base / Path(named[name]).expanduser()).resolve()
            elif own.is_dir() or model_root is None:
                found[name] = own
            else:
                found[name] = model_root / "image_encoders" / name
        return cls(base, found["clip"], found["dino"], dict(index.get("sampling", {})))

    @property
    def config(self) -> Path:
        return self.root / ADAPTER_CONFIG

    @property
    def lora(self) -> Path | None:
        """The transformer LoRA shipped with the adapter, if any."""
        path = self.root / LORA_FILE
        return path if path.is_file() else None

    def require(self, model_root: Path) -> None:
        """Raise the one line a user needs when there is no adapter: where it was looked for, how to make one."""
        if not self.config.is_file():
            raise WeightsError(
                f"missing {self.config} (expected a composition adapter: pass --adapter DIR, or make one with "
                f"`mpp init-adapter --model {model_root} --clip CLIP_DIR --dino DINO_DIR -o DIR`)"
            )


def write_index(root: Path, *, clip: str | None, dino: str | None, sampling: dict[str, Any] | None = None) -> None:
    """adapter_index.json naming the encoders' folders (None: the adapter's own copies) and sampling defaults."""
    encoders = {name: path for name, path in (("clip", clip), ("dino", dino)) if path is not None}
    data: dict[str, Any] = {"_class_name": "CompositionAdapter"}
    if encoders:
        data["image_encoders"] = encoders
    if sampling:
        data["sampling"] = sampling
    (root / ADAPTER_INDEX).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
