"""`VaryTask`: trains NanoDiT (`mpp vary`, seed 003) on cached toy-world features through the shared Trainer.

One micro-batch: the scenes' clean latents are the target; each sample's DINO input is, with probability
`ref_prob`, its foreground sprite's reference image, else the scene itself; the caption is the scene's. The loss
is `flow_matching_loss` with CFG dropout (training/vary.py). Stages: `full` (every parameter), `warm` (every
parameter at half the learning rate, the seed's advice after a warm start from a pre-patch checkpoint) and
`patch` (only the new `patch_*` parameters).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.sampling import is_probability
from moviepostproduction.toyworld.sprites import COLOURS
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.vary_metrics import colour_presence, feature_swap, reconstruction_error, text_only
from moviepostproduction.training.task import LossOutput
from moviepostproduction.training.vary_data import VaryFeatures, build_vary_features, scene_signature
from moviepostproduction.training.vary_objective import TIMESTEP_SAMPLING, DropoutProbs, flow_matching_loss
from moviepostproduction.vary.nanodit import PRESETS, NanoDiT, NanoDiTConfig, VaryConditioning

__all__ = ["STAGES", "VaryTask", "VaryTaskConfig", "build_vary_task", "nanodit_config_for", "validate_vary"]

STAGES = {"full": 1.0, "warm": 0.5, "patch": 1.0}  # stage -> learning-rate factor


@dataclass
class VaryTaskConfig:
    batch_size: int = 32
    lr: float = 3e-4
    ref_prob: float = 0.5  # samples whose DINO input is the fg sprite's reference image instead of the scene
    uncond: float = 0.10  # CFG dropout (seed 003 defaults, DropoutProbs)
    text_only: float = 0.30
    image_only: float = 0.05
    both: float = 0.55
    timestep_sampling: str = "logit_normal"
    sample_steps: int = 12  # Euler steps of the sample grid
    num_preview: int = 4  # rows of the sample grid
    text_scale: float = 4.0  # dual CFG of the sample grid
    image_scale: float = 1.5

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(Problem("batch_size", self.batch_size, "must be an integer >= 1"))
        if not is_probability(self.ref_prob):
            problems.append(Problem("ref_prob", self.ref_prob, "must be a probability in [0, 1]"))
        if self.timestep_sampling not in TIMESTEP_SAMPLING:
            problems.append(Problem("timestep_sampling", self.timestep_sampling, f"one of {TIMESTEP_SAMPLING}"))
        if problems:
            raise ValidationError(problems, source="VaryTaskConfig")
        self.dropout  # noqa: B018 - validates the four probabilities

    @property
    def dropout(self) -> DropoutProbs:
        return DropoutProbs(self.uncond, self.text_only, self.image_only, self.both)


def nanodit_config_for(features: VaryFeatures, base: NanoDiTConfig | str = "toy") -> NanoDiTConfig:
    """`base` (a config or a preset name) with the latent and encoder sizes of `features`."""
    base = PRESETS[base] if isinstance(base, str) else base
    _, channels, h, w = features.latents.shape
    if h != w:
        raise ValidationError([Problem("latents", (h, w), "vary trains on square scenes")])
    return base.with_(
        in_channels=channels,
        sample_size=h,
        text_dim=features.text.shape[-1],
        dino_dim=features.scene_cls.shape[-1],
        dino_patches=features.scene_patches.shape[1],
    )


def _conditioning(feats: dict[str, torch.Tensor], use_ref: torch.Tensor) -> VaryConditioning:
    """Per sample, the reference image's DINO features where `use_ref` (B,) is True, else the scene's."""
    cls = torch.where(use_ref[:, None], feats["ref_cls"], feats["scene_cls"])  # (B, G)
    patches = torch.where(use_ref[:, None, None], feats["ref_patches"], feats["scene_patches"])  # (B, P, G)
    return VaryConditioning(feats["text"], feats["text_mask"], cls, patches)


def _pil(pixels: torch.Tensor, size: int) -> Image.Image:
    """(3, H, W) uint8 or [0, 1] float -> a PIL image of side `size`."""
    if pixels.is_floating_point():
        pixels = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
    image = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
    return image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)


class VaryTask:
    """TrainTask (training/task.py) for NanoDiT; the VAE only decodes the sample grid."""

    name = "vary"

    def __init__(
        self,
        model: NanoDiT,
        features: VaryFeatures,
        vae: nn.Module | None = None,
        config: VaryTaskConfig | None = None,
        preview: VaryFeatures | None = None,
    ):
        self.model, self.features, self.vae = model, features, vae
        self.config = config or VaryTaskConfig()
        self.preview = preview or features
        want, got = nanodit_config_for(features, model.config), model.config
        problems = [
            Problem(f"model.config.{f.name}", getattr(got, f.name), f"the features need {getattr(want, f.name)}")
            for f in fields(NanoDiTConfig)
            if getattr(got, f.name) != getattr(want, f.name) and f.name != "sample_size"
        ]
        if problems:
            raise ValidationError(problems, source="VaryTask")

    # ---------------------------------------------------------------------------------------- protocol
    def modules(self) -> dict[str, nn.Module]:
        return {"nanodit": self.model, **({"vae": self.vae} if isinstance(self.vae, nn.Module) else {})}

    def param_groups(self, stage: str) -> list[dict[str, Any]]:
        if stage not in STAGES:
            raise ValidationError([Problem("stage", stage, f"vary stages are {', '.join(STAGES)}")])
        if self.vae is not None:
            self.vae.requires_grad_(False)
        self.model.train()
        for name, p in self.model.named_parameters():
            p.requires_grad_(stage != "patch" or name.startswith("patch_"))
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params, "lr": self.config.lr * STAGES[stage]}]

    def batches(self, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        """Sample indices (batch_size,) in a shuffled order fixed by (seed, epoch); the last partial batch dropped."""
        n, bs = len(self.features), self.config.batch_size
        if n < bs:
            raise ValidationError([Problem("batch_size", bs, f"exceeds the {n} cached scenes")])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        for i in range(0, n - bs + 1, bs):
            yield order[i : i + bs]

    def loss(self, batch: torch.Tensor, generator: torch.Generator) -> LossOutput:
        device = self.model.device
        feats = {k: v.to(device) for k, v in self.features.select(batch).items()}
        use_ref = torch.rand(len(batch), generator=generator, device=generator.device) < self.config.ref_prob
        cond = _conditioning(feats, use_ref.to(device))
        loss = flow_matching_loss(
            self.model,
            feats["latents"],
            cond,
            generator,
            probs=self.config.dropout,
            timestep_sampling=self.config.timestep_sampling,
        )
        return LossOutput(loss, {"flow": float(loss.detach()), "ref_share": float(use_ref.float().mean())})

    @torch.no_grad()
    def samples(self, generator: torch.Generator) -> Image.Image | None:
        """Rows of [reference | target scene | from scene features | from reference | text only], held-out."""
        from moviepostproduction.vary.pipeline import VaryPipeline
        from moviepostproduction.visualize import image_grid

        if self.vae is None:
            return None
        was_training = self.model.training
        self.model.eval()
        n = min(self.config.num_preview, len(self.preview))
        feats = {k: v.to(self.model.device) for k, v in self.preview.select(torch.arange(n)).items()}
        pipe = VaryPipeline(self.model, decode=self.vae.decode)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=generator.device))
        common = dict(
            text_scale=self.config.text_scale,
            image_scale=self.config.image_scale,
            num_inference_steps=self.config.sample_steps,
            seed=seed,
            output_type="pt",
        )
        text = dict(text_embeds=feats["text"], text_mask=feats["text_mask"])
        scene = pipe(**text, image_cls=feats["scene_cls"], image_patches=feats["scene_patches"], **common).images
        ref = pipe(**text, image_cls=feats["ref_cls"], image_patches=feats["ref_patches"], **common).images
        words = pipe(**text, image_cls=None, image_patches=None, **common).images
        self.model.train(was_training)
        size = feats["pixels"].shape[-1]
        cells = [
            _pil(img, size)
            for i in range(n)
            for img in (feats["ref_pixels"][i], feats["pixels"][i], scene[i], ref[i], words[i])
        ]
        return image_grid(cells, columns=5)


# --------------------------------------------------------------------------------------------- building
def build_vary_task(
    model_dir: str | Path,
    *,
    n: int,
    seed: int = 0,
    world: ToyWorldConfig | None = None,
    max_text_tokens: int = 80,
    preview_n: int = 8,
    cache_dir: str | Path | None = None,
    base: NanoDiTConfig | str = "toy",
    config: VaryTaskConfig | None = None,
    init_seed: int = 0,
    progress: bool = True,
) -> VaryTask:
    """Encoders and VAE of `model_dir` -> cached features of n train scenes (and `preview_n` held-out ones) ->
    a fresh NanoDiT sized for them (`base` preset, initialised from `init_seed`) -> the task.

    With `cache_dir`, features are read from / written to `cache_dir/{train,heldout}.safetensors`.
    """
    from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
    from moviepostproduction.model_dir import as_model_dir

    md = as_model_dir(model_dir)
    world = world or ToyWorldConfig(size=64)
    text, image, vae = TextEncoder.load(md), ImageEncoder.load(md), Vae.load(md)

    def features(split: str, count: int) -> VaryFeatures:
        meta = scene_signature(md.root, world, seed, split, count, max_text_tokens)
        path = Path(cache_dir) / f"{split}.safetensors" if cache_dir is not None else None
        if path is not None and path.is_file():
            return VaryFeatures.load(path, expect=meta)
        feats = build_vary_features(
            count, seed, text, image, vae, world=world, split=split, max_text_tokens=max_text_tokens, progress=progress
        )
        if path is not None:
            feats.save(path, meta)
        return feats

    train, preview = features("train", n), features("heldout", preview_n)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = NanoDiT(nanodit_config_for(train, base))
    return VaryTask(model, train, vae, config, preview)


# ------------------------------------------------------------------------------------------- validation
@torch.no_grad()
def validate_vary(
    model: NanoDiT,
    features: VaryFeatures,
    vae: nn.Module,
    *,
    n: int = 16,
    steps: int = 28,
    seed: int = 0,
    text_scale: float = 4.0,
    image_scale: float = 1.5,
) -> dict[str, float]:
    """The three validations on the first n scenes of `features` (held-out), all with the same noise:
    reconstruction (own scene features + caption), feature swap (caption of i, scene features of i + 1) and
    text only (image dropped); plus the colour of the fg sprite in each mode."""
    from moviepostproduction.vary.pipeline import VaryPipeline

    n = min(n, len(features))
    if n < 2:
        raise ValidationError([Problem("n", n, "the feature swap needs at least 2 scenes")])
    model.eval()
    feats = {k: v.to(model.device) for k, v in features.select(torch.arange(n)).items()}
    swap = torch.roll(torch.arange(n), -1).to(model.device)  # scene i gets the features of scene i + 1
    pipe = VaryPipeline(model, decode=vae.decode)
    common = dict(text_scale=text_scale, image_scale=image_scale, num_inference_steps=steps, seed=seed)
    text = dict(text_embeds=feats["text"], text_mask=feats["text_mask"])

    def run(**inputs) -> np.ndarray:
        images = pipe(**text, **inputs, **common, output_type="pt").images  # (n, 3, H, W) in [0, 1]
        return images.permute(0, 2, 3, 1).numpy()

    own = run(image_cls=feats["scene_cls"], image_patches=feats["scene_patches"])
    swapped = run(image_cls=feats["scene_cls"][swap], image_patches=feats["scene_patches"][swap])
    words = run(image_cls=None, image_patches=None)
    target = feats["pixels"].permute(0, 2, 3, 1).cpu().numpy()  # (n, H, W, 3) uint8
    names = [list(COLOURS)[int(i)] for i in feats["fg_colour"]]
    swap_score = feature_swap(swapped, target[swap.cpu().numpy()], target)
    words_score = text_only(words, own, target)
    return {
        "reconstruction_mse": float(reconstruction_error(own, target).mean()),
        "swap_mse_to_features": swap_score.to_features,
        "swap_mse_to_caption": swap_score.to_caption,
        "swap_follows_features": swap_score.follows_features,
        "text_only_mse": words_score.error_text_only,
        "text_only_image_gain": words_score.image_gain,
        "fg_colour_with_image": colour_presence(own, names),
        "fg_colour_text_only": colour_presence(words, names),
    }
