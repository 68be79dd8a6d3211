"""Frozen text / image encoders, VAE and FLUX transformer, loaded from a local model directory.

Text encoding follows diffusers' FluxPipeline exactly (CLIP pooled output + T5 hidden states, both
tokenised to a fixed length and run without an attention mask), so embeddings are interchangeable.
Nothing here downloads, and nothing falls back to random weights: see `model_dir.ModelDir`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn

from moviepostproduction.encoders.checks import load_error, quiet_progress
from moviepostproduction.encoders.offload import execution_device
from moviepostproduction.encoders.preprocess import ImagePreprocess
from moviepostproduction.errors import Problem, ValidationError, WeightsError
from moviepostproduction.model_dir import COMPONENTS, IMAGE_COMPONENTS, TEXT_COMPONENTS, ModelDir, as_model_dir

logger = logging.getLogger(__name__)

__all__ = [
    "ImageEmbeddings",
    "ImageEncoder",
    "ModelDir",
    "TextEmbeddings",
    "TextEncoder",
    "Vae",
    "find_caption_spans",
    "load_transformer",
]

Span = tuple[int, int]  # half-open [start, stop) token indices in the T5 sequence
M = TypeVar("M", bound=nn.Module)


def freeze(module: M) -> M:
    """Frozen encoders: no parameter gradients, eval mode (dropout off)."""
    module.requires_grad_(False)
    return module.eval()


def load_frozen(
    cls: type[M], model_dir: ModelDir, component: str, dtype: torch.dtype, quantization_config: Any = None
) -> M:
    """`cls.from_pretrained` on one checked component: safetensors only, local only, no missing tensors; the
    libraries' own warnings are silenced, so a failure is our one line. `quantization_config`: the library's own
    (encoders/quantize.py builds one)."""
    model_dir.check([component])
    folder = model_dir.path(component)
    quantized = {} if quantization_config is None else {"quantization_config": quantization_config}
    try:
        with quiet_progress():
            model, info = cls.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, dtype=dtype, output_loading_info=True, **quantized
            )
    except Exception as exc:  # the libraries raise OSError/ValueError/RuntimeError/SafetensorError alike
        raise load_error(model_dir.root, folder, cls.__name__, exc) from exc
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


def load_tokenizer(model_dir: ModelDir, component: str) -> Any:
    """The tokenizer saved in one checked component folder; anything the library refuses is one line naming it."""
    from transformers import AutoTokenizer

    folder = model_dir.path(component)
    try:
        with quiet_progress():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a vocabulary the library cannot read
        raise load_error(model_dir.root, folder, f"the {COMPONENTS[component].label}", exc) from exc


class _Frozen(nn.Module):
    """Base of the encoder wrappers: stays in eval mode even when a parent module calls .train()."""

    def train(self, mode: bool = True) -> _Frozen:
        del mode  # frozen encoders never train
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the offload hooks' execution device (encoders/offload.py), else the weights' device."""
        return execution_device(self)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


@dataclass
class TextEmbeddings:
    t5: torch.Tensor  # (B, T, d_t5): FLUX's encoder_hidden_states
    pooled: torch.Tensor  # (B, d_clip): FLUX's pooled_projections (CLIP pooler output)
    t5_mask: torch.Tensor  # (B, T) bool, True on real tokens (FLUX itself attends to padding too)


@dataclass
class ImageEmbeddings:
    clip: torch.Tensor  # (R, C) CLIP image_embeds (projected CLS)
    dino_cls: torch.Tensor  # (R, G) DINOv2 layer-normed CLS
    dino_patches: torch.Tensor  # (R, P, G) DINOv2 patch tokens


def find_caption_spans(
    tokenizer: Any, caption: str, ref_captions: Sequence[str | None], max_tokens: int
) -> tuple[str, list[Span | None]]:
    """The prompt to encode and, per ref, the T5 token range of its caption inside it.

    A ref caption found in the global caption (case-insensitive, whole words, first occurrence not
    taken by an earlier ref) is located there; otherwise it is appended as ", <caption>". A ref
    without a caption gets None. A caption pushed entirely past `max_tokens` is a ValidationError.
    """
    prompt, chars, taken = caption, [], set()
    for text in ref_captions:
        if not text or not text.strip():
            chars.append(None)
            continue
        pattern = re.compile(r"(?<!\w)" + re.escape(text.strip()) + r"(?!\w)", re.IGNORECASE)
        found = next((m.span() for m in pattern.finditer(prompt) if m.span() not in taken), None)
        if found is None:
            prompt = f"{prompt}, {text.strip()}" if prompt else text.strip()
            found = (len(prompt) - len(text.strip()), len(prompt))
        taken.add(found)
        chars.append(found)
    enc = tokenizer(prompt, max_length=max_tokens, truncation=True, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]  # (T, 2) char ranges; specials are (0, 0)
    spans: list[Span | None] = []
    for i, char_span in enumerate(chars):
        if char_span is None:
            spans.append(None)
            continue
        hits = [t for t, (a, b) in enumerate(offsets) if b > a and a < char_span[1] and b > char_span[0]]
        if not hits:
            raise ValidationError(
                [Problem(f"refs[{i}].caption", ref_captions[i], f"falls past the first {max_tokens} T5 tokens")]
            )
        spans.append((hits[0], hits[-1] + 1))
    return prompt, spans


class TextEncoder(_Frozen):
    """Frozen CLIP-L text model (pooled) + T5 encoder (sequence), with their tokenizers."""

    def __init__(self, clip: nn.Module, clip_tokenizer: Any, t5: nn.Module, t5_tokenizer: Any):
        super().__init__()
        self.clip, self.t5 = freeze(clip), freeze(t5)
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        limit = clip.config.max_position_embeddings  # an unset tokenizer limit is a huge sentinel
        self.clip_max_tokens = min(clip_tokenizer.model_max_length, limit)

    @classmethod
    def load(
        cls,
        model_dir: ModelDir | str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | None = None,
        t5_quantization_config: Any = None,
    ) -> TextEncoder:
        """`t5_quantization_config`: a transformers quantization config for T5 (`quantize.quantization_config(spec,
        target="t5")`); CLIP-L (0.25 GB in bf16) is never quantized."""
        from transformers import CLIPTextModel, T5EncoderModel

        md = as_model_dir(model_dir)
        md.check(TEXT_COMPONENTS)
        tok, tok2 = load_tokenizer(md, "tokenizer"), load_tokenizer(md, "tokenizer_2")
        clip = load_frozen(CLIPTextModel, md, "text_encoder", dtype)
        t5 = load_frozen(T5EncoderModel, md, "text_encoder_2", dtype, t5_quantization_config)
        return cls(clip, tok, t5, tok2).to(device)

    def _ids(self, tokenizer: Any, prompts: list[str], max_tokens: int, name: str) -> dict[str, torch.Tensor]:
        enc = tokenizer(prompts, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
        longer = tokenizer(prompts, max_length=max_tokens + 1, truncation=True)["input_ids"]
        if any(len(ids) > max_tokens for ids in longer):
            logger.warning("%s prompt truncated to %d tokens", name, max_tokens)
        return {k: v.to(self.device) for k, v in enc.items()}

    def encode(self, prompts: Sequence[str], max_t5_tokens: int = 512) -> TextEmbeddings:
        if max_t5_tokens < 1:
            raise ValueError(f"max_t5_tokens must be >= 1, got {max_t5_tokens}")
        prompts = list(prompts)
        clip_in = self._ids(self.clip_tokenizer, prompts, self.clip_max_tokens, "CLIP")
        t5_in = self._ids(self.t5_tokenizer, prompts, max_t5_tokens, "T5")
        pooled = self.clip(input_ids=clip_in["input_ids"]).pooler_output  # (B, d_clip)
        t5 = self.t5(input_ids=t5_in["input_ids"]).last_hidden_state  # (B, T, d_t5)
        return TextEmbeddings(t5=t5, pooled=pooled, t5_mask=t5_in["attention_mask"].bool())

    def encode_spans(
        self, caption: str, ref_captions: Sequence[str | None], max_t5_tokens: int = 512
    ) -> tuple[TextEmbeddings, list[Span | None], str]:
        """Embeddings of one prompt (B = 1), each ref caption's T5 token span, and the prompt encoded."""
        prompt, spans = find_caption_spans(self.t5_tokenizer, caption, ref_captions, max_t5_tokens)
        return self.encode([prompt], max_t5_tokens), spans, prompt


class ImageEncoder(_Frozen):
    """Frozen CLIPVisionModelWithProjection + Dinov2Model with their preprocessing."""

    def __init__(self, clip: nn.Module, clip_pre: ImagePreprocess, dino: nn.Module, dino_pre: ImagePreprocess):
        super().__init__()
        self.clip, self.dino = freeze(clip), freeze(dino)
        self.clip_pre, self.dino_pre = clip_pre, dino_pre
        self.clip_dim = clip.config.projection_dim  # C
        self.dino_dim = dino.config.hidden_size  # G
        h, w = dino_pre.output_hw
        self.dino_patches = (h // dino.config.patch_size) * (w // dino.config.patch_size)  # P

    @classmethod
    def load(
        cls, model_dir: ModelDir | str | Path, *, dtype: torch.dtype = torch.float32, device: str | None = None
    ) -> ImageEncoder:
        from transformers import CLIPVisionModelWithProjection, Dinov2Model

        md = as_model_dir(model_dir)
        md.check(IMAGE_COMPONENTS)
        clip_pre = ImagePreprocess.from_file(md.image_clip / "preprocessor_config.json", md.root)
        dino_pre = ImagePreprocess.from_file(md.image_dino / "preprocessor_config.json", md.root)
        clip = load_frozen(CLIPVisionModelWithProjection, md, "image_clip", dtype)
        dino = load_frozen(Dinov2Model, md, "image_dino", dtype)
        return cls(clip, clip_pre, dino, dino_pre).to(device)

    def encode(self, images: Sequence[Image.Image]) -> ImageEmbeddings:
        """Reference images (any size / mode) -> embeddings; R = 0 gives empty tensors."""
        if not images:
            return self._empty()
        return self._run(self.clip_pre(images), self.dino_pre(images))

    def encode_pixels(self, pixels: torch.Tensor) -> ImageEmbeddings:
        """(R, 3, H, W) in [-1, 1] -> embeddings; differentiable w.r.t. pixels (identity loss)."""
        return self._run(self.clip_pre.tensor(pixels), self.dino_pre.tensor(pixels))

    def _run(self, clip_px: torch.Tensor, dino_px: torch.Tensor) -> ImageEmbeddings:
        clip = self.clip(pixel_values=clip_px.to(self.device, self.dtype)).image_embeds  # (R, C)
        out = self.dino(pixel_values=dino_px.to(self.device, self.dtype))
        hidden = out.last_hidden_state  # (R, 1 + P, G), layer-normed
        return ImageEmbeddings(clip=clip, dino_cls=out.pooler_output, dino_patches=hidden[:, 1:])

    def _empty(self) -> ImageEmbeddings:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, device=self.device, dtype=self.dtype)

        return ImageEmbeddings(z(0, self.clip_dim), z(0, self.dino_dim), z(0, self.dino_patches, self.dino_dim))


class Vae(_Frozen):
    """Frozen AutoencoderKL in FLUX's normalised latent space: z = (mean - shift) * scale."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = freeze(model)
        cfg = model.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor or 0.0)  # SD-style VAEs have none
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def enable_tiling(self, enabled: bool = True) -> Vae:
        """Decode (and encode) images larger than the VAE's `sample_size` tile by tile with blended overlaps
        (diffusers' AutoencoderKL tiling): the full-resolution activations, the largest buffers of a big decode,
        shrink to one tile's. Images up to `sample_size` (1024 for FLUX) decode exactly as without tiling."""
        if enabled:
            self.model.enable_tiling()
        else:
            self.model.disable_tiling()
        return self

    @classmethod
    def load(
        cls, model_dir: ModelDir | str | Path, *, dtype: torch.dtype = torch.float32, device: str | None = None
    ) -> Vae:
        from diffusers import AutoencoderKL

        return cls(load_frozen(AutoencoderKL, as_model_dir(model_dir), "vae", dtype)).to(device)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C_lat, H/8, W/8); the posterior mode, or a sample with `generator`."""
        h, w = pixels.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"pixel size {h}x{w} is not a multiple of the VAE factor {self.downsample}")
        dist = self.model.encode(pixels.to(self.device, self.dtype)).latent_dist
        z = dist.mode() if generator is None else dist.sample(generator)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of encode: (B, C_lat, h, w) -> (B, 3, 8h, 8w), roughly [-1, 1] and not clamped."""
        z = latents.to(self.device, self.dtype) / self.scaling_factor + self.shift_factor
        return self.model.decode(z).sample


def load_transformer(
    model_dir: ModelDir | str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    quantization_config: Any = None,
) -> nn.Module:
    """The stock diffusers FluxTransformer2DModel, frozen (LoRA / new modules are added by the caller).
    `quantization_config`: diffusers' (`quantize.quantization_config(spec)`: nf4, int8, fp8); bitsandbytes loads
    its weights straight onto the GPU, so `device` None leaves them where the library put them."""
    from diffusers import FluxTransformer2DModel

    model = load_frozen(FluxTransformer2DModel, as_model_dir(model_dir), "transformer", dtype, quantization_config)
    return model.to(device) if device is not None else model
