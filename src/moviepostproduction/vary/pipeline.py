"""VaryPipeline: variations of a reference image steered by a caption, with dual CFG (seed 003, DESIGN 7).

Takes precomputed features (text-encoder states, DINO CLS and patches); `from_model_dir` also loads the frozen
encoders, so `encode` can turn a reference image and a caption into them. Dual CFG in the InstructPix2Pix form
(Brooks et al. 2023, eq. 3):
    v = v_uncond + s_T (v_both - v_img) + s_I (v_img - v_uncond)
with v_uncond = v(no text, no image), v_img = v(image only), v_both = v(text, image). The evaluations of one step
run as one batched forward. Without a caption it is image guidance v_uncond + s_I (v_img - v_uncond), without an
image text guidance v_uncond + s_T (v_text - v_uncond) (the validation's text-only mode).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from moviepostproduction.errors import FileProblem, Problem, ValidationError
from moviepostproduction.noise import draw_latents, seeded_generator
from moviepostproduction.resources import preflight_weights
from moviepostproduction.sampling import (
    CALLBACK_TENSOR_INPUTS,
    VelocityFn,
    cfg,
    denoise,
    dual_cfg,
    finite_problem,
    get_timesteps,
    require_valid,
    seed_problem,
    step_end,
    steps_problem,
)
from moviepostproduction.vary.nanodit import NanoDiT, VaryConditioning
from moviepostproduction.visualize import tensor_to_pil

__all__ = [
    "CASES",
    "OUTPUT_TYPES",
    "VaryOutput",
    "VaryPipeline",
    "dual_guidance_velocity",
    "guided_velocity",
    "load_reference",
]

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("latent", "pt", "pil")
CASES = {"uncond": (True, True), "text": (False, True), "image": (True, False), "both": (False, False)}  # drops


def load_reference(path: str | Path, field: str = "ref") -> Image.Image:
    """An RGB reference image from a file; a missing or unreadable file is a ValidationError naming `field`."""
    from PIL import UnidentifiedImageError

    from moviepostproduction.files import resolve_input
    from moviepostproduction.scene import open_image

    try:  # a FIFO, a device, a folder or a decompression bomb is refused unread, as for scene images
        with open_image(resolve_input(path)) as (_, img):
            return img.convert("RGB")
    except FileNotFoundError:
        raise ValidationError([Problem(field, str(path), "no such file")]) from None
    except FileProblem as exc:
        raise ValidationError([Problem(field, str(path), "no such file" if exc.missing else exc.reason)]) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValidationError([Problem(field, str(path), f"cannot be read as an image ({exc})")]) from None


@dataclass
class VaryOutput:
    images: torch.Tensor | list  # latents (B, C, h, w), pixels (B, 3, H, W) in [0, 1], or PIL images
    seed: int | None  # the seed used, when the pipeline drew it or was given one (None with a generator)


def _cases_velocity(model: NanoDiT, cond: VaryConditioning, cases: Sequence[str]) -> VelocityFn:
    """(x, t) -> the velocities of `cases` for x (B, ...), as one (len(cases) B, ...) forward, stacked case-major."""
    b, device = cond.batch_size, model.device
    flags = torch.tensor([CASES[c] for c in cases], device=device)  # (K, 2): drop text, drop image
    drop_text = flags[:, 0].repeat_interleave(b)  # (K B,)
    drop_image = flags[:, 1].repeat_interleave(b)
    tiled = cond.repeat(len(cases))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = len(cases)
        return model(
            torch.cat([x] * k),
            torch.cat([t] * k),
            text=tiled.text,
            text_mask=tiled.text_mask,
            cls=tiled.cls,
            patches=tiled.patches,
            drop_text=drop_text,
            drop_image=drop_image,
        )

    return velocity


def dual_guidance_velocity(model: NanoDiT, cond: VaryConditioning, text_scale: float, image_scale: float) -> VelocityFn:
    """(x, t) -> dual-CFG velocity; x (B, ...) is evaluated as one (3B, ...) batch [uncond | image | both]."""
    batched = _cases_velocity(model, cond, ("uncond", "image", "both"))

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_uncond, v_img, v_both = batched(x, t).chunk(3)  # 3 x (B, C, H, W)
        return dual_cfg(v_uncond, v_img, v_both, text_scale, image_scale)

    return velocity


def guided_velocity(
    model: NanoDiT,
    cond: VaryConditioning,
    text_scale: float,
    image_scale: float,
    *,
    use_text: bool = True,
    use_image: bool = True,
) -> VelocityFn:
    """The guidance for the inputs given; a scale of 1 on the one condition used needs a single evaluation.

    Both: dual CFG (one evaluation, v_both, when s_T = s_I = 1: the other terms cancel). Only the image:
    v_uncond + s_I (v_img - v_uncond). Only the text: v_uncond + s_T (v_text - v_uncond). Neither: v_uncond.
    """
    if use_text and use_image and not (text_scale == 1.0 and image_scale == 1.0):
        return dual_guidance_velocity(model, cond, text_scale, image_scale)
    if use_text != use_image:
        case, scale = ("text", text_scale) if use_text else ("image", image_scale)
        if scale != 1.0:
            pair = _cases_velocity(model, cond, ("uncond", case))
            return lambda x, t: cfg(*pair(x, t).chunk(2), scale)
    case = "both" if use_text and use_image else "text" if use_text else "image" if use_image else "uncond"
    return _cases_velocity(model, cond, (case,))


class VaryPipeline:
    """NanoDiT + rectified-flow Euler sampling + dual CFG. `decode` maps latents to [-1, 1] pixels (a VAE).

    `text_encoder` / `image_encoder` (optional, `encoders.TextEncoder` / `ImageEncoder`) let `encode` build the
    features from a caption and reference images; `from_model_dir` loads all of them.
    """

    def __init__(
        self,
        model: NanoDiT,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        text_encoder=None,
        image_encoder=None,
        latent_factor: int = 8,
        label: str = "",
    ):
        self.model = model
        self.decode = decode
        self.text_encoder, self.image_encoder = text_encoder, image_encoder
        self.latent_factor = latent_factor  # pixels per latent pixel (the VAE's downsampling)
        self.label = label

    @classmethod
    def from_model_dir(
        cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> VaryPipeline:
        """NanoDiT from `DIR/nanodit/` (config.json + model.safetensors, optional info.json with a "label"), the
        VAE and both encoders of DIR."""
        from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
        from moviepostproduction.model_dir import as_model_dir
        from moviepostproduction.vary.nanodit_io import FOLDER, INFO_NAME, load_nanodit_dir

        md = as_model_dir(model_dir)
        preflight_weights("vary", md, dtype, device)  # sizes that cannot fit (nanodit/ too), before building
        model = load_nanodit_dir(md.root / FOLDER, device=device, dtype=dtype)  # fail first: the new part
        vae = Vae.load(md, dtype=dtype, device=device)
        text, image = (
            TextEncoder.load(md, dtype=dtype, device=device),
            ImageEncoder.load(md, dtype=dtype, device=device),
        )
        problems = [
            Problem(f"{FOLDER}/config.json: {name}", got, f"does not match the model dir's {what} ({want})")
            for name, got, want, what in (
                ("text_dim", model.config.text_dim, text.t5.config.d_model, "T5 width"),
                ("dino_dim", model.config.dino_dim, image.dino_dim, "DINO width"),
                ("dino_patches", model.config.dino_patches, image.dino_patches, "DINO patch count"),
                ("in_channels", model.config.in_channels, vae.latent_channels, "VAE latent channels"),
            )
            if got != want
        ]
        if problems:
            raise ValidationError(problems, source=str(md.root))
        info = md.root / FOLDER / INFO_NAME
        label = str(json.loads(info.read_text()).get("label", "")) if info.is_file() else ""
        return cls(model, vae.decode, text_encoder=text, image_encoder=image, latent_factor=vae.downsample, label=label)

    def encode(
        self, images: Sequence[Image.Image] | None, captions: Sequence[str] | None, max_text_tokens: int = 128
    ) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of `__call__` for reference images and / or captions (None: that input is absent)."""
        out: dict[str, torch.Tensor | None] = {"text_embeds": None, "text_mask": None}
        out.update(image_cls=None, image_patches=None)
        if captions is not None:
            if self.text_encoder is None:
                raise ValidationError([Problem("text_encoder", None, "encode needs VaryPipeline(text_encoder=...)")])
            text = self.text_encoder.encode(list(captions), max_t5_tokens=max_text_tokens)
            out.update(text_embeds=text.t5, text_mask=text.t5_mask)
        if images is not None:
            if self.image_encoder is None:
                raise ValidationError([Problem("image_encoder", None, "encode needs VaryPipeline(image_encoder=...)")])
            feats = self.image_encoder.encode(list(images))
            out.update(image_cls=feats.dino_cls, image_patches=feats.dino_patches)
        return out

    def velocity_fn(
        self, cond: VaryConditioning, text_scale: float, image_scale: float, *, use_text=True, use_image=True
    ) -> VelocityFn:
        """Dual CFG; with s_T = s_I = 1 it is exactly v_both (see docs/vary.md), so one evaluation suffices."""
        return guided_velocity(self.model, cond, text_scale, image_scale, use_text=use_text, use_image=use_image)

    def _conditioning(self, text_embeds, text_mask, image_cls, image_patches) -> VaryConditioning:
        """Features with placeholders for an absent input (it is dropped, so its values never matter)."""
        cfg, problems = self.model.config, []
        if (image_cls is None) != (image_patches is None):
            problems.append(Problem("image_patches", None, "give image_cls and image_patches together"))
        if text_embeds is None and image_cls is None:
            problems.append(Problem("text_embeds", None, "give a caption (text_embeds), an image, or both"))
        if problems:
            raise ValidationError(problems)
        batch = text_embeds.shape[0] if text_embeds is not None else image_cls.shape[0]
        if text_embeds is None:
            text_embeds, text_mask = torch.zeros(batch, 1, cfg.text_dim), torch.ones(batch, 1, dtype=torch.bool)
        if text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
        if image_cls is None:
            image_cls, image_patches = (
                torch.zeros(batch, cfg.dino_dim),
                torch.zeros(batch, cfg.dino_patches, cfg.dino_dim),
            )
        return VaryConditioning(text_embeds, text_mask, image_cls, image_patches).to(
            self.model.device, self.model.dtype
        )

    @torch.no_grad()
    def __call__(
        self,
        *,
        text_embeds: torch.Tensor | None,
        text_mask: torch.Tensor | None = None,
        image_cls: torch.Tensor | None,
        image_patches: torch.Tensor | None,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
        progress: bool = False,
    ) -> VaryOutput:
        """Sample B variations, one per conditioning row.

        text_embeds (B, T, Dt) and text_mask (B, T) bool (None: all real) from the text encoder, or None for no
        caption; image_cls (B, G) and image_patches (B, P, G) from DINO on the reference, or both None for
        text only. `latent_size` (h, w) in the model's input space (default config.sample_size square). Noise
        (B, C, h, w), unpacked, in the model's dtype as diffusers' randn_tensor draws it, comes from `generator` (one,
        or one per row) or `torch.Generator("cpu").manual_seed(seed)`; with neither, a seed is drawn, logged and
        returned; `latents` (B, C, h, w) instead. `callback_on_step_end(pipe, step, timestep, callback_kwargs)` as
        in diffusers. Scales must be finite; at most `sampling.MAX_STEPS` steps.
        """
        model, cfg = self.model, self.model.config
        problems = []
        if output_type not in OUTPUT_TYPES:
            problems.append(Problem("output_type", output_type, f"must be one of {', '.join(OUTPUT_TYPES)}"))
        elif output_type != "latent" and self.decode is None:
            problems.append(Problem("output_type", output_type, "needs a decoder (VaryPipeline(decode=...))"))
        problems += [
            finite_problem("text_scale", text_scale),
            finite_problem("image_scale", image_scale),
            steps_problem("num_inference_steps", num_inference_steps),
            seed_problem("seed", seed),
        ]
        require_valid(*problems)
        step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, torch.ones(2))  # checked up front
        use_text, use_image = text_embeds is not None, image_cls is not None
        cond = self._conditioning(text_embeds, text_mask, image_cls, image_patches)
        h, w = latent_size or (cfg.sample_size, cfg.sample_size)
        shape = (cond.batch_size, cfg.in_channels, h, w)

        if latents is None:
            if generator is None and seed is None:
                seed = int(torch.randint(0, 2**31 - 1, ()))
                logger.info("vary: drew seed %d", seed)
            gen = generator if generator is not None else seeded_generator(seed)
            latents = draw_latents(shape, gen, dtype=model.dtype, device=model.device)
        elif tuple(latents.shape) != shape:
            raise ValidationError([Problem("latents", tuple(latents.shape), f"must have shape {shape} (B, C, h, w)")])
        p = cfg.patch_size
        timesteps = get_timesteps(
            num_inference_steps, image_seq_len=(h // p) * (w // p), schedule=schedule, shift=shift
        )
        velocity = self.velocity_fn(cond, float(text_scale), float(image_scale), use_text=use_text, use_image=use_image)
        callback = step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, timesteps)
        out = denoise(velocity, latents.to(model.device, model.dtype), timesteps, callback=callback, progress=progress)
        return VaryOutput(images=self._postprocess(out, output_type), seed=seed)

    def _postprocess(self, latents: torch.Tensor, output_type: str) -> torch.Tensor | list:
        if output_type == "latent":
            return latents
        pixels = self.decode(latents)  # (B, 3, H, W) in about [-1, 1]
        if output_type == "pt":
            return ((pixels.float().clamp(-1, 1) + 1) / 2).cpu()
        return tensor_to_pil(pixels)
