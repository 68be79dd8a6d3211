"""MPP Compose: a scene -> IMAGE, its layout overlay (boxes, depth, predicted alpha) and the alphas as text."""

from __future__ import annotations

import torch

from moviepostproduction.comfyui.host import step_callback
from moviepostproduction.comfyui.images import from_channels_first, from_pil, to_pil
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.model import MppModel, check_model
from moviepostproduction.comfyui.model_defaults import MODEL_DEFAULT, SAMPLING_DEFAULTS, or_model_default
from moviepostproduction.comfyui.scene_nodes import check_scene
from moviepostproduction.comfyui.types import CATEGORY, GUIDANCE, MODEL, SCENE, SEED, STEPS
from moviepostproduction.resources import run_guarded
from moviepostproduction.scene import Scene
from moviepostproduction.visualize import draw_layout


def alpha_lines(scene: Scene, alphas: list[float]) -> str:
    """`ref 0 fg alpha 0.500 -> modulation`, one line per ref, as `mpp compose` prints them."""
    return "\n".join(
        f"ref {i} {ref.depth} alpha {a:.3f} -> {'modulation' if a >= 0.5 else 'layout'}"
        for i, (ref, a) in enumerate(zip(scene.refs, alphas, strict=True))
    )


class MppCompose:
    """Sample one image of a scene with the compose pipeline (FLUX + placed references)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "model": (MODEL,),
                "scene": (SCENE,),
                "steps": STEPS,
                "seed": SEED,
                "guidance": GUIDANCE,
                "true_cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1}),
            },
            "optional": {
                "negative": ("STRING", {"multiline": True, "default": "", "tooltip": "Used when true_cfg > 1."}),
                **SAMPLING_DEFAULTS,
            },
        }

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("image", "layout", "alphas")
    FUNCTION = "compose"
    CATEGORY = CATEGORY

    @checked
    def compose(
        self,
        model: MppModel,
        scene: Scene,
        steps: int,
        seed: int,
        guidance: float,
        true_cfg: float,
        negative: str = "",
        ref_guidance: float = MODEL_DEFAULT,
        noise_temperature: float = MODEL_DEFAULT,
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        model, scene = check_model(model), check_scene(scene)
        request = model.request("compose", scene.height, scene.width, refs=len(scene.refs))
        out = run_guarded(
            request,
            lambda: model.compose(
                scene,
                num_inference_steps=steps,
                guidance_scale=guidance,
                true_cfg_scale=true_cfg,
                negative_prompt=negative.strip() or None,
                ref_guidance_scale=or_model_default(ref_guidance),
                noise_temperature=or_model_default(noise_temperature),
                seed=seed,
                output_type="pt",
                callback_on_step_end=step_callback(steps),
            ),
            dims=model.dims(),
        )
        image = from_channels_first(out.images)  # (1, H, W, 3)
        alphas = out.alphas[0]
        overlay = draw_layout(to_pil(image)[0], [r.bbox for r in scene.refs], [r.depth for r in scene.refs], alphas)
        return image, from_pil([overlay]), alpha_lines(scene, alphas)
