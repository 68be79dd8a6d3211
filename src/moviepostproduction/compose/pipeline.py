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
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.compose.prepare import (
    PreparedScene,
    check_finite,
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
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.model_dir import ModelDir, SamplingDefaults, as_model_dir
from moviepostproduction.resources import ModelDims, Request, preflight, preflight_weights
from moviepostproduction.sampling import (
    MAX_SEED,
    check_call,
    denoise,
    latent_image_ids,
    make_noise,
    noise_latents,
    pack_latents,
    scene_guidance,
    strength_timesteps,
    text_ids,
    unpack_latents,
    use_true_cfg,
)
from moviepostproduction.scene import Scene
from moviepostproduction.visualize import pil_to_tensor, tensor_to_pil

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "adapter"


@dataclass
class ComposeOutput:
    images: list  # PIL images, or a (B, 3, H, W) tensor in [0, 1] for output_type="pt", or packed latents
    alphas: list[list[float]]  # per scene, per ref
    label: str = ""  # "tiny-random" etc.: what made these images


class ComposePipeline:
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
    def from_model_dir(
        cls, model_dir: ModelDir | str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> ComposePipeline:
        md = as_model_dir(model_dir)
        md.check()
        defaults = md.sampling_defaults()  # a bad value fails before any weights load
        dims = preflight_weights("compose", md.root, dtype, device)  # sizes that cannot fit, before anything is built
        adapter = CompositionAdapter.from_pretrained(md.root / ADAPTER_FOLDER).to(device=device, dtype=dtype)
        transformer = load_transformer(md, dtype=dtype, device=device)
        pipe = cls(
            ConditionedFlux(transformer, adapter),
            TextEncoder.load(md, dtype=dtype, device=device),
            ImageEncoder.load(md, dtype=dtype, device=device),
            Vae.load(md, dtype=dtype, device=device),
            label=md.output_label(),  # after loading: a tiny dir's warning is for a pipeline that exists
            defaults=defaults,
        )
        pipe.memory_dims = dims
        return pipe

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------------------------------ preparation
    def encode_references(self, scene: Scene) -> ImageEmbeddings:
        """(R, C) CLIP, (R, G) DINO CLS, (R, P, G) DINO patches; each distinct image file once (storyboards)."""
        return encode_references(self.image_encoder, scene, self._ref_cache)

    def prepare(
        self,
        scene: Scene,
        negative_prompt: str | None = None,
        max_text_tokens: int | None = None,
        *,
        layout_rows: bool = True,
    ) -> PreparedScene:
        """Everything the scene needs at every step, built once (`compose.prepare.prepare_scene`)."""
        return prepare_scene(
            self.model,
            self.text_encoder,
            scene,
            self.encode_references(scene),
            max_text_tokens=self.defaults.resolve(max_text_tokens=max_text_tokens).max_text_tokens,
            negative_prompt=negative_prompt,
            use_modulation=self.use_modulation,
            layout_rows=layout_rows,
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
            return self.model(
                x,
                text.t5.to(self.dtype),
                text.pooled.to(self.dtype),
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
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        image: Image.Image | None = None,
        strength: float = 1.0,
        schedule: str = "shifted",
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        progress: bool = False,
    ) -> ComposeOutput:
        """Generate one image per scene. A list of scenes is a storyboard: shared references are encoded once.

        Seeds (integers in [0, 2**64)): `generator`, else `seed`, else the scene's own `seed`, else 0; scene k of a
        storyboard uses seed + k. At most `sampling.MAX_STEPS` steps; scales must be finite numbers >= 0.
        `ref_guidance_scale` (1 = off) and `noise_temperature` (a factor on the starting noise, drawn or `latents`;
        1 = the noise as is): None takes `self.defaults`, the model dir's (docs/sampling.md).
        """
        if output_type not in ("pil", "pt", "latent"):
            raise ValidationError([Problem("output_type", output_type, "must be one of pil, pt, latent")])
        check_call(num_inference_steps, seed, guidance_scale, true_cfg_scale)
        used = self.defaults.resolve(ref_guidance_scale=ref_guidance_scale, noise_temperature=noise_temperature)
        scenes = [scene] if isinstance(scene, Scene) else list(scene)
        for sc in scenes if self.memory_dims is not None else ():  # refuse what cannot fit before any work
            request = Request("compose", sc.height, sc.width, refs=len(sc.refs), device=str(self.device))
            preflight(request, self.memory_dims)
        images, alphas = [], []
        for k, sc in enumerate(scenes):
            prepared = self.prepare(
                sc, negative_prompt if use_true_cfg(true_cfg_scale, negative_prompt is not None) else None
            )
            h, w = prepared.grid
            shape = (1, h * w, self.vae.latent_channels * 4)
            if latents is not None:
                check_finite("latents", latents)
                noise = latents.to(self.device, torch.float32)
            else:
                base = seed if seed is not None else (sc.seed if sc.seed is not None else 0)
                seeded = (base + k) % MAX_SEED  # a storyboard's scene k: seed + k, wrapping at 2**64
                noise = make_noise(shape, generator=generator) if generator else make_noise(shape, seed=seeded)
            if used.noise_temperature != 1.0:
                noise = noise * used.noise_temperature
            timesteps = self.defaults.timesteps(num_inference_steps, h * w, schedule)
            x = noise.to(self.device)
            if image is not None:
                timesteps = strength_timesteps(timesteps, strength)
                x0 = pack_latents(self.vae.encode(pil_to_tensor(image.resize((sc.width, sc.height))).to(self.device)))
                x = noise_latents(x0.float(), x.float(), float(timesteps[0]))
            layout_steps = math.ceil(used.grounding_ratio * (len(timesteps) - 1))
            velocity = self.velocity_fn(prepared, guidance_scale, true_cfg_scale, layout_steps, used.ref_guidance_scale)
            out = denoise(velocity, x.to(self.dtype), timesteps, callback=callback_on_step_end, progress=progress)
            alphas.append(prepared.alphas)
            if output_type == "latent":
                images.append(out)
                continue
            with torch.no_grad():
                pixels = self.vae.decode(unpack_latents(out, h * 2, w * 2))
            images.extend(tensor_to_pil(pixels) if output_type == "pil" else [((pixels.clamp(-1, 1) + 1) / 2)[0]])
        if output_type == "pt":
            images = torch.stack(images)
        return ComposeOutput(images=images, alphas=alphas, label=self.label)
