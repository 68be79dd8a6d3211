"""ComposePipeline: a scene (caption + placed references) -> one image, FLUX-style `__call__` (DESIGN 1, 3, 4)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.lora import FluxLoraMixin, load_adapter_lora
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.compose.prepare import (
    PreparedScene,
    encode_references,
    prepare_scene,
)
from moviepostproduction.encoders import (
    ImageEmbeddings,
    ImageEncoder,
    TextEncoder,
    Vae,
    load_transformer,
)
from moviepostproduction.encoders.memory import MemoryMixin, MemoryOptions
from moviepostproduction.encoders.offload import compute_dtype, execution_device
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.model_dir import ModelDir, SamplingDefaults, as_model_dir, default_model_dir
from moviepostproduction.noise import (
    Generators,
    batch_problem,
    check_packed_latents,
    diffusers_latent_hw,
    draw_packed,
    seeded_generator,
)
from moviepostproduction.resources import ModelDims, Request, preflight, preflight_weights
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
    strength_timesteps,
    text_ids,
    unpack_latents,
    use_true_cfg,
)
from moviepostproduction.scene import Scene
from moviepostproduction.visualize import pil_to_tensor, tensor_to_pil

logger = logging.getLogger(__name__)


@dataclass
class ComposeOutput:
    images: list  # PIL images, or a (B, 3, H, W) tensor in [0, 1] for output_type="pt", or packed latents
    alphas: list[list[float]]  # per scene, per ref
    label: str = ""  # "tiny-random" etc.: what made these images


class ComposePipeline(FluxLoraMixin, MemoryMixin):
    """Frozen encoders + VAE + `ConditionedFlux`. Use `from_model_dir` to load the real on-disk layout."""

    memory_dims: ModelDims | None = None  # sizes from the model dir (from_model_dir): each call is bounded first

    def __init__(
        self,
        model: ConditionedFlux,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        vae: Vae,
        label: str = "",
        defaults: SamplingDefaults | None = None,
    ):
        self.model = model.eval()
        # what __call__ uses for an argument left at None: the model dir's (ModelDir.sampling_defaults)
        self.defaults = SamplingDefaults.of_model(model) if defaults is None else defaults
        self.use_layout = True  # pathway switches, for ablations (evaluation/compose_eval.py)
        self.use_modulation = True
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.vae = vae
        self.label = label
        self._ref_cache: dict[tuple, ImageEmbeddings] = {}  # per image file: its embeddings without the R dim

    @classmethod
    def from_pretrained(
        cls, model: ModelDir | str | Path | None = None, *, adapter: str | Path | None = None, **kwargs
    ) -> ComposePipeline:
        """diffusers-style loading: `model` a stock FLUX.1 folder as downloaded (None: the shipped toy model),
        `adapter` our adapter folder (None: MODEL/adapter); the other keywords are `from_model_dir`'s."""
        return cls.from_model_dir(default_model_dir() if model is None else model, adapter=adapter, **kwargs)

    @classmethod
    def from_model_dir(
        cls,
        model_dir: ModelDir | str | Path,
        *,
        adapter: str | Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        quantize: str | None = None,
        offload: str | None = None,
        vae_tiling: bool = False,
    ) -> ComposePipeline:
        """Load a FLUX folder and its adapter. `quantize` (nf4, int8, fp8: transformer and T5), `offload` (model,
        sequential: loaded on the CPU, run on `device`) and `vae_tiling`: docs/memory.md."""
        memory = MemoryOptions(quantize, offload, vae_tiling)
        md = as_model_dir(model_dir, adapter)
        md.adapter.require(md.root)  # the one line a stock folder without an adapter needs, before the encoders'
        md.check()
        defaults = md.sampling_defaults()  # a bad value fails before any weights load
        dims = preflight_weights("compose", md, dtype, device, **memory.counted())  # before anything is built
        quantized, quantized_t5 = memory.quantized(dtype, device)
        at = memory.load_device(device)
        adapter = CompositionAdapter.from_pretrained(md.adapter.root).to(device=at, dtype=dtype)
        transformer = load_transformer(md, dtype=dtype, device=None if quantized else at, quantization_config=quantized)
        if md.adapter.lora is not None:  # trained with the adapter (stages 1-2): part of the model, always on
            load_adapter_lora(transformer, md.adapter.lora)
        pipe = cls(
            ConditionedFlux(transformer, adapter),
            TextEncoder.load(md, dtype=dtype, device=at, t5_quantization_config=quantized_t5),
            ImageEncoder.load(md, dtype=dtype, device=at),
            Vae.load(md, dtype=dtype, device=at),
            label=md.output_label(),  # after loading: a tiny dir's warning is for a pipeline that exists
            defaults=defaults,
        )
        memory.apply(pipe, device)
        pipe.memory_dims = dims
        return pipe

    @property
    def device(self) -> torch.device:
        return execution_device(self.model)  # with CPU offload: where the hooks run it (encoders/offload.py)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.model)  # quantized weights are stored as uint8

    # ------------------------------------------------------------------------------------------ preparation
    def encode_references(self, scene: Scene) -> ImageEmbeddings:
        """(R, C) CLIP, (R, G) DINO CLS, (R, P, G) DINO patches; each distinct image file once (storyboards)."""
        return encode_references(self.image_encoder, scene, self._ref_cache)

    def prepare(
        self,
        scene: Scene | Sequence[Scene],
        negative_prompt: str | None = None,
        max_text_tokens: int | None = None,
        *,
        layout_rows: bool = True,
        batch: int = 1,
    ) -> PreparedScene:
        """Everything the scene needs at every step, built once (`compose.prepare.prepare_scene`); `batch` images of
        it, or of each scene of a list of one size and ref count."""
        embs = [self.encode_references(sc) for sc in ([scene] if isinstance(scene, Scene) else scene)]
        return prepare_scene(
            self.model,
            self.text_encoder,
            scene,
            embs[0] if isinstance(scene, Scene) else embs,
            max_text_tokens=self.defaults.resolve(max_text_tokens=max_text_tokens).max_text_tokens,
            negative_prompt=negative_prompt,
            use_modulation=self.use_modulation,
            layout_rows=layout_rows,
            batch=batch,
        )

    # ---------------------------------------------------------------------------------------------- sampling
    def velocity_fn(
        self,
        prepared: PreparedScene,
        guidance_scale: float,
        true_cfg_scale: float,
        layout_steps: int,
        ref_guidance_scale: float = 1.0,
    ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The model as a velocity field for the sampler; Assemble-Attn only for the first `layout_steps` calls.

        Reference guidance (scale s != 1) extrapolates away from the same caption without references:
        v = v_caption + s (v_scene - v_caption), one more (plain) forward per step; true CFG then applies to that.
        """
        h, w = prepared.grid
        img_ids = latent_image_ids(h, w, device=self.device, dtype=self.dtype)
        guidance_embeds = bool(self.model.transformer.config.guidance_embeds)
        cases = {  # scene_guidance's cases: (text, conditioning)
            "scene": (prepared.text, prepared.conditioning),
            "caption": (prepared.text, None),
            "negative": (prepared.negative, prepared.negative_conditioning),
        }
        ids = {k: text_ids(v[0].t5.shape[1], device=self.device, dtype=self.dtype) for k, v in cases.items() if v[0]}
        true_scale = true_cfg_scale if use_true_cfg(true_cfg_scale, prepared.negative is not None) else 1.0
        calls = {"n": 0}

        def run(x: torch.Tensor, t: torch.Tensor, case: str) -> torch.Tensor:
            text, cond = cases[case]
            guidance = torch.full_like(t, guidance_scale) if guidance_embeds else None
            each = x.shape[0] // text.t5.shape[0]  # num_images_per_prompt: one text row per scene, repeated
            return self.model(
                x,
                text.t5.to(self.dtype).repeat_interleave(each, dim=0),  # (B, T, d_t5)
                text.pooled.to(self.dtype).repeat_interleave(each, dim=0),  # (B, d_clip)
                t.to(self.dtype),
                img_ids,
                ids[case],
                guidance,
                conditioning=cond,
                layout_active=self.use_layout and calls["n"] < layout_steps,
            )

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                v = scene_guidance(
                    lambda case: run(x, t, case), ref_guidance_scale=ref_guidance_scale, true_cfg_scale=true_scale
                )
            calls["n"] += 1
            return v

        return velocity

    def __call__(
        self,
        scene: Scene | Sequence[Scene],
        *,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        negative_prompt: str | None = None,
        ref_guidance_scale: float | None = None,
        noise_temperature: float | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: Generators | None = None,
        latents: torch.Tensor | None = None,
        image: Image.Image | None = None,
        strength: float = 1.0,
        schedule: str = "shifted",
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = CALLBACK_TENSOR_INPUTS,
        progress: bool = False,
    ) -> ComposeOutput:
        """Generate `num_images_per_prompt` images per scene (one batched forward per step); a list of scenes is a
        storyboard: shared references are encoded once.

        Noise as diffusers' FluxPipeline draws it (docs/sampling.md, "Seeds and parity with diffusers"): from
        `generator` (one, or one per image), else `torch.Generator("cpu").manual_seed(seed)` with `seed`, else the
        scene's own `seed`, else 0; scene k of a storyboard uses seed + k. `latents`: packed starting noise
        (num_images_per_prompt, N, 4C), as FluxPipeline takes it. `callback_on_step_end(pipe, step, timestep,
        callback_kwargs) -> dict` as in diffusers. `ref_guidance_scale` (1 = off) and `noise_temperature` (a factor
        on the starting noise, drawn or `latents`; 1 = as is): None takes `self.defaults`, the model dir's.
        """
        if output_type not in ("pil", "pt", "latent"):
            raise ValidationError([Problem("output_type", output_type, "must be one of pil, pt, latent")])
        check_call(num_inference_steps, seed, guidance_scale, true_cfg_scale)
        require_valid(batch_problem("num_images_per_prompt", num_images_per_prompt))
        used = self.defaults.resolve(ref_guidance_scale=ref_guidance_scale, noise_temperature=noise_temperature)
        step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, torch.ones(2))  # checked up front
        scenes = [scene] if isinstance(scene, Scene) else list(scene)
        for sc in scenes if self.memory_dims is not None else ():  # refuse what cannot fit before any work
            request = Request("compose", sc.height, sc.width, refs=len(sc.refs), device=str(self.device))
            preflight(request, self.memory_dims)
        n, channels = num_images_per_prompt, self.vae.latent_channels
        noises = []  # drawn scene after scene, as sampling them one by one would
        for k, sc in enumerate(scenes):
            tokens = (sc.height // 16) * (sc.width // 16)
            if latents is not None:
                check_packed_latents(latents, (n, tokens, 4 * channels))
                noise = latents.to(self.device, self.dtype)
            else:
                gen = generator if generator is not None else seeded_generator(seed if seed is not None else sc.seed, k)
                noise = draw_packed(
                    n, channels, diffusers_latent_hw(sc.height, sc.width), gen, dtype=self.dtype, device=self.device
                )
            noises.append(noise * used.noise_temperature if used.noise_temperature != 1.0 else noise)
        groups: dict[tuple, list[int]] = {}  # scenes of one size and ref count share each forward
        for k, sc in enumerate(scenes):
            groups.setdefault((sc.height, sc.width, len(sc.refs)), []).append(k)
        images, alphas = [None] * len(scenes), [None] * len(scenes)
        negative = negative_prompt if use_true_cfg(true_cfg_scale, negative_prompt is not None) else None
        for members in groups.values():
            group = [scenes[k] for k in members]
            prepared = self.prepare(group, negative, batch=n)
            h, w = prepared.grid
            timesteps = self.defaults.timesteps(num_inference_steps, h * w, schedule)
            x = torch.cat([noises[k] for k in members])  # (S n, N, 4C)
            if image is not None:
                timesteps = strength_timesteps(timesteps, strength)
                x0 = pack_latents(self.vae.encode(pil_to_tensor(image.resize((w * 16, h * 16))).to(self.device)))
                x = noise_latents(x0.float(), x.float(), float(timesteps[0]))
            layout_steps = math.ceil(used.grounding_ratio * (len(timesteps) - 1))
            velocity = self.velocity_fn(prepared, guidance_scale, true_cfg_scale, layout_steps, used.ref_guidance_scale)
            callback = step_end(self, callback_on_step_end, callback_on_step_end_tensor_inputs, timesteps)
            out = denoise(velocity, x.to(self.dtype), timesteps, callback=callback, progress=progress)
            if output_type != "latent":
                with torch.no_grad():
                    pixels = self.vae.decode(unpack_latents(out, h * 2, w * 2))  # (S n, 3, H, W)
                out = tensor_to_pil(pixels) if output_type == "pil" else list((pixels * 0.5 + 0.5).clamp(0, 1))
            for j, k in enumerate(members):
                alphas[k] = prepared.conditioning.alpha[j * n].tolist()
                images[k] = out[j * n : (j + 1) * n]  # latent: (n, N, 4C) as FluxPipeline returns; else n images
        images = images if output_type == "latent" else [img for scene_images in images for img in scene_images]
        if output_type == "pt":
            images = torch.stack(images)
        self.maybe_free_model_hooks()
        return ComposeOutput(images=images, alphas=alphas, label=self.label)
