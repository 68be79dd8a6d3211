"""Fill training (seed 004, DESIGN 7) as a `TrainTask` for the shared trainer: toy-world triptychs, the in-context
diptych (or single-panel) FLUX-Fill input, the SemanticCrossAttention on the noisy latent, and peft LoRA on the
transformer's attention projections. Everything else (VAE, text encoders, FLUX weights) stays frozen.

Loss: rectified flow, x_t = (1 - t) x0 + t noise, target noise - x0, MSE over the generated tokens (the diptych's
context panel is excluded by default: it is pinned at sampling time, so its velocity is never used).
Stages: "all" (LoRA + semantic attention, the seed's joint training), "lora", "semantic".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from PIL import Image

from moviepostproduction.encoders import TextEncoder, Vae, load_transformer
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.files import write_json_atomic
from moviepostproduction.fill.model import (
    FillChannels,
    FillFlux,
    arrange,
    context_tokens,
    expand_to_fill,
    fill_condition,
    masked_image,
    pack_mask,
)
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.fill.semantic_attention import (
    RESIDUAL_ON,
    SemanticAttentionConfig,
    SemanticCrossAttention,
    SemanticTokens,
    grid_positions,
)
from moviepostproduction.fill.weights import FillWeightsConfig, LoraSpec, save_fill_weights, staged_fill_dir
from moviepostproduction.model_dir import ModelDir, as_model_dir
from moviepostproduction.noise import make_noise
from moviepostproduction.sampling import latent_image_ids, noise_latents, pack_latents, text_ids
from moviepostproduction.toyworld.triptych import TriptychBatch, TriptychConfig, collate, make_triptych
from moviepostproduction.training.task import LossOutput
from moviepostproduction.training.vary_objective import TIMESTEP_SAMPLING, sample_timesteps

logger = logging.getLogger(__name__)

__all__ = ["FillTask", "FillTaskConfig", "export_fill_model_dir"]

STAGES = ("all", "lora", "semantic")


@dataclass(frozen=True)
class FillTaskConfig:
    layout: str = "diptych"
    triptych: TriptychConfig = field(default_factory=TriptychConfig)
    data_seed: int = 0  # toy-world stream; the trainer's seed only orders the batches
    scenes: int = 512  # triptychs per epoch
    batch_size: int = 4
    lora: LoraSpec | None = field(default_factory=LoraSpec)
    semantic: bool = True
    semantic_heads: int = 8
    semantic_positional: bool = True
    semantic_locality: float = 0.0  # SemanticAttentionConfig.locality of a fresh module (0: none)
    semantic_residual_on: str = "latent"  # SemanticAttentionConfig.residual_on: "latent" (seed) or "condition"
    train_x_embedder: bool = False  # needed when starting from a plain (non-fill) transformer
    lora_lr: float = 1e-4
    semantic_lr: float = 1e-4
    x_embedder_lr: float = 1e-4
    guidance: float = 30.0  # FLUX guidance embedding, as FluxFillPipeline's default at sampling
    loss_on: str = "target"  # "target": generated tokens only; "all": every token (the seed)
    hole_weight: float = 1.0  # loss weight of the generated tokens inside the hole, relative to the others
    semantic_gate_init: float = 0.0  # the SemanticCrossAttention gate of a fresh module (0: identity at init)
    timestep_sampling: str = "logit_normal"
    max_text_tokens: int = 64
    sample_count: int = 2
    sample_steps: int = 8

    def __post_init__(self) -> None:
        checks = [
            ("layout", self.layout in ("single", "diptych"), "must be single or diptych"),
            ("loss_on", self.loss_on in ("target", "all"), "must be target or all"),
            ("timestep_sampling", self.timestep_sampling in TIMESTEP_SAMPLING, f"must be one of {TIMESTEP_SAMPLING}"),
            ("scenes", self.scenes >= self.batch_size >= 1, "needs scenes >= batch_size >= 1"),
            ("max_text_tokens", self.max_text_tokens >= 1, "must be >= 1"),
            ("hole_weight", math.isfinite(self.hole_weight) and self.hole_weight > 0, "must be a positive number"),
            ("semantic_gate_init", math.isfinite(self.semantic_gate_init), "must be a finite number"),
            ("semantic_residual_on", self.semantic_residual_on in RESIDUAL_ON, f"must be one of {RESIDUAL_ON}"),
            (
                "semantic_locality",
                math.isfinite(self.semantic_locality) and self.semantic_locality >= 0,
                "must be >= 0",
            ),
        ]
        problems = [Problem(name, getattr(self, name), msg) for name, ok, msg in checks if not ok]
        if problems:
            raise ValidationError(problems, source="FillTaskConfig")


class FillTask:
    """Trains LoRA + SemanticCrossAttention (+ x_embedder) of a FLUX-Fill transformer on toy-world triptychs."""

    name = "fill"

    def __init__(self, transformer: torch.nn.Module, vae: Vae, text_encoder: TextEncoder, cfg: FillTaskConfig):
        self.cfg, self.vae, self.text_encoder = cfg, vae, text_encoder
        self.channels = FillChannels.from_vae(vae.latent_channels, vae.downsample)
        transformer.requires_grad_(False)
        if cfg.lora is not None:
            transformer.add_adapter(cfg.lora.config())
        semantic = None
        if cfg.semantic:
            sem_cfg = SemanticAttentionConfig(
                self.channels.latent,
                self.channels.latent,
                cfg.semantic_heads,
                cfg.semantic_positional,
                locality=cfg.semantic_locality,
                residual_on=cfg.semantic_residual_on,
            )
            semantic = SemanticCrossAttention(sem_cfg).to(next(transformer.parameters()).device)
            with torch.no_grad():
                semantic.gate.fill_(cfg.semantic_gate_init)
        self.model = FillFlux(transformer, semantic)

    @classmethod
    def from_model_dir(cls, model_dir: ModelDir | str | Path, cfg: FillTaskConfig | None = None) -> FillTask:
        """A fill model dir, or a plain FLUX dir whose transformer is widened (then train_x_embedder must be on)."""
        cfg = cfg or FillTaskConfig()
        md = as_model_dir(model_dir)
        vae = Vae.load(md)
        channels = FillChannels.from_vae(vae.latent_channels, vae.downsample)
        transformer = load_transformer(md)
        if int(transformer.config.in_channels) == channels.latent:
            if not cfg.train_x_embedder:
                raise ValidationError(
                    [
                        Problem(
                            "train_x_embedder",
                            False,
                            f"must be true: {md.transformer} is a "
                            "plain FLUX transformer, its widened condition columns start at zero "
                            "and only train with x_embedder",
                        )
                    ]
                )
            transformer = expand_to_fill(transformer, channels)
        return cls(transformer, vae, TextEncoder.load(md), cfg)

    # --------------------------------------------------------------------------------------------- protocol
    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"transformer": self.model.transformer, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.model.semantic is not None:
            mods["semantic"] = self.model.semantic
        return mods

    def param_groups(self, stage: str) -> list[dict[str, Any]]:
        if stage not in STAGES:
            raise ValidationError([Problem("stage", stage, f"fill stages are {', '.join(STAGES)}")])
        for module in self.modules().values():
            module.requires_grad_(False)
        groups = []
        tr = self.model.transformer
        if stage in ("all", "lora") and self.cfg.lora is not None:
            lora = [p for n, p in tr.named_parameters() if "lora_" in n]
            groups.append({"params": lora, "lr": self.cfg.lora_lr})
        if stage in ("all", "lora") and self.cfg.train_x_embedder:
            groups.append({"params": list(tr.x_embedder.parameters()), "lr": self.cfg.x_embedder_lr})
        if stage in ("all", "semantic") and self.model.semantic is not None:
            groups.append({"params": list(self.model.semantic.parameters()), "lr": self.cfg.semantic_lr})
        if not groups:
            raise ValidationError([Problem("stage", stage, "trains nothing with this FillTaskConfig")])
        for group in groups:
            for p in group["params"]:
                p.requires_grad_(True)
        return groups

    def batches(self, epoch: int, seed: int):
        order = torch.randperm(self.cfg.scenes, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        size = self.cfg.batch_size
        for start in range(0, self.cfg.scenes - size + 1, size):  # drop the ragged tail: equal batch sizes
            indices = order[start : start + size].tolist()
            yield collate([make_triptych(i, self.cfg.data_seed, self.cfg.triptych) for i in indices])

    def loss(self, batch: TriptychBatch, generator: torch.Generator) -> LossOutput:
        cfg, device = self.cfg, self.device
        arranged = arrange(cfg.layout, batch.target.to(device), batch.mask.to(device))
        b, f2 = batch.target.shape[0], 2 * self.vae.downsample
        grid = (arranged.image.shape[-2] // f2, arranged.image.shape[-1] // f2)
        with torch.no_grad():
            x0 = pack_latents(self.vae.encode(arranged.image)).float()  # (B, N, 4C)
            condition = fill_condition(
                self.vae.encode(masked_image(arranged.image, arranged.mask)), arranged.mask, self.vae.downsample
            )
            semantic = self.semantic_tokens(batch.semantic.to(device)) if self.model.semantic is not None else None
            text = self.text_encoder.encode(batch.captions, cfg.max_text_tokens)
        t = sample_timesteps(b, generator, cfg.timestep_sampling).to(device)  # (B,)
        noise = make_noise(x0.shape, generator=generator, device=device)
        x_t = noise_latents(x0, noise, t)
        guidance = None
        if self.model.transformer.config.guidance_embeds:
            guidance = torch.full((b,), cfg.guidance, device=device)
        v = self.model(
            x_t,
            condition,
            t,
            text.t5,
            text.pooled,
            latent_image_ids(*grid, device=device),
            text_ids(text.t5.shape[1], device=device),
            guidance,
            semantic=semantic,
            latent_positions=grid_positions(*grid, arranged.panels, device=device),
        )
        err = (v.float() - (noise - x0)).pow(2).mean(dim=-1)  # (B, N)
        weight = self.token_weights(batch.mask.to(device), grid)  # (B, N)
        loss = (err * weight).sum() / weight.sum()
        logs = {"flow": float(loss.detach())}
        if self.model.semantic is not None:
            logs["gate"] = float(self.model.semantic.gate.detach())
        return LossOutput(loss, logs)

    def samples(self, generator: torch.Generator) -> Image.Image | None:
        """Rows of [visible | fill | target | semantic] for held-out triptychs, `sample_steps` Euler steps each."""
        from moviepostproduction.visualize import image_grid

        cfg, was_training = self.cfg, self.model.training
        pipe = FillPipeline(self.model, self.vae, self.text_encoder, layout=cfg.layout)
        tiles = []
        try:
            for i in range(cfg.sample_count):
                tri = make_triptych(i, cfg.data_seed, cfg.triptych, split="heldout")
                out = pipe(
                    tri.target,
                    tri.mask,
                    semantic=tri.semantic if self.model.semantic is not None else None,
                    prompt=tri.caption,
                    num_inference_steps=cfg.sample_steps,
                    generator=generator,
                    guidance_scale=cfg.guidance,
                    max_text_tokens=cfg.max_text_tokens,
                )
                tiles += [
                    Image.fromarray(a) for a in (tri.visible, np.asarray(out.images[0]), tri.target, tri.semantic)
                ]
        finally:
            self.model.train(was_training)
        return image_grid(tiles, columns=4)

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.transformer.parameters()).device

    def token_weights(self, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N) loss weights over the arranged token grid from the hole `mask` (B, 1, H, W): 0 on the diptych's
        context panel when loss_on is "target", `hole_weight` on the generated tokens of the hole, 1 elsewhere."""
        cfg, h = self.cfg, grid[0]
        hole = pack_mask(mask, self.vae.downsample).amax(dim=-1) > 0  # (B, h * w / panels) tokens touching the hole
        if cfg.layout == "diptych":  # the generated panel repeats the hole; the context panel carries its mask
            hole = rearrange(hole, "b (h w) -> b h w", h=h).repeat(1, 1, 2).flatten(1)
        weight = 1.0 + (cfg.hole_weight - 1.0) * hole.float()
        if cfg.loss_on == "target":
            weight = weight * (~context_tokens(cfg.layout, grid, device=mask.device)).float()
        return weight

    def semantic_tokens(self, pixels: torch.Tensor) -> SemanticTokens:
        latents = self.vae.encode(pixels)  # (B, C, h, w)
        return SemanticTokens(
            pack_latents(latents), grid_positions(latents.shape[-2] // 2, latents.shape[-1] // 2, device=latents.device)
        )

    def weights_config(self) -> FillWeightsConfig:
        sem = self.model.semantic.cfg if self.model.semantic is not None else None
        return FillWeightsConfig(self.cfg.layout, sem, self.cfg.lora, self.cfg.train_x_embedder)

    def save(self, root: str | Path) -> Path:
        """Write the trained parts as `root/fill/` (see fill/weights.py)."""
        return save_fill_weights(root, self.model, self.weights_config())


def export_fill_model_dir(task: FillTask, source: str | Path, out: str | Path, steps: int | None = None) -> Path:
    """A fill model dir for `FillPipeline`: `source` copied, its transformer widened when it was a plain one, and
    the task's trained parts in fill/. The frozen base weights are re-read from `source`, never from the LoRA-wrapped
    training copy. model_index.json's label names the fill training (`steps`) and the dir it started from."""
    md, out = as_model_dir(source), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValidationError([Problem("out", out, "must be absent or empty")])
    with staged_fill_dir(md.root, out, replace=True) as (tmp, _):  # replaces an empty `out` only
        task.save(tmp)
        if md.index:
            run = f"{steps} steps" if steps is not None else "mpp train"
            label = f"fill model ({run}, task fill) on {md.index.get('label') or md.root.name}"
            write_json_atomic({**md.index, "label": label}, tmp / "model_index.json")
    return out
