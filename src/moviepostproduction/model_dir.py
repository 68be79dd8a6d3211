"""A local model directory in the FLUX.1-dev layout plus image encoders, checked before anything loads.

Every problem is a `WeightsError` whose one-line message names the exact path and what was expected; the values of
its JSON files are checked by key (types, bounds: encoders/checks.py) before anything is built from them.
Weights are loaded from safetensors only, from local files only; missing tensors are an error, never
silently random-initialised (transformers and diffusers both do that by default, with a warning).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from moviepostproduction.adapter_dir import AdapterDir
from moviepostproduction.encoders.checks import (
    INDEX_KEYS,
    MODEL_KEYS,
    PREPROCESSOR_KEYS,
    SCHEDULER_KEYS,
    Check,
    check_safetensors,
    component_parameters,
    config_error,
    config_problems,
    first_line,
    fit_problem,
    load_error,
    regular_file,
    stored_values,
    tokenizer_problem,
)
from moviepostproduction.errors import Problem, WeightsError
from moviepostproduction.sampling_defaults import SAMPLING_CHECKS, FlowShift, SamplingDefaults

__all__ = ["FlowShift", "ModelDir", "SamplingDefaults", "as_model_dir", "default_model_dir"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "spiece.model")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass(frozen=True)
class Component:
    """What one sub-folder must hold."""

    subdir: str
    label: str  # what the folder holds, used in every message about it
    kind: str  # "diffusers" | "transformers" | "tokenizer"
    accepted: tuple[str, ...] = ()  # diffusers `_class_name`s or transformers `model_type`s
    preprocessor: bool = False


COMPONENTS: dict[str, Component] = {
    "transformer": Component("transformer", "FluxTransformer2DModel", "diffusers", ("FluxTransformer2DModel",)),
    "vae": Component("vae", "AutoencoderKL", "diffusers", ("AutoencoderKL",)),
    "text_encoder": Component("text_encoder", "CLIPTextModel", "transformers", ("clip_text_model", "clip")),
    "tokenizer": Component("tokenizer", "CLIP tokenizer", "tokenizer"),
    "text_encoder_2": Component("text_encoder_2", "T5EncoderModel", "transformers", ("t5",)),
    "tokenizer_2": Component("tokenizer_2", "T5 tokenizer", "tokenizer"),
    "image_clip": Component(
        "image_encoders/clip",
        "CLIPVisionModelWithProjection",
        "transformers",
        ("clip_vision_model", "clip"),
        preprocessor=True,
    ),
    "image_dino": Component("image_encoders/dino", "Dinov2Model", "transformers", ("dinov2",), preprocessor=True),
}
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
IMAGE_COMPONENTS = ("image_clip", "image_dino")


INDEX_SAMPLING_KEYS = ("max_text_tokens", "ref_guidance_scale", "noise_temperature")  # in model_index.json


def _a(label: str) -> str:  # "an image encoder", "a VAE"
    return f"{'an' if label[0] in 'AEIOU' else 'a'} {label}"


def read_json(path: Path, what: str, root: Path, keys: dict[str, Check] | None = None) -> dict[str, Any]:
    """Parse a JSON object file or raise a one-line WeightsError naming it; with `keys`, the values of those keys
    are checked too (encoders/checks.py), the first bad one named with the file and its value."""
    regular_file(path, what, root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8, bad JSON, an int of 5000 digits
        reason = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        raise WeightsError(f"model dir {root}: cannot read {path} as JSON ({what}): {reason}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"model dir {root}: {path} is not a JSON object (expected {what})")
    if problems := config_problems(data, keys or {}):
        raise config_error(root, path, problems[0])
    return data


@dataclass(frozen=True)
class ModelDir:
    """Paths of a model directory (`--model DIR`) and of the adapter used with it (`--adapter DIR`, else DIR/adapter);
    see docs/model-directory.md. The image encoders are the adapter's (`adapter_dir.AdapterDir`)."""

    root: Path
    transformer: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    text_encoder_2: Path
    tokenizer_2: Path
    image_clip: Path
    image_dino: Path
    adapter: AdapterDir

    @classmethod
    def at(cls, root: str | Path, adapter: str | Path | None = None) -> ModelDir:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise WeightsError(f"model dir {base}: not a directory (expected a FLUX-layout model folder)")
        if adapter is not None and not Path(adapter).expanduser().is_dir():
            raise WeightsError(f"adapter {adapter}: not a directory (expected an adapter folder: mpp init-adapter)")
        found = AdapterDir.at(base / "adapter" if adapter is None else adapter, model_root=base)
        paths = {name: base / comp.subdir for name, comp in COMPONENTS.items() if name not in IMAGE_COMPONENTS}
        return cls(base, **paths, image_clip=found.image_clip, image_dino=found.image_dino, adapter=found)

    @classmethod
    def source_of(cls, source: str | Path, out: str | Path) -> tuple[ModelDir, Path]:
        """For a model dir derived from another (scripts/): the checked source and the new dir's path, which must not
        exist yet (WeightsError naming it otherwise)."""
        md = cls.at(source)
        md.check()
        target = Path(out)
        if target.exists():
            raise WeightsError(f"{target} exists; pick a new directory for the derived model dir")
        return md, target

    @property
    def index(self) -> dict[str, Any]:
        """model_index.json, or {} when absent (it is optional)."""
        path = self.root / "model_index.json"
        return read_json(path, "a diffusers model_index.json", self.root, INDEX_KEYS) if path.exists() else {}

    @property
    def tiny_random(self) -> bool:
        """True for the random-init tiny dirs of `moviepostproduction.toyworld.tiny`: their output is noise."""
        return bool(self.index.get("tiny_random", False))

    def output_label(self, output: str = "image") -> str:
        """What a pipeline loaded from this dir tells users made its `output`: model_index.json's `label`, or for a
        tiny random dir a warning (also logged) that the output is noise."""
        if self.tiny_random:
            logger.warning("model dir %s holds tiny random weights: the output is noise, not a picture", self.root)
            return f"tiny-random (untrained weights: the {output} is noise)"
        return str(self.index.get("label", ""))

    def sampling_defaults(self) -> SamplingDefaults:
        """The `SamplingDefaults` this dir names: model_index.json's `max_text_tokens`, `ref_guidance_scale` and
        `noise_temperature`, overridden by the adapter's (adapter_index.json `sampling`, config.json's
        `grounding_ratio`); the built-in value for a key neither names. A bad value is a one-line WeightsError naming
        the file, the key and the value."""
        index = self.root / "model_index.json"
        named = {key: (index, self.index[key]) for key in INDEX_SAMPLING_KEYS if key in self.index}
        named.update({key: (self.adapter.root / "adapter_index.json", v) for key, v in self.adapter.sampling.items()})
        if self.adapter.config.is_file():
            adapter = read_json(self.adapter.config, "a CompositionAdapter config", self.root)
            if "grounding_ratio" in adapter:
                named["grounding_ratio"] = (self.adapter.config, adapter["grounding_ratio"])
        for key, (file, value) in named.items():
            if problem := SAMPLING_CHECKS[key](key, value):
                raise config_error(self.root, file, problem)
        shift = {}
        if (self.root / SCHEDULER_CONFIG).is_file():  # checked by SCHEDULER_KEYS (NaN, types, bounds)
            scheduler = read_json(self.root / SCHEDULER_CONFIG, "a scheduler config", self.root, SCHEDULER_KEYS)
            if scheduler.get("time_shift_type", "exponential") != "exponential":  # FLUX's; "linear" is not
                raise WeightsError(f"model dir {self.root}: {SCHEDULER_CONFIG} time_shift_type must be exponential")
            shift["flow_shift"] = FlowShift.from_config(scheduler)
        return SamplingDefaults(**{key: value for key, (_, value) in named.items()}, **shift)

    def path(self, component: str) -> Path:
        if component not in COMPONENTS:
            raise KeyError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
        return getattr(self, component)

    def check(self, components: Iterable[str] = tuple(COMPONENTS)) -> None:
        """Raise a one-line WeightsError for the first missing or unusable file of the given components: a value of
        the wrong type or out of its bounds (encoders/checks.py), and a config that needs more parameters than its
        weight files hold (found on the meta device), are refused before anything is built."""
        index = self.index
        scale = index.get("image_position_scale", 1.0)
        if scale != 1.0:  # RoPE positions are FLUX's; interpolated ones were an experiment (experiments/README.md)
            raise WeightsError(
                f"model dir {self.root}: model_index.json image_position_scale {scale!r} is not supported (removed; "
                "only FLUX's positions, 1.0)"
            )
        if "scheduler" in index or (self.root / "scheduler").exists():  # not used for sampling; exports copy it
            read_json(self.root / SCHEDULER_CONFIG, "a diffusers scheduler config", self.root, SCHEDULER_KEYS)
        for name in components:
            self._check_component(name)

    def _missing(self, path: Path, what: str) -> WeightsError:
        return WeightsError(f"model dir {self.root}: missing {path} (expected {what})")

    def _check_component(self, name: str) -> None:
        folder = self.path(name)  # unknown names raise here, listing the known ones
        comp = COMPONENTS[name]
        layout = "diffusers layout" if comp.kind == "diffusers" else "transformers layout"
        if not folder.is_dir():
            raise self._missing(folder, f"{_a(comp.label)} folder in {layout}")
        if comp.kind == "tokenizer":
            self._check_tokenizer(folder, comp)
            return
        config = read_json(folder / "config.json", f"{_a(comp.label)} config in {layout}", self.root, MODEL_KEYS)
        declared = config.get("_class_name") if comp.kind == "diffusers" else config.get("model_type")
        if declared not in comp.accepted:
            key = "_class_name" if comp.kind == "diffusers" else "model_type"
            raise WeightsError(
                f"model dir {self.root}: {folder / 'config.json'} has {key}={declared!r} "
                f"(expected {_a(comp.label)}: {key} in {list(comp.accepted)})"
            )
        self._check_weights(folder, comp)
        if comp.preprocessor:
            read_json(
                folder / "preprocessor_config.json",
                f"the {comp.label} preprocessor config (resize, crop, mean/std)",
                self.root,
                PREPROCESSOR_KEYS,
            )
        self._check_fit(folder, comp)

    def _check_fit(self, folder: Path, comp: Component) -> None:
        """Build the component on the meta device (no memory) and refuse a config that needs far more parameters than
        its weight files hold: the library would allocate (and random-initialise) the difference. A smaller mismatch
        loads, and its missing tensors are named then."""
        files = sorted(folder.glob("*.safetensors"))
        try:
            needed = component_parameters(comp.kind, comp.label, folder)
        except Exception as exc:  # the libraries' config and constructor errors have no common type
            raise load_error(self.root, folder, comp.label, exc) from exc
        if problem := fit_problem(needed, stored_values(files)):
            raise WeightsError(f"model dir {self.root}: {folder / 'config.json'} describes {_a(comp.label)} {problem}")

    def _check_tokenizer(self, folder: Path, comp: Component) -> None:
        what = f"{_a(comp.label)} saved with save_pretrained"
        read_json(folder / "tokenizer_config.json", what, self.root, MODEL_KEYS)
        if not any((folder / f).exists() for f in TOKENIZER_VOCAB_FILES):
            raise self._missing(
                folder / "tokenizer.json", f"the {comp.label} vocabulary, or one of {list(TOKENIZER_VOCAB_FILES[1:])}"
            )
        vocab = folder / "tokenizer.json"
        if vocab.exists():
            regular_file(vocab, f"the {comp.label} vocabulary", self.root)
            if reason := tokenizer_problem(vocab):
                raise WeightsError(f"model dir {self.root}: {vocab} is not a tokenizer file ({reason})")

    def _check_weights(self, folder: Path, comp: Component) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise WeightsError(
                    f"model dir {self.root}: {folder} holds only pickle weights {pickles}; refusing to unpickle, "
                    "convert them to .safetensors"
                )
            stem = "diffusion_pytorch_model" if comp.kind == "diffusers" else "model"
            raise self._missing(folder / f"{stem}.safetensors", f"{comp.label} weights as .safetensors")
        for index_file in folder.glob("*.safetensors.index.json"):
            shards = read_json(index_file, "a safetensors shard index", self.root).get("weight_map", {})
            if not (isinstance(shards, dict) and all(isinstance(v, str) and "/" not in v for v in shards.values())):
                raise config_error(
                    self.root, index_file, Problem("weight_map", shards, "must map names to shard files")
                )
            for shard in sorted(set(shards.values())):
                if not (folder / shard).is_file():
                    raise self._missing(folder / shard, f"a shard listed in {index_file.name}")
        for file in files:
            regular_file(file, f"{comp.label} weights", self.root, None)  # a FIFO would block the header read
            check_safetensors(file, self.root)


def as_model_dir(model_dir: ModelDir | str | Path, adapter: str | Path | None = None) -> ModelDir:
    """A ModelDir for a path (with `adapter`, the adapter folder used with it); a ModelDir is returned as is unless
    another adapter is named."""
    if isinstance(model_dir, ModelDir):
        return model_dir if adapter is None else ModelDir.at(model_dir.root, adapter)
    return ModelDir.at(model_dir, adapter)


def move_like(module: M, device: torch.device | str, dtype: torch.dtype) -> M:
    """A freshly built model (diffusers' `from_config` gives fp32 on the CPU) moved to another model's device and
    dtype; the dtype is cast only when it differs, since diffusers warns on any dtype cast, even a no-op one."""
    module = module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module


def default_cache_dir() -> Path:
    """`$MPP_CACHE`, else `$XDG_CACHE_HOME/moviepostproduction`, else ~/.cache/moviepostproduction."""
    if env := os.environ.get("MPP_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moviepostproduction"


SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "toy-model"


def default_model_dir() -> Path:
    """The model used without `--model`: the toy-world model shipped in the package (trained by the project,
    scripts/train_toy_model.sh). A missing or incomplete copy is a WeightsError naming the path; nothing is
    substituted for it."""
    if not (SHIPPED_MODEL_DIR / "model_index.json").is_file():
        raise WeightsError(
            f"the shipped toy model is missing: {SHIPPED_MODEL_DIR / 'model_index.json'} (expected the package's "
            "toy-world model dir; reinstall moviepostproduction or pass --model DIR)"
        )
    return SHIPPED_MODEL_DIR
