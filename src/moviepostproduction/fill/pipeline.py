"""FillPipeline: repaint the masked part of a plate with FLUX-Fill (DESIGN 7), optionally guided by a semantic map
or inserting references at their bboxes (the compose conditioning). Pixels outside the mask are pasted back from
the plate, so they are bit-identical in the output. Model dir layout and fill weights: `fill/weights.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from moviepostproduction.compose.lora import FluxLoraMixin
from moviepostproduction.encoders import TextEmbeddings, TextEncoder, Vae, load_transformer
from moviepostproduction.encoders.memory import MemoryMixin, MemoryOptions
from moviepostproduction.encoders.offload import compute_dtype, execution_device
from moviepostproduction.errors import Problem, ValidationError, WeightsError
from moviepostproduction.fill.inputs import FillInputs, place_refs, read_fill_inputs
from moviepostproduction.fill.model import (
    LAYOUTS,
    FillChannels,
    FillFlux,
    arrange,
    check_fill_transformer,
    context_tokens,
    crop_target,
    fill_condition,
    masked_image,
    pad_amount,
)
from moviepostproduction.fill.semantic_attention import SemanticTokens, grid_positions
from moviepostproduction.fill.weights import load_fill_weights
from moviepostproduction.model_dir import (
    IMAGE_COMPONENTS,
    TEXT_COMPONENTS,
    ModelDir,
    SamplingDefaults,
    as_model_dir,
    read_json,
)
from moviepostproduction.noise import Generators, batch_problem, check_packed_latents, draw_packed, seeded_generator
from moviepostproduction.resources import LOADS, ModelDims, Request, preflight, preflight_weights
from moviepostproduction.sampling import (
    CALLBACK_TENSOR_INPUTS,
    check_call,
    denoise,
    latent_image_ids,
    noise_latents,
    pack_latents,
    require_valid,
    scene_guidance,
    step_end,
    text_ids,
    unpack_latents,
)

POSTERIORS = ("sample", "mode")  # how the VAE encodes the plate: FluxFillPipeline samples with the generator

logger = logging.getLogger(__name__)


@dataclass
class FillOutput:
    images: list  # PIL images, or a (B, 3, H, W) tensor in [0, 1] for output_type="pt"
    mask: np.ndarray  # (H, W) bool: the binarised repaint mask that was used
    label: str = ""


class FillPipeline(FluxLoraMixin, MemoryMixin):
    """Frozen FLUX-Fill transformer (+ semantic attention / LoRA / adapter) + VAE + text encoder."""

    memory_dims: ModelDims | None = None  # sizes from the model dir (from_model_dir): each call is bounded first

    def __init__(
        self,
        model: FillFlux,
        vae: Vae,
        text_encoder: TextEncoder,
        *,
        layout: str = "single",
        image_encoder=None,
        label: str = "",
        defaults: SamplingDefaults | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValidationError([Problem("layout", layout, f"must be one of {LAYOUTS}")])
        self.model, self.vae, self.text_encoder = model.eval(), vae, text_encoder
        self.layout, self.image_encoder, self.label = layout, image_encoder, label
        self.channels = FillChannels.from_vae(vae.latent_channels, vae.downsample)
        check_fill_transformer(model.transformer.config, self.channels, "transformer config")
        # what __call__ uses for an argument left at None: the model dir's (ModelDir.sampling_defaults)
        self.defaults = SamplingDefaults.of_model(model) if defaults is None else defaults

    @classmethod
    def from_pretrained(
        cls, model: ModelDir | str | Path, *, adapter: str | Path | None = None, **kwargs
    ) -> FillPipeline:
        """diffusers-style loading: `model` FLUX.1-Fill-dev as downloaded (or a fill model dir), `adapter` our adapter
        folder for refs; the other keywords are `from_model_dir`'s."""
        return cls.from_model_dir(model, adapter=adapter, **kwargs)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: ModelDir | str | Path,
        *,
        semantic: bool = False,
        refs: bool = False,
        adapter: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        quantize: str | None = None,
        offload: str | None = None,
        vae_tiling: bool = False,
    ) -> FillPipeline:
        """Load a fill model dir (FLUX.1-Fill-dev as downloaded, or the shipped toy fill model); `semantic` / `refs`
        require the semantic weights / an adapter (`adapter`, else MODEL/adapter) and its image encoders.
        `quantize`, `offload`, `vae_tiling`: as for ComposePipeline (docs/memory.md)."""
        memory = MemoryOptions(quantize, offload, vae_tiling)
        md = as_model_dir(model_dir, adapter)
        if refs:
            md.adapter.require(md.root)
        md.check(["transformer", "vae", *TEXT_COMPONENTS, *(IMAGE_COMPONENTS if refs else ())])
        defaults = md.sampling_defaults()  # a bad value fails before any weights load
        loads = (*LOADS["fill"], *(LOADS["compose"] if refs else ()))
        dims = preflight_weights("fill", md, dtype, device, components=loads, **memory.counted())
        quantized, quantized_t5 = memory.quantized(dtype, device)
        at = memory.load_device(device)
        vae = Vae.load(md, dtype=dtype, device=at)
        channels = FillChannels.from_vae(vae.latent_channels, vae.downsample)
        config_path = md.transformer / "config.json"
        check_fill_transformer(
            read_json(config_path, "a FluxTransformer2DModel config", md.root),
            channels,
            f"model dir {md.root}: {config_path}",
        )
        transformer = load_transformer(md, dtype=dtype, device=None if quantized else at, quantization_config=quantized)
        weights, sem = load_fill_weights(md, transformer, need_semantic=semantic)
        adapter, image_encoder = None, None
        if refs:
            from moviepostproduction.compose.modules import CompositionAdapter
            from moviepostproduction.encoders import ImageEncoder

            adapter = CompositionAdapter.from_pretrained(md.adapter.root).to(device=at, dtype=dtype)
            image_encoder = ImageEncoder.load(md, dtype=dtype, device=at)
        label = md.output_label("fill")
        model = FillFlux(transformer, sem.to(device=at, dtype=dtype) if sem else None, adapter)
        text = TextEncoder.load(md, dtype=dtype, device=at, t5_quantization_config=quantized_t5)
        pipe = cls(
            model, vae, text, layout=weights.layout, image_encoder=image_encoder, label=str(label), defaults=defaults
        )
        memory.apply(pipe, device)
        pipe.memory_dims = dims
        return pipe

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)  # with CPU offload: where the hooks run it (encoders/offload.py)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.model.transformer)  # quantized weights are stored as uint8

    # ------------------------------------------------------------------------------------------------ encoding
    def encode_semantic(self, pixels: torch.Tensor) -> SemanticTokens:
        """Semantic map (B, 3, H, W) in [-1, 1] -> its packed VAE tokens with panel-local positions."""
        latents = self.vae.encode(pixels.to(self.device, self.dtype))  # (B, C, h, w)
        h, w = latents.shape[-2] // 2, latents.shape[-1] // 2
        return SemanticTokens(pack_latents(latents), grid_positions(h, w, device=self.device))

    def encode_condition(
        self, image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Arranged image and mask -> condition tokens (B, N, 4C + 4 f^2): the masked image's VAE posterior, sampled
        with `generator` (mode without) as FluxFillPipeline.prepare_mask_latents does, and the packed mask."""
        image, mask = image.to(self.device, self.dtype), mask.to(self.device, self.dtype)
        return fill_condition(self.vae.encode(masked_image(image, mask), generator), mask, self.vae.downsample)

    def _text(self, inputs: FillInputs, size: tuple[int, int], panels: int, max_text_tokens: int, batch: int = 1):
        """Text embeddings and, with refs, the compose conditioning for the arranged, padded canvas."""
        if inputs.scene is None:
            return self.text_encoder.encode([inputs.prompt], max_text_tokens), None
        if self.model.adapter is None or self.image_encoder is None:
            raise ValidationError([Problem("refs", "scene", "this pipeline was loaded without refs=True")])
        from moviepostproduction.compose.prepare import encode_references, prepare_scene

        scene = place_refs(inputs.scene, inputs.size, size, panels)
        emb = encode_references(self.image_encoder, scene, {})
        prepared = prepare_scene(
            self.model.conditioned, self.text_encoder, scene, emb, max_text_tokens=max_text_tokens, batch=batch
        )
        return prepared.text, prepared.conditioning

    # ------------------------------------------------------------------------------------------------ sampling
    def __call__(
        self,
        image,
        mask=None,
        *,
        semantic=None,
        scene=None,
        prompt: str = "",
        num_inference_steps: int = 28,
        guidance_scale: float = 30.0,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: Generators | None = None,
        latents: torch.Tensor | None = None,
        posterior: str = "sample",
        schedule: str = "shifted",
        max_text_tokens: int | None = None,
        ref_guidance_scale: float | None = None,
        noise_temperature: float | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
        progress: bool = False,
    ) -> FillOutput:
        """Repaint `mask` (white = repaint) of `image`; see docs/fill.md for accepted inputs and their checks.

        As FluxFillPipeline (docs/sampling.md, "Seeds and parity with diffusers"): `generator` (one, or one per image),
        else `torch.Generator("cpu").manual_seed(seed)` (None: 0), draws the plate's VAE posterior sample, then the
        noise, then the masked plate's posterior sample; `posterior="mode"` encodes both with the posterior mode
        instead. `latents`: packed starting noise (num_images_per_prompt, N, 4C). `output_type="latent"` gives the
        final packed latents (no paste-back). `max_text_tokens`, `ref_guidance_scale` (with a scene's refs; 1 = off)
        and `noise_temperature` (1 = as drawn): None takes `self.defaults`, the model dir's (docs/sampling.md).
        """
        if output_type not in ("pil", "pt", "latent"):
            raise ValidationError([Problem("output_type", output_type, "must be one of pil, pt, latent")])
        if posterior not in POSTERIORS:
            raise ValidationError([Problem("posterior", posterior, f"must be one of {', '.join(POSTERIORS)}")])
        check_call(num_inference_steps, seed, guidance_scale)
        n = num_images_per_prompt
        require_valid(batch_problem("num_images_per_prompt", n))
        step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, torch.ones(2))  # checked up front
        used = self.defaults.resolve(
            max_text_tokens=max_text_tokens, ref_guidance_scale=ref_guidance_scale, noise_temperature=noise_temperature
        )
        if isinstance(image, FillInputs):  # already read and checked (the CLI does this before loading weights)
            inputs = image
        else:
            inputs = read_fill_inputs(image, mask, semantic=semantic, scene=scene, prompt=prompt)
        if inputs.semantic is not None and self.model.semantic is None:
            raise WeightsError(
                "this fill model has no SemanticCrossAttention weights (fill/semantic_attention"
                ".safetensors); it cannot take a semantic map"
            )
        if self.memory_dims is not None:  # refuse what cannot fit before any work
            refs = len(inputs.scene.refs) if inputs.scene is not None else 0
            request = Request("fill", inputs.size[0], inputs.size[1], refs=refs, device=str(self.device))
            preflight(request, self.memory_dims)
        f2 = 2 * self.vae.downsample
        pad = (pad_amount(inputs.size[1], f2), pad_amount(inputs.size[0], f2))  # (right, bottom)
        plate = F.pad(inputs.plate, (0, pad[0], 0, pad[1]), mode="replicate")  # (1, 3, H', W')
        hole = F.pad(inputs.mask, (0, pad[0], 0, pad[1]))  # padding is context, never repainted
        arranged = arrange(self.layout, plate, hole)
        grid = (arranged.image.shape[-2] // f2, arranged.image.shape[-1] // f2)
        shape = (n, grid[0] * grid[1], self.channels.latent)
        gen = generator if generator is not None else seeded_generator(seed)
        first = gen if isinstance(gen, torch.Generator) else list(gen)[0]  # diffusers encodes the one plate with [0]
        encode_gen = first if posterior == "sample" else None
        with torch.no_grad():  # FluxFillPipeline's order: plate posterior (not with latents), noise, masked plate
            pixels = arranged.image.to(self.device, self.dtype)
            x0 = pack_latents(self.vae.encode(pixels, encode_gen if latents is None else None))  # (1, N, 4C)
            if latents is not None:
                check_packed_latents(latents, shape)
                noise = latents.to(self.device, self.dtype)
            else:
                noise = draw_packed(
                    n, self.vae.latent_channels, (2 * grid[0], 2 * grid[1]), gen, dtype=self.dtype, device=self.device
                )
            condition = self.encode_condition(arranged.image, arranged.mask, encode_gen)
            sem = None
            if inputs.semantic is not None:
                sem = self.encode_semantic(F.pad(inputs.semantic, (0, pad[0], 0, pad[1]), mode="replicate"))
            text, conditioning = self._text(inputs, plate.shape[-2:], arranged.panels, used.max_text_tokens, n)
        if used.noise_temperature != 1.0:
            noise = noise * used.noise_temperature
        ctx = context_tokens(self.layout, grid, device=self.device)
        ref_guidance = used.ref_guidance_scale if conditioning is not None else 1.0  # no refs: nothing to guide
        velocity = self._velocity(
            condition, text, grid, arranged.panels, guidance_scale, sem, conditioning, num_inference_steps, ref_guidance
        )
        timesteps = self.defaults.timesteps(num_inference_steps, shape[1], schedule)
        user = step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, timesteps)

        def pin_context(i: int, t: float, x: torch.Tensor):
            if bool(ctx.any()):  # pin the context panel to its noised known latent (what training showed)
                x = x.clone()
                x[:, ctx] = noise_latents(x0[:, ctx].float(), noise[:, ctx].float(), t).to(x.dtype)
            replaced = user(i, t, x) if user is not None else None
            return replaced if replaced is not None else x

        out = denoise(velocity, noise.to(self.dtype), timesteps, callback=pin_context, progress=progress)
        if output_type == "latent":
            self.maybe_free_model_hooks()
            return FillOutput(images=out, mask=inputs.mask_bool, label=self.label)  # (n, N, 4C), as FluxFillPipeline
        with torch.no_grad():
            pixels = self.vae.decode(unpack_latents(out, grid[0] * 2, grid[1] * 2))  # (n, 3, H', panels x W')
        self.maybe_free_model_hooks()
        pixels = crop_target(pixels, arranged.panels)[..., : inputs.size[0], : inputs.size[1]]
        results = [paste_back(inputs.plate_uint8, pixels[j : j + 1], inputs.mask_bool) for j in range(n)]
        if output_type == "pt":
            images = torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 255.0 for r in results])
        else:
            images = [Image.fromarray(r) for r in results]
        return FillOutput(images=images, mask=inputs.mask_bool, label=self.label)

    def _velocity(
        self, condition, text: TextEmbeddings, grid, panels, guidance_scale, sem, conditioning, steps, ref_guidance
    ):
        """The fill model as the sampler's velocity field; with refs, reference guidance as compose's
        (`scene_guidance`: the "caption" case is the same prompt without the refs' conditioning)."""
        h, w = grid
        img_ids = latent_image_ids(h, w, device=self.device, dtype=self.dtype)
        txt = text_ids(text.t5.shape[1], device=self.device, dtype=self.dtype)
        positions = grid_positions(h, w, panels, device=self.device)
        guidance_embeds = bool(self.model.transformer.config.guidance_embeds)
        layout_steps = 0
        if conditioning is not None:
            layout_steps = math.ceil(self.defaults.grounding_ratio * steps)
        cases = {"scene": conditioning, "caption": None}  # scene_guidance's cases: with the refs or without
        calls = {"n": 0}

        def run(x: torch.Tensor, t: torch.Tensor, case: str) -> torch.Tensor:
            guidance = torch.full_like(t, guidance_scale).to(self.dtype) if guidance_embeds else None
            b = x.shape[0]  # num_images_per_prompt: one plate, prompt and semantic map for the whole batch
            return self.model(
                x,
                condition.expand(b, -1, -1),  # (B, N, 4C + 4 f^2)
                t.to(self.dtype),
                text.t5.to(self.dtype).expand(b, -1, -1),
                text.pooled.to(self.dtype).expand(b, -1),
                img_ids,
                txt,
                guidance,
                semantic=_batched(sem, b),
                latent_positions=positions,
                conditioning=cases[case],
                layout_active=calls["n"] < layout_steps,
            )

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                v = scene_guidance(lambda case: run(x, t, case), ref_guidance_scale=ref_guidance)
            calls["n"] += 1
            return v

        return velocity


def _batched(sem: SemanticTokens | None, batch: int) -> SemanticTokens | None:
    """One semantic map's tokens (1, M, Cs) for a batch of images of it."""
    if sem is None or sem.tokens.shape[0] == batch:
        return sem
    mask = None if sem.mask is None else sem.mask.expand(batch, -1)
    return SemanticTokens(sem.tokens.expand(batch, -1, -1), sem.positions, mask)


def paste_back(plate: np.ndarray, pixels: torch.Tensor, mask: np.ndarray) -> np.ndarray:
    """Generated pixels (1, 3, H, W) in [-1, 1] inside `mask` (H, W) bool, the plate (H, W, 3) uint8 elsewhere."""
    generated = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.where(mask[..., None], generated, plate)
