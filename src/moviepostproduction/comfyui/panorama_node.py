"""MPP Panorama: a caption (or a panorama scene with placed refs) -> a seamless 2:1 equirectangular IMAGE."""

from __future__ import annotations

import torch

from moviepostproduction.comfyui.host import step_callback
from moviepostproduction.comfyui.images import from_channels_first
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.model import MppModel, check_model
from moviepostproduction.comfyui.model_defaults import MODEL_DEFAULT, SAMPLING_DEFAULTS, or_model_default
from moviepostproduction.comfyui.scene_nodes import check_scene
from moviepostproduction.comfyui.types import CATEGORY, GUIDANCE, MODEL, SCENE, SEED, STEPS, side
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.panorama.seams import seam_ratio
from moviepostproduction.panorama.wrap import PAD_IDS, ROLL_MODES, PanoramaConfig, panorama_grid
from moviepostproduction.resources import run_guarded
from moviepostproduction.scene import Scene


class MppPanorama:
    """Generate a 360-degree panorama (width = 2 x height); also returns its seam ratio (1.0 = seamless)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "model": (MODEL,),
                "caption": ("STRING", {"multiline": True, "default": ""}),
                "height": side(512),
                "steps": STEPS,
                "seed": SEED,
                "guidance": GUIDANCE,
                "pad": ("INT", {"default": 1, "min": 0, "max": 64, "tooltip": "Wrapped token columns per side."}),
                "pad_ids": (list(PAD_IDS), {"default": "opposite"}),
                "periodic_rope": ("BOOLEAN", {"default": False}),
                "roll": (list(ROLL_MODES), {"default": "off"}),
                "circular_vae": ("BOOLEAN", {"default": True}),
            },
            "optional": {
                "scene": (SCENE, {"tooltip": "A panorama scene with refs; replaces caption and height."}),
                **SAMPLING_DEFAULTS,
            },
        }

    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("panorama", "seam_ratio")
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @checked
    def generate(
        self,
        model: MppModel,
        caption: str,
        height: int,
        steps: int,
        seed: int,
        guidance: float,
        pad: int,
        pad_ids: str,
        periodic_rope: bool,
        roll: str,
        circular_vae: bool,
        scene: Scene | None = None,
        ref_guidance: float = MODEL_DEFAULT,
        noise_temperature: float = MODEL_DEFAULT,
    ) -> tuple[torch.Tensor, float]:
        from moviepostproduction.panorama.pipeline import (  # lazy: diffusers loads on first use
            PanoramaPipeline,
            compose_panorama,
        )

        model = check_model(model)
        config = PanoramaConfig(
            pad=pad, pad_ids=pad_ids, periodic_rope=periodic_rope, circular_vae=circular_vae, roll=roll
        )
        sampling = dict(
            num_inference_steps=steps,
            guidance_scale=guidance,
            ref_guidance_scale=or_model_default(ref_guidance),
            noise_temperature=or_model_default(noise_temperature),
            callback_on_step_end=step_callback(steps),
        )
        pipe = model.compose
        if scene is not None:
            scene = check_scene(scene)
            request = model.request("panorama", scene.height, scene.width, refs=len(scene.refs))
            out = run_guarded(
                request,
                lambda: compose_panorama(pipe, scene, config=config, seed=seed, **sampling),
                dims=model.dims(),
            )
        else:
            if not caption.strip():
                raise ValidationError([Problem("caption", caption, "give a caption or connect a panorama scene")])
            panorama_grid(height)  # a bad height fails before the text encoder runs
            text = pipe.text_encoder.encode([caption.strip()], pipe.defaults.max_text_tokens)
            pano = PanoramaPipeline(pipe.model, pipe.vae, config=config, label=pipe.label, defaults=pipe.defaults)
            out = run_guarded(
                model.request("panorama", height, 2 * height),
                lambda: pano(
                    prompt_embeds=text.t5, pooled_prompt_embeds=text.pooled, height=height, seed=seed, **sampling
                ),
                inputs={"prompt_embeds": text.t5, "pooled_prompt_embeds": text.pooled},
                dims=model.dims(),
            )
        image = from_channels_first(out.images)  # (1, H, 2H, 3)
        pixels = (image[0] * 255).round().to(torch.uint8).numpy()  # (H, W, 3), as the saved PNG
        return image, seam_ratio(pixels)
