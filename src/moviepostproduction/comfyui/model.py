"""MPP_MODEL: the loaded pipelines of one model dir, and the node that loads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moviepostproduction.comfyui.host import default_device
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.types import CATEGORY, MODEL
from moviepostproduction.errors import Problem, ValidationError, WeightsError
from moviepostproduction.resources import ModelDims, Request

if TYPE_CHECKING:
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.vary.nanodit import NanoDiT

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class MppModel:
    """What flows along an MPP_MODEL link: one ComposePipeline (its transformer, encoders and VAE also serve
    panorama and vary) and, when a checkpoint was given, the NanoDiT of `vary`."""

    root: Path
    compose: ComposePipeline
    device: str
    vary: NanoDiT | None = None
    vary_path: Path | None = None

    @property
    def label(self) -> str:
        return self.compose.label

    def request(self, what: str, height: int, width: int, refs: int = 0, batch: int = 1) -> Request:
        return Request(what, height, width, refs=refs, batch=batch, device=self.device)

    def dims(self) -> ModelDims:
        pipe = self.compose
        resident = [pipe.model, pipe.text_encoder, pipe.image_encoder, pipe.vae, *([self.vary] if self.vary else [])]
        return ModelDims.of_modules(pipe.model.transformer, pipe.vae.model.config, *resident)


def resolve_device(device: str) -> str:
    if device == "auto":
        return default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError([Problem("device", device, "CUDA is not available on this machine")])
    return device


def load_model(model_dir: str, device: str = "auto", dtype: str = "auto", vary_checkpoint: str = "") -> MppModel:
    """Load a model dir (empty: the embedded default) and optionally a NanoDiT checkpoint for `vary`."""
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.model_dir import default_model_dir

    device = resolve_device(device)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValidationError([Problem("dtype", dtype, f"must be auto or one of {', '.join(DTYPES)}")])
    torch_dtype = DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    root = Path(model_dir.strip()).expanduser() if model_dir.strip() else default_model_dir()
    compose = ComposePipeline.from_model_dir(root, dtype=torch_dtype, device=device)
    model = MppModel(root=root, compose=compose, device=device)
    if vary_checkpoint.strip():
        model.vary_path = Path(vary_checkpoint.strip()).expanduser()
        model.vary = load_vary(model.vary_path, compose, device, torch_dtype)
    return model


def load_vary(path: Path, compose: ComposePipeline, device: str, dtype: torch.dtype) -> NanoDiT:
    """A NanoDiT checkpoint whose encoder widths match the model dir's T5, DINO and VAE (else a WeightsError)."""
    from moviepostproduction.vary.nanodit_io import load_nanodit

    nanodit, _ = load_nanodit(path, device=device, dtype=dtype)
    cfg, images = nanodit.config, compose.image_encoder
    expected = {
        "text_dim": int(compose.text_encoder.t5.config.d_model),
        "dino_dim": images.dino_dim,
        "dino_patches": images.dino_patches,
        "in_channels": compose.vae.latent_channels,
    }
    wrong = [f"{k} {getattr(cfg, k)} (model dir: {v})" for k, v in expected.items() if getattr(cfg, k) != v]
    if wrong:
        raise WeightsError(
            f"{path}: NanoDiT does not fit the encoders of {compose.label or 'the model dir'}: " + ", ".join(wrong)
        )
    return nanodit


class MppLoadModel:
    """Load a moviepostproduction model dir (FLUX.1-dev layout + adapter/) once; every sampler node reuses it."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "model_dir": ("STRING", {"default": "", "tooltip": "Model folder; empty = the embedded default."}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
                "dtype": (["auto", *DTYPES], {"default": "auto", "tooltip": "auto: bf16 on CUDA, fp32 on CPU."}),
            },
            "optional": {
                "vary_checkpoint": ("STRING", {"default": "", "tooltip": "NanoDiT .safetensors for MPP Vary."}),
            },
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @checked
    def load(self, model_dir: str, device: str, dtype: str, vary_checkpoint: str = "") -> tuple[MppModel]:
        return (load_model(model_dir, device, dtype, vary_checkpoint),)


def check_model(model: object) -> MppModel:
    if not isinstance(model, MppModel):
        raise ValidationError([Problem("model", type(model).__name__, f"must be an {MODEL} from MPP Load Model")])
    return model
