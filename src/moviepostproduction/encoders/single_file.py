"""FLUX components from single files, as Black Forest Labs and ComfyUI ship them (issue 41, item 4; docs/memory.md).

- transformer: `flux1-dev.safetensors` (BFL keys: double_blocks.*, single_blocks.*; also the ComfyUI
  `model.diffusion_model.` prefix) or a GGUF file (city96's quantized FLUX files), through diffusers'
  `FluxTransformer2DModel.from_single_file`, which converts the keys and keeps GGUF weights quantized;
- VAE: `ae.safetensors` (LDM keys) through `AutoencoderKL.from_single_file`;
- T5 / CLIP-L: `t5xxl_fp16.safetensors`, `clip_l.safetensors` (transformers keys) into `T5EncoderModel` /
  `CLIPTextModel` built on the meta device, every weight assigned from the file (none random).

Configs come from a FLUX model folder (`config=`: its transformer/, vae/, text_encoder/, text_encoder_2/) or, by
default, from the package (assets/configs/<variant>/: FLUX.1-dev, schnell, Fill-dev, the hub's own files); the
variant is read from the transformer file's tensor names and shapes. Nothing downloads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moviepostproduction.encoders.checks import first_line, quiet_progress
from moviepostproduction.errors import WeightsError

__all__ = [
    "CONFIG_ROOT",
    "VARIANTS",
    "config_folder",
    "load_text_encoder_file",
    "load_transformer_file",
    "load_vae_file",
    "transformer_variant",
]

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "assets" / "configs"
VARIANTS = ("flux1-dev", "flux1-schnell", "flux1-fill-dev")
FILL_IN_CHANNELS = 384
BFL_PREFIX = "model.diffusion_model."  # ComfyUI's checkpoints nest the BFL keys under it
# Keys of text-encoder files that the bare encoders do not hold: CLIP's projection / logit scale, T5's decoder.
TEXT_EXTRAS = ("text_projection.", "logit_scale", "position_ids", "decoder.", "lm_head.")


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors or GGUF file, from its header only."""
    try:
        if path.suffix == ".gguf":
            from gguf import GGUFReader

            # GGUF lists dimensions fastest-first; torch order is the reverse
            return {t.name: tuple(int(s) for s in reversed(t.shape.tolist())) for t in GGUFReader(path).tensors}
        with open(path, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except Exception as exc:  # OSError, a bad header, gguf's own errors
        raise WeightsError(f"{path}: cannot read its tensor list: {first_line(exc)}") from exc


def transformer_variant(path: str | Path) -> str:
    """ "flux1-fill-dev" (384 input channels), "flux1-dev" (a guidance embedder) or "flux1-schnell" (neither), from
    a transformer file's BFL or diffusers tensor names."""
    shapes = {k.removeprefix(BFL_PREFIX): v for k, v in _tensor_shapes(Path(path)).items()}
    x_in = shapes.get("img_in.weight") or shapes.get("x_embedder.weight")
    if x_in is None:
        raise WeightsError(f"{path}: not a FLUX transformer (no img_in.weight / x_embedder.weight tensor)")
    if x_in[-1] == FILL_IN_CHANNELS:
        return "flux1-fill-dev"
    guided = any(k.startswith(("guidance_in.", "time_text_embed.guidance_embedder.")) for k in shapes)
    return "flux1-dev" if guided else "flux1-schnell"


def config_folder(config: str | Path | None, variant: str) -> Path:
    """The folder whose <component>/config.json describes the files: `config` (a FLUX model folder) or the
    package's configs of `variant`."""
    if config is not None:
        return Path(config)
    if variant not in VARIANTS:
        raise WeightsError(f"variant {variant!r}: no shipped config (known: {', '.join(VARIANTS)})")
    return CONFIG_ROOT / variant


def _file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such {what} file")
    return path


def _no_meta(model: nn.Module, path: Path, what: str) -> nn.Module:
    """Fail when a weight was not in the file (it would stay on the meta device, or worse, random)."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise WeightsError(f"{path} lacks {len(missing)} tensors of {what} ({', '.join(missing[:3])}{more})")
    return model.eval().requires_grad_(False)


def load_transformer_file(
    path: str | Path,
    *,
    config: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    quantization_config: Any = None,
) -> nn.Module:
    """A FluxTransformer2DModel from one BFL / ComfyUI / diffusers-key safetensors or GGUF file. A GGUF file keeps
    its quantized weights (diffusers' GGUFQuantizationConfig, dequantized per layer to `dtype` as it runs);
    `quantization_config` quantizes a safetensors file on load (encoders/quantize.py)."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    path = _file(path, "transformer")
    folder = config_folder(config, transformer_variant(path) if config is None else "")
    if path.suffix == ".gguf" and quantization_config is None:
        quantization_config = GGUFQuantizationConfig(compute_dtype=dtype)
    try:
        with quiet_progress():
            model = FluxTransformer2DModel.from_single_file(
                str(path),
                config=str(folder),
                subfolder="transformer",
                torch_dtype=dtype,
                quantization_config=quantization_config,
                local_files_only=True,
            )
    except Exception as exc:  # diffusers raises KeyError / RuntimeError / ValueError alike for a foreign file
        raise WeightsError(f"cannot load {path} as FluxTransformer2DModel: {first_line(exc)}") from exc
    return _no_meta(model, path, "FluxTransformer2DModel")


def load_vae_file(path: str | Path, *, config: str | Path | None = None, dtype: torch.dtype = torch.bfloat16):
    """FLUX's AutoencoderKL from `ae.safetensors` (LDM keys) or a diffusers-key file."""
    from diffusers import AutoencoderKL

    path = _file(path, "VAE")
    folder = config_folder(config, "flux1-dev")  # one VAE for dev, schnell and Fill-dev
    try:
        with quiet_progress():
            model = AutoencoderKL.from_single_file(
                str(path), config=str(folder), subfolder="vae", torch_dtype=dtype, local_files_only=True
            )
    except Exception as exc:
        raise WeightsError(f"cannot load {path} as AutoencoderKL: {first_line(exc)}") from exc
    return _no_meta(model, path, "AutoencoderKL")


def load_text_encoder_file(
    path: str | Path, kind: str, *, config: str | Path | None = None, dtype: torch.dtype = torch.bfloat16
) -> nn.Module:
    """kind "t5": T5EncoderModel from `t5xxl_*.safetensors`; "clip": CLIPTextModel from `clip_l.safetensors`.
    Every weight of the encoder comes from the file (a missing or foreign one is one line); decoder, projection
    and logit-scale tensors in the file are ignored."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPTextModel, T5EncoderModel

    kinds = {"t5": (T5EncoderModel, "text_encoder_2"), "clip": (CLIPTextModel, "text_encoder")}
    if kind not in kinds:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(kinds)}")
    cls, subfolder = kinds[kind]
    path = _file(path, f"{kind} text encoder")
    folder = config_folder(config, "flux1-dev") / subfolder
    try:
        state = load_file(path)
        cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot load {path} as {cls.__name__}: {first_line(exc)}") from exc
    anchor = "text_model." if kind == "clip" else ("encoder.", "shared.")
    state = {_from_anchor(k, anchor): v for k, v in state.items()}
    with init_empty_weights():
        model = cls(cfg)
    expected = set(model.state_dict())
    # transformers 5's CLIPTextModel holds its layers without the `text_model.` level that clip_l files keep
    flat = {k: k if k in expected else k.removeprefix("text_model.") for k in state}
    foreign = sorted(k for k in state if flat[k] not in expected and not any(x in k for x in TEXT_EXTRAS))
    if foreign:
        raise WeightsError(f"{path}: {len(foreign)} tensors {cls.__name__} does not have ({', '.join(foreign[:3])})")
    state = {flat[k]: v for k, v in state.items()}
    model.load_state_dict({k: v.to(dtype) for k, v in state.items() if k in expected}, strict=False, assign=True)
    if kind == "t5" and model.shared.weight.is_meta is False:
        model.encoder.embed_tokens = model.shared  # T5 files keep the token embedding once, as `shared`
    return _no_meta(model, path, cls.__name__)


def _from_anchor(key: str, anchor: str | tuple[str, ...]) -> str:
    """`key` from its first anchor on ("clip_l.transformer.text_model.x" -> "text_model.x"): files nest the
    encoder under their own prefixes."""
    for a in (anchor,) if isinstance(anchor, str) else anchor:
        at = key.find(a)
        if at == 0 or (at > 0 and key[at - 1] == "."):
            return key[at:]
    return key
