"""MPP Vary: variations of reference images steered by a caption (NanoDiT with dual CFG, docs/vary.md)."""

from __future__ import annotations

import dataclasses

import torch

from moviepostproduction.comfyui.host import step_callback
from moviepostproduction.comfyui.images import check_image, from_channels_first, to_pil
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.model import MppModel, check_model
from moviepostproduction.comfyui.types import CATEGORY, MODEL, SEED, STEPS, side
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.resources import run_guarded

VARY_TEXT_TOKENS = 128  # T5 tokens for the caption; padding is masked out in NanoDiT's cross-attention
SCALE = {"min": 0.0, "max": 30.0, "step": 0.1}


class MppVary:
    """One variation per input image: DINO features of the image + the caption -> NanoDiT -> VAE decode."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "model": (MODEL, {"tooltip": "Loaded with a vary_checkpoint."}),
                "image": ("IMAGE", {"tooltip": "Reference images; a batch of B gives B variations."}),
                "caption": ("STRING", {"multiline": True, "default": ""}),
                "text_scale": ("FLOAT", {**SCALE, "default": 4.0}),
                "image_scale": ("FLOAT", {**SCALE, "default": 1.5}),
                "steps": STEPS,
                "seed": SEED,
                "width": side(64, step=8),
                "height": side(64, step=8),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "vary"
    CATEGORY = CATEGORY

    @checked
    def vary(
        self,
        model: MppModel,
        image: torch.Tensor,
        caption: str,
        text_scale: float,
        image_scale: float,
        steps: int,
        seed: int,
        width: int,
        height: int,
    ) -> tuple[torch.Tensor]:
        from moviepostproduction.vary.pipeline import VaryPipeline  # lazy, as every pipeline import of the pack

        model = check_model(model)
        if model.vary is None:
            raise ValidationError(
                [Problem("model", model.root, "has no NanoDiT: set vary_checkpoint in MPP Load Model")]
            )
        images = check_image("image", image)
        pipe, nanodit = model.compose, model.vary
        factor = pipe.vae.downsample * nanodit.config.patch_size
        problems = [
            Problem(name, value, f"must be a multiple of {factor} (VAE factor x NanoDiT patch)")
            for name, value in (("width", width), ("height", height))
            if value % factor
        ]
        if problems:
            raise ValidationError(problems)
        batch = images.shape[0]
        text = pipe.text_encoder.encode([caption.strip()] * batch, max_t5_tokens=VARY_TEXT_TOKENS)
        feats = pipe.image_encoder.encode(to_pil(images))
        dims = dataclasses.replace(model.dims(), hidden=nanodit.config.hidden_size, text_tokens=VARY_TEXT_TOKENS)
        out = run_guarded(
            model.request("vary", height, width, batch=batch),
            lambda: VaryPipeline(nanodit, decode=pipe.vae.decode)(
                text_embeds=text.t5,
                text_mask=text.t5_mask,
                image_cls=feats.dino_cls,
                image_patches=feats.dino_patches,
                text_scale=text_scale,
                image_scale=image_scale,
                num_inference_steps=steps,
                latent_size=(height // pipe.vae.downsample, width // pipe.vae.downsample),
                seed=seed,
                output_type="pt",
                callback_on_step_end=step_callback(steps),
            ),
            inputs={"text_embeds": text.t5, "image_cls": feats.dino_cls, "image_patches": feats.dino_patches},
            dims=dims,
        )
        return (from_channels_first(out.images),)
