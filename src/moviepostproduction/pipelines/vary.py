"""VaryPipeline: variations of a reference image steered by a caption, with dual CFG (seed 003, DESIGN 7).

Takes precomputed features (text-encoder states, DINO CLS and patches): the encoders are wired by the caller.
Dual CFG in the InstructPix2Pix form (Brooks et al. 2023, eq. 3):
    v = v_uncond + s_T (v_both - v_img) + s_I (v_img - v_uncond)
with v_uncond = v(no text, no image), v_img = v(image only), v_both = v(text, image). The three evaluations
run as one batched forward per step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..backbones.nanodit import NanoDiT, VaryConditioning
from ..errors import Problem, ValidationError
from ..sampling import StepCallback, VelocityFn, dual_cfg, euler_sample, get_timesteps, make_noise

__all__ = ["OUTPUT_TYPES", "VaryOutput", "VaryPipeline", "dual_guidance_velocity"]

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("latent", "pt", "pil")


@dataclass
class VaryOutput:
    images: torch.Tensor | list  # latents (B, C, h, w), pixels (B, 3, H, W) in [0, 1], or PIL images
    seed: int | None  # the seed used, when the pipeline drew it or was given one (None with a generator)


def _velocity(model: NanoDiT, cond: VaryConditioning, drop_text: torch.Tensor, drop_image: torch.Tensor) -> VelocityFn:
    """(x, t) -> model velocity; `cond` holds n copies of x's batch, so x and t are tiled n times."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = cond.batch_size // x.shape[0]
        return model(
            torch.cat([x] * n),
            torch.cat([t] * n),
            text=cond.text,
            text_mask=cond.text_mask,
            cls=cond.cls,
            patches=cond.patches,
            drop_text=drop_text,
            drop_image=drop_image,
        )

    return velocity


def dual_guidance_velocity(model: NanoDiT, cond: VaryConditioning, text_scale: float, image_scale: float) -> VelocityFn:
    """(x, t) -> dual-CFG velocity; x (B, ...) is evaluated as one (3B, ...) batch [uncond | image | both]."""
    b, device = cond.batch_size, model.device
    flags = torch.tensor([[True, True], [True, False], [False, False]], device=device)  # (3, 2): text, image
    drop_text = flags[:, 0].repeat_interleave(b)  # (3B,)
    drop_image = flags[:, 1].repeat_interleave(b)  # (3B,)
    batched = _velocity(model, cond.repeat(3), drop_text, drop_image)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_uncond, v_img, v_both = batched(x, t).chunk(3)  # 3 x (B, C, H, W)
        return dual_cfg(v_uncond, v_img, v_both, text_scale, image_scale)

    return velocity


class VaryPipeline:
    """NanoDiT + rectified-flow Euler sampling + dual CFG. `decode` maps latents to [-1, 1] pixels (a VAE)."""

    def __init__(self, model: NanoDiT, decode: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model = model
        self.decode = decode

    def velocity_fn(self, cond: VaryConditioning, text_scale: float, image_scale: float) -> VelocityFn:
        """Dual CFG; with s_T = s_I = 1 it is exactly v_both (see docs/vary.md), so one evaluation suffices."""
        if text_scale == 1.0 and image_scale == 1.0:
            b = cond.batch_size
            keep = torch.zeros(b, dtype=torch.bool, device=self.model.device)
            return _velocity(self.model, cond, keep, keep)
        return dual_guidance_velocity(self.model, cond, text_scale, image_scale)

    @torch.no_grad()
    def __call__(
        self,
        *,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        image_cls: torch.Tensor,
        image_patches: torch.Tensor,
        text_scale: float = 4.0,
        image_scale: float = 1.5,
        num_inference_steps: int = 28,
        schedule: str = "shifted",
        shift: float | None = None,
        latent_size: tuple[int, int] | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "latent",
        callback_on_step_end: StepCallback | None = None,
        progress: bool = False,
    ) -> VaryOutput:
        """Sample B variations, one per conditioning row.

        text_embeds (B, T, Dt) and text_mask (B, T) bool (None: all real) from the text encoder; image_cls
        (B, G) and image_patches (B, P, G) from DINO on the reference. `latent_size` (h, w) in the model's
        input space (default config.sample_size square). Noise comes from `generator` or `seed`; with
        neither, a seed is drawn, logged and returned so the result can be reproduced.
        """
        model, cfg = self.model, self.model.config
        problems = []
        if output_type not in OUTPUT_TYPES:
            problems.append(Problem("output_type", output_type, f"must be one of {', '.join(OUTPUT_TYPES)}"))
        elif output_type != "latent" and self.decode is None:
            problems.append(Problem("output_type", output_type, "needs a decoder (VaryPipeline(decode=...))"))
        for name, scale in (("text_scale", text_scale), ("image_scale", image_scale)):
            if isinstance(scale, bool) or not isinstance(scale, int | float) or scale != scale:
                problems.append(Problem(name, scale, "must be a number"))
        if problems:
            raise ValidationError(problems)
        if text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
        cond = VaryConditioning(text_embeds, text_mask, image_cls, image_patches).to(model.device, model.dtype)
        h, w = latent_size or (cfg.sample_size, cfg.sample_size)
        shape = (cond.batch_size, cfg.in_channels, h, w)

        if latents is None:
            if generator is None and seed is None:
                seed = int(torch.randint(0, 2**31 - 1, ()))
                logger.info("vary: drew seed %d", seed)
            latents = make_noise(shape, generator=generator, seed=seed, dtype=model.dtype, device=model.device)
        elif tuple(latents.shape) != shape:
            raise ValidationError([Problem("latents", tuple(latents.shape), f"expected shape {shape}")])
        p = cfg.patch_size
        timesteps = get_timesteps(
            num_inference_steps, image_seq_len=(h // p) * (w // p), schedule=schedule, shift=shift
        )
        velocity = self.velocity_fn(cond, float(text_scale), float(image_scale))
        out = euler_sample(
            velocity, latents.to(model.device, model.dtype), timesteps, callback=callback_on_step_end, progress=progress
        )
        return VaryOutput(images=self._postprocess(out, output_type), seed=seed)

    def _postprocess(self, latents: torch.Tensor, output_type: str) -> torch.Tensor | list:
        if output_type == "latent":
            return latents
        pixels = self.decode(latents)  # (B, 3, H, W) in about [-1, 1]
        if output_type == "pt":
            return ((pixels.float().clamp(-1, 1) + 1) / 2).cpu()
        from .compose import tensor_to_pil  # lazy: compose pulls in the FLUX stack

        return tensor_to_pil(pixels)
