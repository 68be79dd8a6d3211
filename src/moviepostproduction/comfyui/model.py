"""MPP_MODEL: the loaded pipelines of one model dir, and the node that loads them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moviepostproduction.comfyui.host import default_device
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.loras import NO_LORA, lora_inputs, lora_path
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
    """ComfyUI's device for "auto" (its model management inside ComfyUI); else checked as the CLI checks it."""
    from moviepostproduction.devices import resolve_device as checked_device

    return default_device() if device == "auto" else checked_device(device, "device")


def load_model(
    model_dir: str,
    device: str = "auto",
    dtype: str = "auto",
    vary_checkpoint: str = "",
    adapter: str = "",
    lora: str = NO_LORA,
    lora_strength: float = 1.0,
) -> MppModel:
    """Load a model dir (empty: the embedded default) with its adapter (`adapter`, else MODEL/adapter) and a NanoDiT
    for `vary`: the checkpoint named, else the model dir's nanodit/ when it has one (as `mpp vary` does)."""
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.devices import resolve_dtype
    from moviepostproduction.model_dir import default_model_dir
    from moviepostproduction.vary.nanodit_io import FOLDER

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, "dtype")
    root = Path(model_dir.strip()).expanduser() if model_dir.strip() else default_model_dir()
    compose = ComposePipeline.from_model_dir(root, adapter=adapter.strip() or None, dtype=torch_dtype, device=device)
    if lora != NO_LORA:  # a file of ComfyUI's loras folder, on the transformer every sampler node shares
        compose.load_loras([(lora_path(lora), lora_strength)])
    model = MppModel(root=root, compose=compose, device=device)
    if vary_checkpoint.strip():
        model.vary_path = Path(vary_checkpoint.strip()).expanduser()
    elif (root / FOLDER / "config.json").is_file():
        model.vary_path = root / FOLDER
    if model.vary_path is not None:
        model.vary = load_vary(model.vary_path, compose, device, torch_dtype)
    return model


def load_vary(path: Path, compose: ComposePipeline, device: str, dtype: torch.dtype) -> NanoDiT:
    """A NanoDiT checkpoint (a .safetensors file, or a nanodit/ folder) whose encoder widths match the model dir's
    T5, DINO and VAE (else a WeightsError)."""
    from moviepostproduction.vary.nanodit_io import load_nanodit, load_nanodit_dir

    if path.is_dir():
        nanodit = load_nanodit_dir(path, device=device, dtype=dtype)
    else:
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
    """Load a FLUX.1 folder and a moviepostproduction adapter (or a model dir with adapter/) once; every sampler node
    reuses it."""

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
                "adapter": ("STRING", {"default": "", "tooltip": "Adapter folder; empty = model folder's adapter/."}),
                **lora_inputs(),
            },
        }

    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @checked
    def load(
        self,
        model_dir: str,
        device: str,
        dtype: str,
        vary_checkpoint: str = "",
        adapter: str = "",
        lora: str = NO_LORA,
        lora_strength: float = 1.0,
    ) -> tuple[MppModel]:
        return (load_model(model_dir, device, dtype, vary_checkpoint, adapter, lora, lora_strength),)


def check_model(model: object) -> MppModel:
    if not isinstance(model, MppModel):
        raise ValidationError([Problem("model", type(model).__name__, f"must be an {MODEL} from MPP Load Model")])
    return model
