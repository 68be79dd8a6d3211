"""MPP Load Fill Model and MPP Fill: repaint the masked part of a plate with FLUX-Fill (docs/fill.md).

A fill model dir has a fill-shaped transformer, so it is its own link type (MPP_FILL_MODEL). ComfyUI's MASK
convention (1 = the region to inpaint) is FillPipeline's (white = repaint); pixels outside the mask come back
bit-identical from the plate (the pipeline's paste-back).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from moviepostproduction.comfyui.host import step_callback
from moviepostproduction.comfyui.images import check_image, check_mask, from_channels_first
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.model import DTYPES, resolve_device
from moviepostproduction.comfyui.model_defaults import MODEL_DEFAULT, SAMPLING_DEFAULTS, or_model_default
from moviepostproduction.comfyui.scene_nodes import check_scene
from moviepostproduction.comfyui.types import CATEGORY, SCENE, SEED, STEPS
from moviepostproduction.devices import resolve_dtype
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.resources import ModelDims, Request, run_guarded
from moviepostproduction.sampling import MAX_SEED
from moviepostproduction.scene import Scene

if TYPE_CHECKING:
    from moviepostproduction.fill.pipeline import FillPipeline

FILL_MODEL = "MPP_FILL_MODEL"


@dataclass
class MppFillModel:
    """What flows along an MPP_FILL_MODEL link: one loaded FillPipeline."""

    root: Path
    pipe: FillPipeline
    device: str

    def dims(self) -> ModelDims:
        pipe = self.pipe
        resident = [pipe.model, pipe.text_encoder, pipe.vae, *([pipe.image_encoder] if pipe.image_encoder else [])]
        return ModelDims.of_modules(pipe.model.transformer, pipe.vae.model.config, *resident)


class MppLoadFillModel:
    """Load a fill model dir (FLUX-Fill transformer + optional fill/ weights); empty = the embedded default."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "model_dir": ("STRING", {"default": "", "tooltip": "Fill model folder; empty = the embedded default."}),
                "device": (["auto", "cpu", "cuda"], {"default": "auto"}),
                "dtype": (["auto", *DTYPES], {"default": "auto", "tooltip": "auto: bf16 on CUDA, fp32 on CPU."}),
                "refs": ("BOOLEAN", {"default": False, "tooltip": "Also load the adapter and image encoders."}),
            },
            "optional": {
                "adapter": ("STRING", {"default": "", "tooltip": "Adapter folder; empty = model folder's adapter/."}),
            },
        }

    RETURN_TYPES = (FILL_MODEL,)
    RETURN_NAMES = ("fill_model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @checked
    def load(self, model_dir: str, device: str, dtype: str, refs: bool, adapter: str = "") -> tuple[MppFillModel]:
        from moviepostproduction.fill.pipeline import FillPipeline
        from moviepostproduction.toyworld.toy_model import default_fill_model_dir

        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device, "dtype")
        root = Path(model_dir.strip()).expanduser() if model_dir.strip() else default_fill_model_dir()
        pipe = FillPipeline.from_model_dir(
            root, refs=refs, adapter=adapter.strip() or None, dtype=torch_dtype, device=device
        )
        return (MppFillModel(root=root, pipe=pipe, device=device),)


class MppFill:
    """Repaint the MASK (1 = repaint) of each plate; optional semantic map and scene refs (their boxes are the
    mask when none is connected). Returns the images and the binarised masks that were used."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "fill_model": (FILL_MODEL,),
                "image": ("IMAGE", {"tooltip": "The plate(s); one fill per batch item."}),
                "prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Leave empty with a scene."}),
                "steps": STEPS,
                "seed": SEED,
                "guidance": ("FLOAT", {"default": 30.0, "min": 0.0, "max": 100.0, "step": 0.5}),
            },
            "optional": {
                "mask": ("MASK",),
                "semantic": ("IMAGE", {"tooltip": "Semantic map of the plate's size (class colours)."}),
                "scene": (SCENE, {"tooltip": "Refs to insert at their boxes; its caption is the prompt."}),
                **SAMPLING_DEFAULTS,
            },
        }

    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    FUNCTION = "fill"
    CATEGORY = CATEGORY

    @checked
    def fill(
        self,
        fill_model: MppFillModel,
        image: torch.Tensor,
        prompt: str,
        steps: int,
        seed: int,
        guidance: float,
        mask: torch.Tensor | None = None,
        semantic: torch.Tensor | None = None,
        scene: Scene | None = None,
        ref_guidance: float = MODEL_DEFAULT,
        noise_temperature: float = MODEL_DEFAULT,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(fill_model, MppFillModel):
            raise ValidationError([Problem("fill_model", type(fill_model).__name__, f"must be an {FILL_MODEL}")])
        plates = check_image("image", image)[..., :3].clamp(0, 1)  # (B, H, W, 3)
        batch, size = plates.shape[0], tuple(plates.shape[1:3])
        masks = check_mask("mask", mask, batch, size) if mask is not None else None  # (B, H, W)
        sem = check_image("semantic", semantic)[..., :3].clamp(0, 1) if semantic is not None else None
        if sem is not None and sem.shape[0] not in (1, batch):
            raise ValidationError([Problem("semantic", sem.shape[0], f"needs 1 or {batch} maps (one per plate)")])
        scene = check_scene(scene) if scene is not None else None
        refs = len(scene.refs) if scene is not None else 0
        request = Request("fill", size[0], size[1], refs=refs, device=fill_model.device)  # one plate per call
        images, used = [], []
        for b in range(batch):
            out = run_guarded(
                request,
                lambda b=b: fill_model.pipe(
                    plates[b].numpy(),
                    masks[b].numpy() if masks is not None else None,
                    semantic=sem[min(b, sem.shape[0] - 1)].numpy() if sem is not None else None,
                    scene=scene,
                    prompt=prompt.strip(),
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    ref_guidance_scale=or_model_default(ref_guidance),
                    noise_temperature=or_model_default(noise_temperature),
                    seed=(seed + b) % MAX_SEED,  # plate b: the next seed, wrapping as a 64-bit seed does
                    output_type="pt",
                    callback_on_step_end=step_callback(steps),
                ),
                dims=fill_model.dims(),
            )
            images.append(from_channels_first(out.images))  # (1, H, W, 3)
            used.append(torch.from_numpy(out.mask).float()[None])  # (1, H, W)
        return torch.cat(images), torch.cat(used)
