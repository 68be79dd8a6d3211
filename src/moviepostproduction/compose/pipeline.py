"""ComposePipeline: a scene (caption + placed references) -> one image, FLUX-style `__call__` (DESIGN 1, 3, 4)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.compose.conditioning import Conditioning, RefBatch, without_modulation
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import DEPTHS, CompositionAdapter
from moviepostproduction.encoders import (
    ImageEmbeddings,
    ImageEncoder,
    TextEmbeddings,
    TextEncoder,
    Vae,
    load_transformer,
)
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.model_dir import ModelDir, as_model_dir
from moviepostproduction.sampling import (
    cfg,
    euler_sample,
    get_timesteps,
    latent_image_ids,
    make_noise,
    noise_latents,
    pack_latents,
    positive_problem,
    scale_problem,
    strength_timesteps,
    text_ids,
    unpack_latents,
    use_true_cfg,
)
from moviepostproduction.scene import Scene

logger = logging.getLogger(__name__)

ADAPTER_FOLDER = "adapter"
TOKEN_PIXELS = 16  # VAE 8x downsampling x FLUX 2x2 packing


@dataclass
class ComposeOutput:
    images: list  # PIL images, or a (B, 3, H, W) tensor in [0, 1] for output_type="pt", or packed latents
    alphas: list[list[float]]  # per scene, per ref
    label: str = ""  # "tiny-random" etc.: what made these images


@dataclass
class PreparedScene:
    """Everything a scene needs at every step; built once per scene (DESIGN 3, caching)."""

    text: TextEmbeddings
    conditioning: Conditioning
    negative: TextEmbeddings | None = None
    negative_conditioning: Conditioning | None = None
    grid: tuple[int, int] = (0, 0)
    alphas: list[float] = field(default_factory=list)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise ValidationError([Problem(name, "NaN/Inf", "contains non-finite values")])


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class ComposePipeline:
    """Frozen encoders + VAE + `ConditionedFlux`. Use `from_model_dir` to load the real on-disk layout."""

    def __init__(
        self,
        model: ConditionedFlux,
        text_encoder: TextEncoder,
        image_encoder: ImageEncoder,
        vae: Vae,
        label: str = "",
        max_text_tokens: int = 512,
        ref_guidance_scale: float = 1.0,
        image_position_scale: float = 1.0,
        noise_temperature: float = 1.0,
    ):
        self.model = model.eval()
        self.max_text_tokens = max_text_tokens  # T5 length; model dirs trained shorter say so in model_index.json
        self.ref_guidance_scale = ref_guidance_scale  # default of __call__; model dirs may name theirs
        self.image_position_scale = image_position_scale  # RoPE step between image tokens (model_index.json)
        self.noise_temperature = noise_temperature  # factor on the starting noise; default of __call__
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
        adapter = CompositionAdapter.from_pretrained(md.root / ADAPTER_FOLDER).to(device=device, dtype=dtype)
        transformer = load_transformer(md, dtype=dtype, device=device)
        label = (
            "tiny-random (untrained weights: the image is noise)" if md.tiny_random else str(md.index.get("label", ""))
        )
        if md.tiny_random:
            logger.warning("model dir %s holds tiny random weights: the output is noise, not a picture", md.root)
        return cls(
            ConditionedFlux(transformer, adapter),
            TextEncoder.load(md, dtype=dtype, device=device),
            ImageEncoder.load(md, dtype=dtype, device=device),
            Vae.load(md, dtype=dtype, device=device),
            label=label,
            max_text_tokens=md.max_text_tokens,
            ref_guidance_scale=md.ref_guidance_scale,
            image_position_scale=md.image_position_scale,
            noise_temperature=md.noise_temperature,
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # ------------------------------------------------------------------------------------------ preparation
    def encode_references(self, scene: Scene) -> ImageEmbeddings:
        """(R, C) CLIP embeds, (R, G) DINO CLS and (R, P, G) DINO patch tokens; each distinct image file is encoded
        once (storyboards)."""
        keys = [(str(r.image), r.image.stat().st_mtime_ns) for r in scene.refs]
        todo = [i for i, k in enumerate(keys) if k not in self._ref_cache]
        if todo:
            images = scene.load_ref_images()
            emb: ImageEmbeddings = self.image_encoder.encode([images[i] for i in todo])
            for j, i in enumerate(todo):
                self._ref_cache[keys[i]] = ImageEmbeddings(emb.clip[j], emb.dino_cls[j], emb.dino_patches[j])
        if not keys:
            return self.image_encoder.encode([])
        return ImageEmbeddings(
            *(torch.stack([getattr(self._ref_cache[k], f.name) for k in keys]) for f in fields(ImageEmbeddings))
        )

    def prepare(
        self, scene: Scene, negative_prompt: str | None = None, max_text_tokens: int | None = None
    ) -> PreparedScene:
        max_text_tokens = max_text_tokens or self.max_text_tokens
        grid = (scene.height // TOKEN_PIXELS, scene.width // TOKEN_PIXELS)
        text, spans, _ = self.text_encoder.encode_spans(scene.caption, [r.caption for r in scene.refs], max_text_tokens)
        emb = self.encode_references(scene)
        check_finite("refs (CLIP features)", emb.clip)
        check_finite("refs (DINO features)", emb.dino_cls)
        patches = emb.dino_patches if self.model.adapter.uses_box_patches else None
        if patches is not None:
            check_finite("refs (DINO patch features)", patches)
        n, t = len(scene.refs), text.t5.shape[1]
        text_spans = torch.zeros(1, n, t, dtype=torch.bool)
        for i, span in enumerate(spans):
            if span is not None:
                text_spans[0, i, span[0] : span[1]] = True
        refs = RefBatch(
            bboxes=torch.tensor([[list(r.bbox) for r in scene.refs]], dtype=torch.float32).view(1, n, 4),
            depth=torch.tensor([[DEPTHS.index(r.depth) for r in scene.refs]], dtype=torch.long).view(1, n),
            valid=torch.ones(1, n, dtype=torch.bool),
            clip=emb.clip[None].float().cpu(),
            dino=emb.dino_cls[None].float().cpu(),
            text_spans=text_spans,
            dino_patches=patches[None].float().cpu() if patches is not None else None,
        )
        adapter = self.model.adapter
        with torch.no_grad():
            cond = adapter.prepare(refs.to(self.device, self.dtype), grid, t)
            if not self.use_modulation:
                cond = without_modulation(cond)
            prepared = PreparedScene(text=text, conditioning=cond, grid=grid, alphas=cond.alpha[0].tolist())
            if negative_prompt is not None:
                neg = self.text_encoder.encode([negative_prompt], max_text_tokens)
                refs.text_spans = None
                prepared.negative = neg
                prepared.negative_conditioning = adapter.prepare(
                    refs.to(self.device, self.dtype), grid, neg.t5.shape[1]
                )
                if not self.use_modulation:
                    prepared.negative_conditioning = without_modulation(prepared.negative_conditioning)
        return prepared

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
        img_ids = latent_image_ids(h, w, scale=self.image_position_scale, device=self.device, dtype=self.dtype)
        guidance_embeds = bool(self.model.transformer.config.guidance_embeds)
        calls = {"n": 0}

        def run(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings, cond: Conditioning | None) -> torch.Tensor:
            guidance = torch.full_like(t, guidance_scale) if guidance_embeds else None
            return self.model(
                x,
                text.t5.to(self.dtype),
                text.pooled.to(self.dtype),
                t.to(self.dtype),
                img_ids,
                text_ids(text.t5.shape[1], device=self.device, dtype=self.dtype),
                guidance,
                conditioning=cond,
                layout_active=self.use_layout and calls["n"] < layout_steps,
            )

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                v = run(x, t, prepared.text, prepared.conditioning)
                if ref_guidance_scale != 1.0:
                    v = cfg(run(x, t, prepared.text, None), v, ref_guidance_scale)
                if prepared.negative is not None and use_true_cfg(true_cfg_scale, True):
                    v = cfg(run(x, t, prepared.negative, prepared.negative_conditioning), v, true_cfg_scale)
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

        Seeds: `generator`, else `seed`, else the scene's own `seed`, else 0; scene k of a storyboard uses seed + k.
        `ref_guidance_scale`: None takes the pipeline's default (the model dir's `ref_guidance_scale`, else 1 = off).
        `noise_temperature`: the starting noise (drawn, or `latents`) is multiplied by it before sampling; None takes
        the pipeline's default (the model dir's `noise_temperature`, else 1 = the noise as is).
        """
        if output_type not in ("pil", "pt", "latent"):
            raise ValidationError([Problem("output_type", output_type, "must be one of pil, pt, latent")])
        ref_guidance_scale = self.ref_guidance_scale if ref_guidance_scale is None else ref_guidance_scale
        if problem := scale_problem("ref_guidance_scale", ref_guidance_scale):
            raise ValidationError([problem])
        temperature = self.noise_temperature if noise_temperature is None else noise_temperature
        if problem := positive_problem("noise_temperature", temperature):
            raise ValidationError([problem])
        scenes = [scene] if isinstance(scene, Scene) else list(scene)
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
                noise = make_noise(shape, generator=generator) if generator else make_noise(shape, seed=base + k)
            if temperature != 1.0:
                noise = noise * temperature
            timesteps = get_timesteps(num_inference_steps, image_seq_len=h * w, schedule=schedule)
            x = noise.to(self.device)
            if image is not None:
                timesteps = strength_timesteps(timesteps, strength)
                x0 = pack_latents(self.vae.encode(pil_to_tensor(image.resize((sc.width, sc.height))).to(self.device)))
                x = noise_latents(x0.float(), x.float(), float(timesteps[0]))
            layout_steps = math.ceil(self.model.adapter.cfg.grounding_ratio * (len(timesteps) - 1))
            velocity = self.velocity_fn(prepared, guidance_scale, true_cfg_scale, layout_steps, ref_guidance_scale)
            out = euler_sample(velocity, x.to(self.dtype), timesteps, callback=callback_on_step_end, progress=progress)
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
