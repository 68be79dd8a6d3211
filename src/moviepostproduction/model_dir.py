"""A local model directory in the FLUX.1-dev layout plus image encoders, checked before anything loads.

Every problem is a `WeightsError` whose one-line message names the exact path and what was expected.
Weights are loaded from safetensors only, from local files only; missing tensors are an error, never
silently random-initialised (transformers and diffusers both do that by default, with a warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from moviepostproduction.errors import Problem, WeightsError
from moviepostproduction.sampling import (
    SamplingValueError,
    is_count,
    is_probability,
    positive_problem,
    scale_problem,
)

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


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


ADAPTER_CONFIG = "adapter/config.json"  # the CompositionAdapter's config, which names its layout window
INDEX_SAMPLING_KEYS = ("max_text_tokens", "ref_guidance_scale", "noise_temperature")  # in model_index.json


def _checked(ok: Callable[[object], bool], message: str) -> Callable[[str, object], Problem | None]:
    return lambda name, value: None if ok(value) else Problem(name, value, message)


SAMPLING_CHECKS: dict[str, Callable[[str, object], Problem | None]] = {
    "max_text_tokens": _checked(lambda v: is_count(v) and v >= 1, "must be an integer >= 1"),
    "ref_guidance_scale": scale_problem,
    "noise_temperature": positive_problem,
    "grounding_ratio": _checked(is_probability, "must be a number in [0, 1]"),
}


@dataclass(frozen=True)
class SamplingDefaults:
    """The sampling arguments a model was tuned for; every pipeline uses them for an argument left at None.

    Precedence (docs/sampling.md): an explicit argument > the model dir (`ModelDir.sampling_defaults`) > these
    built-in values, which sample as FLUX does. A bad value raises at construction, naming the field.
    """

    max_text_tokens: int = 512  # T5 length the transformer was trained with (FLUX.1-dev: 512)
    ref_guidance_scale: float = 1.0  # reference guidance v_caption + s (v_scene - v_caption); 1 = off
    noise_temperature: float = 1.0  # factor on the starting noise; 1 = the noise as drawn
    grounding_ratio: float = 0.3  # fraction of the steps with Assemble-Attn (ConditioningConfig's default)

    def __post_init__(self) -> None:
        problems = [p for f in fields(self) if (p := SAMPLING_CHECKS[f.name](f.name, getattr(self, f.name)))]
        if problems:
            raise SamplingValueError(problems)

    @classmethod
    def of_model(cls, model: torch.nn.Module) -> SamplingDefaults:
        """The built-in values with the layout window of `model.adapter`, if it has one: for a pipeline built from
        modules in memory rather than from a model dir."""
        adapter = getattr(model, "adapter", None)
        return cls() if adapter is None else cls(grounding_ratio=adapter.cfg.grounding_ratio)

    def resolve(
        self,
        *,
        max_text_tokens: int | None = None,
        ref_guidance_scale: float | None = None,
        noise_temperature: float | None = None,
    ) -> SamplingDefaults:
        """These defaults with each argument that is not None in its place; a bad one is a `SamplingValueError`
        naming it (`noise_temperature: must be a positive number (got -2.0)`)."""
        given = dict(
            max_text_tokens=max_text_tokens, ref_guidance_scale=ref_guidance_scale, noise_temperature=noise_temperature
        )
        return replace(self, **{name: value for name, value in given.items() if value is not None})


def _a(label: str) -> str:
    return f"{'an' if label[0] in 'AEIOU' else 'a'} {label}"


def read_json(path: Path, what: str, root: Path) -> dict[str, Any]:
    """Parse a JSON object file or raise a one-line WeightsError naming it."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"model dir {root}: missing {path} (expected {what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"model dir {root}: cannot read {path} as JSON ({what}): {exc}") from None
    if not isinstance(data, dict):
        raise WeightsError(f"model dir {root}: {path} is not a JSON object (expected {what})")
    return data


def _check_safetensors(file: Path, root: Path) -> None:
    """Read the header only: catches truncated and corrupt files without touching the tensor data."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass
    except (SafetensorError, OSError) as exc:
        raise WeightsError(f"model dir {root}: {file} is truncated or corrupt ({exc})") from None


@dataclass(frozen=True)
class ModelDir:
    """Paths of a model directory (`--model DIR`); see docs/model-directory.md."""

    root: Path
    transformer: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    text_encoder_2: Path
    tokenizer_2: Path
    image_clip: Path
    image_dino: Path

    @classmethod
    def at(cls, root: str | Path) -> ModelDir:
        base = Path(root).expanduser()
        if not base.is_dir():
            raise WeightsError(f"model dir {base}: not a directory (expected a FLUX-layout model folder)")
        return cls(base, **{name: base / comp.subdir for name, comp in COMPONENTS.items()})

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
        return read_json(path, "a diffusers model_index.json", self.root) if path.exists() else {}

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
        `noise_temperature`, adapter/config.json's `grounding_ratio`; the built-in value for a key it does not name.
        A bad value is a one-line WeightsError naming the file, the key and the value."""
        named = {key: ("model_index.json", self.index[key]) for key in INDEX_SAMPLING_KEYS if key in self.index}
        if (self.root / ADAPTER_CONFIG).is_file():
            adapter = read_json(self.root / ADAPTER_CONFIG, "a CompositionAdapter config", self.root)
            if "grounding_ratio" in adapter:
                named["grounding_ratio"] = (ADAPTER_CONFIG, adapter["grounding_ratio"])
        for key, (file, value) in named.items():
            if problem := SAMPLING_CHECKS[key](key, value):
                raise WeightsError(f"model dir {self.root}: {file} {key} {problem.message} (got {value!r})")
        return SamplingDefaults(**{key: value for key, (_, value) in named.items()})

    def path(self, component: str) -> Path:
        if component not in COMPONENTS:
            raise KeyError(f"unknown component {component!r}; known: {', '.join(COMPONENTS)}")
        return getattr(self, component)

    def check(self, components: Iterable[str] = tuple(COMPONENTS)) -> None:
        """Raise a one-line WeightsError for the first missing or unusable file of the given components."""
        scale = self.index.get("image_position_scale", 1.0)  # a malformed model_index.json fails here too
        if scale != 1.0:  # RoPE positions are FLUX's; interpolated ones were an experiment (experiments/README.md)
            raise WeightsError(
                f"model dir {self.root}: model_index.json image_position_scale {scale!r} is not supported (removed; "
                "only FLUX's positions, 1.0)"
            )
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
        config = read_json(folder / "config.json", f"{_a(comp.label)} config in {layout}", self.root)
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
            )

    def _check_tokenizer(self, folder: Path, comp: Component) -> None:
        if not (folder / "tokenizer_config.json").is_file():
            raise self._missing(folder / "tokenizer_config.json", f"{_a(comp.label)} saved with save_pretrained")
        if not any((folder / f).is_file() for f in TOKENIZER_VOCAB_FILES):
            raise self._missing(
                folder / "tokenizer.json", f"the {comp.label} vocabulary, or one of {list(TOKENIZER_VOCAB_FILES[1:])}"
            )

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
            weight_map = read_json(index_file, "a safetensors shard index", self.root).get("weight_map", {})
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise self._missing(folder / shard, f"a shard listed in {index_file.name}")
        for file in files:
            _check_safetensors(file, self.root)


def as_model_dir(model_dir: ModelDir | str | Path) -> ModelDir:
    return model_dir if isinstance(model_dir, ModelDir) else ModelDir.at(model_dir)


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide the per-file progress bars of transformers/diffusers while loading or saving tiny parts."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    states = (t_logging.is_progress_bar_enabled(), d_logging.is_progress_bar_enabled())
    t_logging.disable_progress_bar()
    d_logging.disable_progress_bar()
    try:
        yield
    finally:
        if states[0]:
            t_logging.enable_progress_bar()
        if states[1]:
            d_logging.enable_progress_bar()


def freeze(module: M) -> M:
    """Frozen encoders: no parameter gradients, eval mode (dropout off)."""
    module.requires_grad_(False)
    return module.eval()


def move_like(module: M, device: torch.device | str, dtype: torch.dtype) -> M:
    """A freshly built model (diffusers' `from_config` gives fp32 on the CPU) moved to another model's device and
    dtype; the dtype is cast only when it differs, since diffusers warns on any dtype cast, even a no-op one."""
    module = module.to(device=device)
    if next(module.parameters()).dtype != dtype:
        module = module.to(dtype=dtype)
    return module


def load_frozen(cls: type[M], model_dir: ModelDir, component: str, dtype: torch.dtype) -> M:
    """`cls.from_pretrained` on one checked component: safetensors only, local only, no missing tensors."""
    model_dir.check([component])
    folder = model_dir.path(component)
    try:
        with quiet_progress():
            model, info = cls.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, dtype=dtype, output_loading_info=True
            )
    except Exception as exc:  # the libraries raise OSError/ValueError/RuntimeError/SafetensorError alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"model dir {model_dir.root}: cannot load {folder} as {cls.__name__}: {first}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(
            f"model dir {model_dir.root}: weights in {folder} lack {len(missing)} tensors of {cls.__name__} "
            f"({', '.join(missing[:3])}{more})"
        )
    if info.get("unexpected_keys"):
        logger.debug("%s: ignored %d unexpected tensors", folder, len(info["unexpected_keys"]))
    return freeze(model)


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
