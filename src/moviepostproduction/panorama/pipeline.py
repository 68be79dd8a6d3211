"""PanoramaPipeline: text (and optionally placed refs) -> a seamless 2:1 equirectangular panorama (DESIGN 7).

Orchestration only. The model is a FLUX velocity predictor (a stock `FluxTransformer2DModel` or a
`ConditionedFlux`); text arrives already encoded (`TextEncoder.encode`), the scene conditioning already
prepared on the real (h, w) token grid (`ComposePipeline.prepare`), and the VAE is anything with
`decode(latents) -> pixels` (`encoders.Vae`). Seamlessness comes from `PanoramaConfig`: token-grid wrap and
latent rolling around every model call (`panorama.wrapped_forward`), periodic RoPE while sampling
(`periodic_rope`), circular width padding in the VAE while decoding (`circular_vae`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from moviepostproduction.compose.conditioning import Conditioning
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.lora import FluxLoraMixin
from moviepostproduction.encoders.memory import MemoryMixin, MemoryOptions
from moviepostproduction.encoders.offload import compute_dtype, execution_device
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.model_dir import SamplingDefaults
from moviepostproduction.noise import Generators, batch_problem, check_packed_latents, draw_packed, seeded_generator
from moviepostproduction.panorama.circular_vae import circular_width_padding
from moviepostproduction.panorama.periodic_rope import periodic_rope
from moviepostproduction.panorama.wrap import (
    PanoramaConfig,
    PanoramaValueError,
    panorama_grid,
    remap_conditioning,
    roll_offsets,
    wrap_ids,
    wrapped_forward,
)
from moviepostproduction.resources import ModelDims, Request, preflight, preflight_weights
from moviepostproduction.sampling import (
    CALLBACK_TENSOR_INPUTS,
    check_call,
    denoise,
    pack_latents,
    require_valid,
    scene_guidance,
    step_end,
    text_ids,
    unpack_latents,
    use_true_cfg,
)

if TYPE_CHECKING:
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.scene import Scene

logger = logging.getLogger(__name__)

__all__ = ["LatentDecoder", "PanoramaOutput", "PanoramaPipeline", "compose_panorama"]


class LatentDecoder(Protocol):
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) FLUX-normalised latents -> (B, 3, 8h, 8w) pixels in about [-1, 1]."""
        ...


@dataclass
class PanoramaOutput:
    latents: torch.Tensor  # (B, C, h, w) final VAE latents
    images: torch.Tensor | None  # (B, 3, H, W) in [0, 1], H = 8h, W = 2H; None for output_type="latent"
    label: str = ""  # what made them, e.g. "tiny-random (...)"


@dataclass
class _Text:
    embeds: torch.Tensor  # (B, T, d_t5)
    pooled: torch.Tensor  # (B, d_clip)
    conditioning: Conditioning | None  # on the real (h, w) grid


def _invalid(field: str, value: object, message: str) -> PanoramaValueError:
    return PanoramaValueError([Problem(field, value, message)])


class PanoramaPipeline(FluxLoraMixin, MemoryMixin):
    """A FLUX velocity model + an optional VAE; `__call__` is keyword-only like diffusers' FluxPipeline."""

    memory_dims: ModelDims | None = None  # sizes from the model dir (from_model_dir): each call is bounded first

    def __init__(
        self,
        model: nn.Module,
        vae: LatentDecoder | None = None,
        *,
        config: PanoramaConfig | None = None,
        vae_scale_factor: int = 8,
        label: str = "",
        defaults: SamplingDefaults | None = None,
    ):
        self.model = model.eval()
        self.transformer = model.transformer if isinstance(model, ConditionedFlux) else model
        if not hasattr(self.transformer, "pos_embed") or not hasattr(self.transformer, "config"):
            raise TypeError(f"model must be a FluxTransformer2DModel or ConditionedFlux, got {type(model).__name__}")
        self.vae = vae
        self.config = config or PanoramaConfig()
        self.label = label
        # what __call__ uses for an argument left at None: the model dir's (ModelDir.sampling_defaults)
        self.defaults = SamplingDefaults.of_model(model) if defaults is None else defaults
        self.vae_scale_factor = int(getattr(vae, "downsample", vae_scale_factor))
        self.latent_channels = int(self.transformer.config.in_channels) // 4  # packed 2x2 patches

    @classmethod
    def from_pretrained(
        cls, model: str | Path | None = None, *, adapter: str | Path | None = None, **kwargs
    ) -> PanoramaPipeline:
        """diffusers-style loading: `model` a stock FLUX.1 folder (None: the shipped toy model); `adapter` (its
        sampling defaults) as for ComposePipeline; the other keywords are `from_model_dir`'s. Panorama scenes with
        refs compose through a ComposePipeline (`compose_panorama`)."""
        from moviepostproduction.model_dir import default_model_dir

        return cls.from_model_dir(default_model_dir() if model is None else model, adapter=adapter, **kwargs)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: str | Path,
        *,
        adapter: str | Path | None = None,
        config: PanoramaConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        quantize: str | None = None,
        offload: str | None = None,
    ) -> PanoramaPipeline:
        """The stock transformer and VAE of a FLUX-layout dir (text is encoded separately: `TextEncoder.load`, with
        `self.defaults.max_text_tokens`). `quantize` (the transformer) and `offload`: docs/memory.md; no VAE tiling
        (tiles would cut the circular padding that closes the seam)."""
        from moviepostproduction.encoders import Vae, load_transformer
        from moviepostproduction.model_dir import as_model_dir

        memory = MemoryOptions(quantize, offload)
        md = as_model_dir(model_dir, adapter)
        defaults = md.sampling_defaults()  # a bad value fails before any weights load
        dims = preflight_weights("panorama", md.root, dtype, device, **memory.counted())  # before anything is built
        quantized, _ = memory.quantized(dtype, device)
        at = memory.load_device(device)
        transformer = load_transformer(md, dtype=dtype, device=None if quantized else at, quantization_config=quantized)
        vae = Vae.load(md, dtype=dtype, device=at)
        pipe = cls(transformer, vae, config=config, label=md.output_label(), defaults=defaults)
        memory.apply(pipe, device)
        pipe.memory_dims = dims
        return pipe

    def enable_vae_tiling(self) -> None:
        raise ValidationError(
            [Problem("vae_tiling", True, "is not available for panoramas: tiles would cut the circular padding")]
        )

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)  # with CPU offload: where the hooks run it (encoders/offload.py)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.model)  # quantized weights are stored as uint8

    # ----------------------------------------------------------------------------------------------- model
    def _model_call(
        self, text: _Text, t: torch.Tensor, guidance: float, layout: bool, x: torch.Tensor, ids, cond
    ) -> torch.Tensor:
        """One forward on (possibly padded) tokens x (B, N', C) with their ids and remapped conditioning."""
        embeds = text.embeds.to(self.device, self.dtype)
        args = dict(
            hidden_states=x,
            encoder_hidden_states=embeds,
            pooled_projections=text.pooled.to(self.device, self.dtype),
            timestep=t.to(self.dtype),
            img_ids=ids,
            txt_ids=text_ids(embeds.shape[1], device=self.device, dtype=self.dtype),
            guidance=torch.full_like(t, guidance) if self.transformer.config.guidance_embeds else None,
        )
        if isinstance(self.model, ConditionedFlux):
            return self.model(**args, conditioning=cond, layout_active=layout)
        if cond is not None:
            raise _invalid("conditioning", type(self.model).__name__, "refs need a ConditionedFlux model")
        return self.model(**args, return_dict=False)[0]

    def velocity_fn(
        self,
        grid: tuple[int, int],
        timesteps: torch.Tensor,
        text: _Text,
        negative: _Text | None,
        *,
        guidance_scale: float,
        true_cfg_scale: float,
        offsets: list[int],
        ref_guidance_scale: float = 1.0,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The wrapped model as the sampler's velocity field: pads, rolls and guidance (`scene_guidance`).

        What depends only on the scene is built once per generation: the padded grid's position ids, and the
        conditioning gathered onto it with its Assemble-Attn rows, once per distinct roll offset (one with roll off).
        """
        cfgp = self.config
        step_of = {float(t): i for i, t in enumerate(timesteps[:-1].tolist())}
        conditioned = isinstance(self.model, ConditionedFlux)
        grounding = self.defaults.grounding_ratio if conditioned else 0.0
        layout_steps = math.ceil(grounding * (len(timesteps) - 1))  # as ComposePipeline
        ids = wrap_ids(grid, cfgp.pad, cfgp.pad_ids, dtype=self.dtype, device=self.device)  # (N', 3)
        cases = {"scene": text, "caption": _Text(text.embeds, text.pooled, None), "negative": negative}
        true_scale = true_cfg_scale if use_true_cfg(true_cfg_scale, negative is not None) else 1.0
        padded: dict[tuple[str, int], Conditioning | None] = {}

        def padded_conditioning(case: str, shift: int) -> Conditioning | None:
            if (case, shift) not in padded:
                cond = cases[case].conditioning
                if cond is not None:
                    cond = remap_conditioning(cond, grid, cfgp.pad, shift)
                    cond = self.model.with_rows(cond) if conditioned else cond
                padded[case, shift] = cond
            return padded[case, shift]

        def run(case: str, x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
            fn = partial(self._model_call, cases[case], t, guidance_scale, i < layout_steps)
            cond = padded_conditioning(case, offsets[i])
            return wrapped_forward(fn, x, grid, pad=cfgp.pad, shift=offsets[i], ids=ids, padded_conditioning=cond)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            i = step_of[float(t[0])]
            with torch.no_grad():
                return scene_guidance(
                    lambda case: run(case, x, t, i), ref_guidance_scale=ref_guidance_scale, true_cfg_scale=true_scale
                )  # (B, N, C)

        return velocity

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        *,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        height: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        conditioning: Conditioning | None = None,
        negative_conditioning: Conditioning | None = None,
        ref_guidance_scale: float | None = None,
        noise_temperature: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: Generators | None = None,
        latents: torch.Tensor | None = None,
        schedule: str = "shifted",
        output_type: str = "pt",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
        progress: bool = False,
    ) -> PanoramaOutput:
        """Generate B = prompt_embeds.shape[0] x num_images_per_prompt panoramas of height x 2 height pixels.

        prompt_embeds (P, T, d_t5) and pooled_prompt_embeds (P, d_clip) as `TextEncoder.encode` returns them, each
        prompt's images next to each other as in diffusers; `conditioning`: refs prepared on the real (h, w) token
        grid (bboxes may wrap the seam) for all B images. Noise as FluxPipeline draws it for the 2:1 latent,
        (B, C, 2h, 2w) packed; `latents` instead: packed (B, N, 4C), or unpacked (B, C, 2h, 2w). Noise, then the
        random roll offsets, come from `generator` (one, or one per image), else `torch.Generator("cpu")
        .manual_seed(seed)` (None: 0). `callback_on_step_end` as in diffusers. At most `sampling.MAX_STEPS` steps;
        scales must be finite numbers >= 0. output_type: "pt" (images in [0, 1]) or "latent".
        `ref_guidance_scale` (with `conditioning`; 1 = off) and `noise_temperature` (a factor on the starting noise,
        drawn or `latents`; 1 = as is): None takes `self.defaults`, the model dir's (docs/sampling.md).
        """
        if output_type not in ("pt", "latent"):
            raise _invalid("output_type", output_type, "must be pt or latent")
        check_call(num_inference_steps, seed, guidance_scale, true_cfg_scale)
        used = self.defaults.resolve(ref_guidance_scale=ref_guidance_scale, noise_temperature=noise_temperature)
        n = num_images_per_prompt
        require_valid(batch_problem("num_images_per_prompt", n))
        step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, torch.ones(2))  # checked up front
        h, w = panorama_grid(height, self.vae_scale_factor)
        self.config.check_grid((h, w))
        batch = prompt_embeds.shape[0] * n
        if self.memory_dims is not None:  # refuse what cannot fit before any work
            preflight(Request("panorama", height, 2 * height, batch=batch, device=str(self.device)), self.memory_dims)
        if n > 1:  # diffusers' order: prompt 0's images, then prompt 1's
            prompt_embeds, pooled_prompt_embeds = (
                e.repeat_interleave(n, dim=0) for e in (prompt_embeds, pooled_prompt_embeds)
            )
            if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None:
                negative_prompt_embeds, negative_pooled_prompt_embeds = (
                    e.repeat_interleave(n, dim=0) for e in (negative_prompt_embeds, negative_pooled_prompt_embeds)
                )
        generator = generator if generator is not None else seeded_generator(seed)
        if latents is None:
            x = draw_packed(
                batch, self.latent_channels, (2 * h, 2 * w), generator, dtype=self.dtype, device=self.device
            )
        else:
            if latents.ndim == 4:  # the unpacked form PanoramaOutput.latents has
                check_packed_latents(latents, (batch, self.latent_channels, 2 * h, 2 * w))
                latents = pack_latents(latents)
            check_packed_latents(latents, (batch, h * w, 4 * self.latent_channels))
            x = latents.to(self.device, self.dtype)  # (B, h*w, 4C)
        if used.noise_temperature != 1.0:
            x = x * used.noise_temperature
        timesteps = self.defaults.timesteps(num_inference_steps, h * w, schedule)
        offsets = roll_offsets(self.config, num_inference_steps, w, generator=_first(generator))
        text = _Text(prompt_embeds, pooled_prompt_embeds, conditioning)
        negative = None
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None:
            negative = _Text(negative_prompt_embeds, negative_pooled_prompt_embeds, negative_conditioning)
        velocity = self.velocity_fn(
            (h, w),
            timesteps,
            text,
            negative,
            guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale,
            offsets=offsets,
            ref_guidance_scale=used.ref_guidance_scale if conditioning is not None else 1.0,  # no refs: nothing to do
        )
        rope = periodic_rope(self.transformer, w) if self.config.periodic_rope else contextlib.nullcontext()
        with rope:
            callback = step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, timesteps)
            x = denoise(velocity, x.to(self.dtype), timesteps, callback=callback, progress=progress)
        out = unpack_latents(x, 2 * h, 2 * w)  # (B, C, 2h, 2w)
        images = self.decode(out) if output_type != "latent" else None
        self.maybe_free_model_hooks()
        return PanoramaOutput(latents=out, images=images, label=self.label)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, 8h, 8w) in [0, 1], with circular width padding when configured."""
        if self.vae is None:
            raise _invalid("vae", None, "decoding needs a VAE (or use output_type='latent')")
        patch = contextlib.nullcontext()
        if self.config.circular_vae:
            if not isinstance(self.vae, nn.Module):
                raise _invalid("vae", type(self.vae).__name__, "circular_vae needs an nn.Module VAE to patch")
            patch = circular_width_padding(self.vae, height_mode=self.config.vae_height_padding)
        with patch, torch.no_grad():
            pixels = self.vae.decode(latents)
        return ((pixels.float() + 1) / 2).clamp(0, 1)


def _first(generator: Generators) -> torch.Generator:
    """The generator that draws the roll offsets: the one given, or the first of a list."""
    return generator if isinstance(generator, torch.Generator) else list(generator)[0]


def compose_panorama(
    compose: ComposePipeline,
    scene: Scene,
    *,
    config: PanoramaConfig | None = None,
    negative_prompt: str | None = None,
    seed: int | None = None,
    **kwargs,
) -> PanoramaOutput:
    """A `"panorama": true` scene with placed refs (bboxes may wrap the seam) through `PanoramaPipeline`.

    The compose pipeline's `prepare` builds the conditioning once on the real (h, w) grid (layout.py maps
    wrapping boxes to both edges); `wrapped_forward` gathers it onto the padded / rolled tokens at every step.
    `kwargs` go to `PanoramaPipeline.__call__` (num_inference_steps, guidance_scale, true_cfg_scale,
    ref_guidance_scale, noise_temperature, ...); the panorama samples with the compose pipeline's `defaults`.
    """
    if not scene.panorama:
        raise _invalid("panorama", scene.panorama, "the scene is not a panorama (set panorama: true)")
    n = kwargs.get("num_images_per_prompt", 1)  # the conditioning covers every image
    require_valid(batch_problem("num_images_per_prompt", n))
    prepared = compose.prepare(scene, negative_prompt, layout_rows=False, batch=n)  # rows: the padded grid's
    negative = prepared.negative
    pipe = PanoramaPipeline(compose.model, compose.vae, config=config, label=compose.label, defaults=compose.defaults)
    return pipe(
        prompt_embeds=prepared.text.t5,
        pooled_prompt_embeds=prepared.text.pooled,
        negative_prompt_embeds=negative.t5 if negative is not None else None,
        negative_pooled_prompt_embeds=negative.pooled if negative is not None else None,
        conditioning=prepared.conditioning,
        negative_conditioning=prepared.negative_conditioning,
        height=scene.height,
        seed=seed if seed is not None else (scene.seed if scene.seed is not None else 0),
        **kwargs,
    )
