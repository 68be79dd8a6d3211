"""LoRA files on a pipeline's FLUX transformer, as diffusers' `FluxPipeline` takes them (docs/lora.md).

The work is diffusers' own: `FluxLoraLoaderMixin.lora_state_dict` turns kohya (sd-scripts), XLabs and BFL files into
diffusers / peft keys, and the transformer's `load_lora_adapter`, `set_adapters`, `fuse_lora`, `unfuse_lora`,
`unload_lora` and `delete_adapters` do the peft work. This module is the glue:
- files are checked before peft sees them: safetensors only (a pickle is never opened), keys that name modules of
  this transformer with shapes that fit, each refusal one line naming the file;
- the transformer is the pipeline's (`ConditionedFlux.transformer`, `FillFlux.transformer`, or a plain one), and the
  model's own adapters (a fill dir's `fill/lora.safetensors`, a training run's peft "default") stay active at
  weight 1 and are never removed: these calls act on the LoRA files loaded through them only;
- Assemble-Attn's cached fused output projection (`assemble.project_out`) is dropped after every change, because
  peft merges weights through `.data`, which leaves the version counter that cache is keyed on unchanged.

Text-encoder parts of a file (kohya `lora_te*`, diffusers `text_encoder.*`) are refused: the pipelines' text
encoders are shared frozen wrappers (`encoders.TextEncoder`) and FLUX LoRAs act through the transformer.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moviepostproduction.errors import Problem, ValidationError, WeightsError, one_line, shown

# diffusers / peft keys of a transformer LoRA after conversion: transformer.<module>.lora_A.weight, ...
PEFT_KEY = re.compile(r"^transformer\.(?P<module>.+)\.lora_(?P<part>[AB])\.(?P<kind>weight|bias)$")
BARE_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_[AB]\.(?:weight|bias)$")  # peft's own state dict: no prefix
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te", "text_encoders.")
CONTROL_NORM_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")  # BFL control LoRAs (diffusers' list)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY in a safetensors header
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # peft keeps adapters in ModuleDicts: no dots
FORMATS = (
    "diffusers/peft 'transformer.<module>.lora_A.weight', kohya 'lora_unet_<block>.lora_down.weight', "
    "XLabs '<block>.processor.*' or BFL"
)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read and converted to diffusers keys: `state` (transformer.* peft keys), `alphas` (network
    alphas of formats that keep them apart), `metadata` (diffusers' LoraConfig record), `source` (for messages)."""

    state: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor] | None
    metadata: dict | None
    source: str


def read_lora(source: str | Path | Mapping[str, torch.Tensor]) -> LoraFile:
    """A LoRA .safetensors file (or an in-memory state dict) in any format diffusers converts for FLUX."""
    from moviepostproduction.files import PICKLE_SUFFIXES, load_safetensors, read_metadata

    if isinstance(source, Mapping):
        raw, metadata, name = dict(source), None, "the LoRA state dict"
        if not all(isinstance(v, torch.Tensor) for v in raw.values()):
            raise WeightsError(f"{name}: every value must be a tensor")
    else:
        path, name = Path(source).expanduser(), str(source)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise WeightsError(f"{path}: refusing a pickle checkpoint ({path.suffix}); a LoRA must be .safetensors")
        if path.suffix.lower() != ".safetensors":
            raise WeightsError(f"{path}: not a .safetensors file; a LoRA must be one")
        raw = load_safetensors(path, "a LoRA .safetensors file")
        metadata = _diffusers_metadata(path, read_metadata(path))
    if not raw:
        raise WeightsError(f"{name}: holds no tensors (expected a FLUX LoRA: {FORMATS})")
    text_keys = [k for k in raw if k.startswith(TEXT_ENCODER_PREFIXES)]
    if text_keys:
        raise WeightsError(
            f"{name}: has {len(text_keys)} text-encoder LoRA tensors (e.g. {shown(text_keys[0])}); only transformer "
            "LoRAs are supported (docs/lora.md)"
        )
    raw = _with_prefix(raw)
    state, alphas = _convert(raw, name)
    control = [k for k in state if any(f".{n}." in k for n in CONTROL_NORM_KEYS)]
    if control:
        raise WeightsError(f"{name}: is a FLUX control LoRA (norm weights such as {shown(control[0])}): not supported")
    odd = [k for k in state if not PEFT_KEY.match(k)]
    if odd or not state:
        example = shown(odd[0] if odd else next(iter(raw)))
        raise WeightsError(f"{name}: not a FLUX LoRA diffusers can read (key {example}; expected {FORMATS})")
    return LoraFile(state, alphas or None, metadata, name)


def _diffusers_metadata(path: Path, header: dict[str, str]) -> dict | None:
    text = header.get(METADATA_KEY)
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise WeightsError(f"{path}: its {METADATA_KEY!r} header is not a JSON object")
    return record


def _with_prefix(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's own state dict of a transformer (`get_peft_model_state_dict`: keys without `transformer.`, as the
    trainer and fill/lora.safetensors write them) gets diffusers' prefix; any other dict is left as it is."""
    if all(BARE_PEFT_KEY.match(k) and not k.startswith("transformer.") for k in raw):
        return {f"transformer.{k}": v for k, v in raw.items()}
    return raw


def _convert(raw: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """diffusers' converters (kohya, XLabs, BFL control, fal) and its alpha split."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from diffusers.utils import convert_unet_state_dict_to_peft

    try:
        state, alphas = FluxLoraLoaderMixin.lora_state_dict(raw, return_alphas=True)
        if state and not any("lora_A" in k for k in state):  # diffusers' older `lora.down` names
            state = convert_unet_state_dict_to_peft(state)
    except (ValueError, KeyError, AssertionError, NotImplementedError, RuntimeError, IndexError) as exc:
        raise WeightsError(f"{name}: not a FLUX LoRA diffusers can convert ({one_line(exc, 300)})") from None
    return state, alphas


def check_fits(transformer: nn.Module, lora: LoraFile) -> None:
    """Every LoRA tensor names a linear layer of `transformer` and fits its shape (one line naming the first that
    does not): peft would otherwise fail halfway with a multi-line report, or load a file meant for other blocks."""
    ranks: dict[str, int] = {}
    for key, value in lora.state.items():
        match = PEFT_KEY.match(key)
        assert match is not None  # read_lora admits nothing else
        try:
            layer = transformer.get_submodule(match["module"])
        except AttributeError:
            layer = None
        layer = getattr(layer, "base_layer", layer)
        if not isinstance(layer, nn.Linear):
            cfg = transformer.config
            raise WeightsError(
                f"{lora.source}: {shown(key)} names no linear layer of this FLUX transformer "
                f"({cfg.num_layers} double, {cfg.num_single_layers} single blocks)"
            )
        part, kind = match["part"], match["kind"]
        if kind == "bias":
            want = (layer.out_features,) if part == "B" else None
        elif part == "A":
            want = (value.shape[0], layer.in_features)
        else:
            want = (layer.out_features, value.shape[-1])
        rank = value.shape[0] if part == "A" else value.shape[-1]
        if want is None or tuple(value.shape) != want or ranks.setdefault(match["module"], rank) != rank:
            raise WeightsError(
                f"{lora.source}: {shown(key)} has shape {tuple(value.shape)}, which does not fit "
                f"{match['module']} ({layer.in_features} -> {layer.out_features})"
            )


ADAPTER_LORA = "mpp_adapter"  # the peft name of an adapter folder's own transformer LoRA (docs/model-directory.md)


def load_adapter_lora(transformer: nn.Module, path: Path) -> None:
    """An adapter folder's transformer LoRA (transformer_lora/pytorch_lora_weights.safetensors, written by training
    stages 1-2) as the model's own peft adapter: always active, beside any LoRA files loaded afterwards."""
    lora = read_lora(path)
    check_fits(transformer, lora)
    inject(transformer, lora, ADAPTER_LORA)


def inject(transformer: nn.Module, lora: LoraFile, name: str) -> None:
    """peft layers for `lora` as adapter `name` (diffusers' `load_lora_adapter`); a refusal is one line."""
    with warnings.catch_warnings():  # peft's note that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config`", category=UserWarning)
        try:
            transformer.load_lora_adapter(
                lora.state,
                network_alphas=None if lora.metadata else lora.alphas,
                adapter_name=name,
                metadata=lora.metadata,
                prefix="transformer",
            )
        except (ValueError, RuntimeError, KeyError) as exc:
            raise WeightsError(f"{lora.source}: peft could not load it ({one_line(exc, 300)})") from None


def _finite_weight(field: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValidationError([Problem(field, value, "must be a finite number")])
    return float(value)


class FluxLoraMixin:
    """`load_lora_weights`, `set_adapters`, `get_active_adapters`, `fuse_lora`, `unfuse_lora`, `delete_adapters`,
    `unload_lora_weights` of diffusers' FluxPipeline, acting on `self.model`'s FLUX transformer."""

    model: nn.Module

    @property
    def lora_transformer(self) -> nn.Module:
        """The FluxTransformer2DModel the LoRAs go into (ConditionedFlux / FillFlux hold it as `.transformer`)."""
        return getattr(self.model, "transformer", self.model)

    def _lora_files(self) -> dict[str, str]:
        """adapter name -> file, of the LoRAs loaded through this mixin (kept on the transformer, so pipelines that
        share it agree)."""
        transformer = self.lora_transformer
        if not hasattr(transformer, "_mpp_lora_files"):
            transformer._mpp_lora_files = {}
        return transformer._mpp_lora_files

    def _own_adapters(self) -> list[str]:
        """The model's own peft adapters (fill/lora.safetensors, training's "default"): not loaded through here."""
        files = self._lora_files()
        return [name for name in getattr(self.lora_transformer, "peft_config", {}) if name not in files]

    def load_lora_weights(
        self, pretrained_model_name_or_path_or_dict: str | Path | Mapping[str, torch.Tensor], adapter_name=None
    ) -> str:
        """Load a LoRA file as adapter `adapter_name` (default: the first free `lora_<i>`); returns the name.

        As in diffusers, the adapter just loaded becomes the only active LoRA file at weight 1 (`set_adapters` to
        combine several); the model's own adapters stay active."""
        files = self._lora_files()
        taken = set(getattr(self.lora_transformer, "peft_config", {}))
        if adapter_name is None:
            adapter_name = next(f"lora_{i}" for i in range(len(taken) + 1) if f"lora_{i}" not in taken)
        if not isinstance(adapter_name, str) or not ADAPTER_NAME.match(adapter_name):
            raise ValidationError([Problem("adapter_name", adapter_name, "must be 1-64 letters, digits, _ or -")])
        if adapter_name in taken:
            whose = "a loaded LoRA" if adapter_name in files else "this model's own adapter"
            raise ValidationError([Problem("adapter_name", adapter_name, f"is already {whose}; pick another name")])
        lora = read_lora(pretrained_model_name_or_path_or_dict)
        transformer = self.lora_transformer
        check_fits(transformer, lora)
        inject(transformer, lora, adapter_name)
        files[adapter_name] = lora.source
        own = self._own_adapters()
        if own:  # peft activated the new adapter alone
            transformer.set_adapters([*own, adapter_name], [1.0] * (len(own) + 1))
        self._forget_fused_projections()
        return adapter_name

    def load_loras(self, loras: Sequence[tuple[str | Path, float]]) -> list[str]:
        """Load (file, weight) pairs (`mpp --lora FILE:SCALE`, MPP Load Model) and make them the active LoRAs."""
        names = [self.load_lora_weights(path) for path, _ in loras]
        if names:
            self.set_adapters(names, [weight for _, weight in loras])
        return names

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights=None) -> None:
        """Make these loaded LoRAs the active ones with these weights (a number, one per name, or None = 1): the
        model's output moves by the weighted sum of their updates, as in diffusers."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, numbers.Real):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        weights = [_finite_weight("adapter_weights", w) for w in adapter_weights]
        if not names or len(weights) != len(names):
            raise ValidationError([Problem("adapter_weights", weights, f"need one weight per adapter name {names}")])
        self._check_loaded(names)
        own = self._own_adapters()
        self.lora_transformer.set_adapters([*own, *names], [1.0] * len(own) + weights)
        self._forget_fused_projections()

    def get_active_adapters(self) -> list[str]:
        """The active LoRAs loaded through this mixin (the model's own adapters are not listed)."""
        files = self._lora_files()
        if not files:
            return []
        active = self.lora_transformer.active_adapters()
        return [name for name in ([active] if isinstance(active, str) else active) if name in files]

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None) -> None:
        """Merge the active (or named) LoRAs into the weights, times `lora_scale` (diffusers' `fuse_lora`)."""
        scale = _finite_weight("lora_scale", lora_scale)
        own = self._own_adapters()
        if own:
            raise ValidationError(
                [Problem("fuse_lora", own, "this model has its own LoRA adapter; fusing is for a model without one")]
            )
        names = self.get_active_adapters() if adapter_names is None else list(adapter_names)
        self._check_loaded(names)
        self.lora_transformer.fuse_lora(lora_scale=scale, safe_fusing=safe_fusing, adapter_names=names)
        self._forget_fused_projections()

    def unfuse_lora(self) -> None:
        """Take merged LoRAs out of the weights again (diffusers' `unfuse_lora`)."""
        if self._lora_files():
            self.lora_transformer.unfuse_lora()
        self._forget_fused_projections()

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        """Remove these loaded LoRAs (their layers and peft configs)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_loaded(names)
        self.lora_transformer.delete_adapters(names)
        for name in names:
            del self._lora_files()[name]
        self._forget_fused_projections()

    def unload_lora_weights(self) -> None:
        """Remove every LoRA loaded through this mixin. Without adapters of its own, the transformer gets its plain
        linear layers back (diffusers' `unload_lora`; a fused LoRA then stays merged, as in diffusers)."""
        files, transformer = self._lora_files(), self.lora_transformer
        if not files:
            return
        own = self._own_adapters()
        if own:
            transformer.delete_adapters(list(files))
            transformer.set_adapters(own, [1.0] * len(own))
        else:
            transformer.unload_lora()
        files.clear()
        self._forget_fused_projections()

    def _check_loaded(self, names: Sequence[str]) -> None:
        files = self._lora_files()
        missing = [n for n in names if n not in files]
        if missing:
            loaded = ", ".join(files) or "none"
            raise ValidationError([Problem("adapter_names", missing, f"not a loaded LoRA (loaded: {loaded})")])

    def _forget_fused_projections(self) -> None:
        for module in self.model.modules():
            if "_fused_out" in module.__dict__:
                del module._fused_out
