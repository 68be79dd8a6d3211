"""The toy VAE (a real diffusers AutoencoderKL): reconstruction + small KL on random crops of toy scenes, then
FLUX-style latent normalisation (shift and scaling factors measured on training scenes).

The VAE is fully convolutional, so it trains on cheap 64 px crops and runs on whole 128 px scenes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from moviepostproduction.training.task import LossOutput
from moviepostproduction.visualize import image_grid

__all__ = [
    "LatentStats",
    "VaeTask",
    "VaeTrainConfig",
    "latent_stats",
    "psnr",
    "reconstruct",
    "reconstruct_uint8",
    "reconstruction_grid",
]


@dataclass(frozen=True)
class VaeTrainConfig:
    crop: int = 64  # training crop side (a multiple of the VAE's 8x)
    batch_size: int = 8
    batches_per_epoch: int = 256
    lr: float = 1e-3
    kl_weight: float = 1e-4  # per latent element, against per-pixel L1 + L2: keeps the posterior tight, not N(0, 1)


def to_signed(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], the range Vae.encode expects."""
    return pixels.float() / 127.5 - 1.0


STAGES = ("vae", "decoder")  # the whole autoencoder; or the decoder alone, on the frozen encoder's latents


class VaeTask:
    """TrainTask: the AutoencoderKL on random crops (with flips) of a pool of toy scene images.

    Stage "vae" trains the whole autoencoder. Stage "decoder" trains the decoder (and post-quant conv) alone: the
    encoder, hence the latent space and its shift / scale, stay exactly as they are, so a backbone trained on
    those latents stays valid while its images get sharper.
    """

    def __init__(
        self,
        vae: nn.Module,
        pool: torch.Tensor,
        cfg: VaeTrainConfig | None = None,
        preview=None,
        name: str = "toy_vae",
    ):
        self.vae, self.name = vae, name
        self.stage = "vae"
        self.pool = pool  # (N, 3, H, W) uint8 scene images
        self.cfg = cfg or VaeTrainConfig()
        self.preview = preview  # (K, 3, H, W) uint8 images shown by samples(), or None
        h, w = pool.shape[-2:]
        if self.cfg.crop > min(h, w) or self.cfg.crop % 8:
            raise ValueError(f"crop {self.cfg.crop} must be a multiple of 8 and <= the scene size {h}x{w}")

    def modules(self) -> dict[str, nn.Module]:
        return {"vae": self.vae}

    def param_groups(self, stage: str) -> list[dict[str, Any]]:
        if stage not in STAGES:
            raise ValueError(f"VaeTask stage {stage!r}: expected one of {', '.join(STAGES)}")
        self.stage = stage
        self.vae.requires_grad_(stage == "vae").train()
        if stage == "vae":
            return [{"params": list(self.vae.parameters()), "lr": self.cfg.lr}]
        self.vae.encoder.eval()
        decoder = [self.vae.decoder] + [m for m in (getattr(self.vae, "post_quant_conv", None),) if m is not None]
        params = [p for m in decoder for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return [{"params": params, "lr": self.cfg.lr}]

    def batches(self, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        """(B, 3, crop, crop) in [-1, 1]: a pure function of (seed, epoch, batch index)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        n, _, h, w = self.pool.shape
        c, b = self.cfg.crop, self.cfg.batch_size
        for _ in range(self.cfg.batches_per_epoch):
            idx = torch.randint(n, (b,), generator=g)
            ys = torch.randint(h - c + 1, (b,), generator=g)
            xs = torch.randint(w - c + 1, (b,), generator=g)
            flip = torch.rand(b, generator=g) < 0.5
            crops = torch.stack([self.pool[i, :, y : y + c, x : x + c] for i, y, x in zip(idx, ys, xs, strict=True)])
            crops = torch.where(flip[:, None, None, None], crops.flip(-1), crops)
            yield to_signed(crops)

    def loss(self, batch: torch.Tensor, generator: torch.Generator) -> LossOutput:
        x = batch.to(next(self.vae.parameters()).device)
        with torch.set_grad_enabled(self.stage == "vae"):
            posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator)  # (B, C, h, w): decoding noisy latents keeps the decoder robust
        rec = self.vae.decode(z).sample
        l1, l2 = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = posterior.kl().mean() / z[0].numel()  # per latent element (a constant in stage "decoder")
        loss = l1 + l2 + self.cfg.kl_weight * kl
        return LossOutput(loss, {k: float(v.detach()) for k, v in (("l1", l1), ("l2", l2), ("kl", kl))})

    def samples(self, generator: torch.Generator) -> Image.Image | None:
        del generator  # the grid decodes posterior modes
        if self.preview is None:
            return None
        was_training = self.vae.training
        self.vae.eval()
        grid = reconstruction_grid(self.vae, self.preview)
        self.vae.train(was_training)
        return grid


@torch.no_grad()
def reconstruct(vae: nn.Module, pixels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 reconstructions in [-1, 1] from the posterior mode."""
    device = next(vae.parameters()).device
    out = []
    for chunk in pixels.split(batch):
        z = vae.encode(to_signed(chunk).to(device)).latent_dist.mode()
        out.append(vae.decode(z).sample.clamp(-1, 1).cpu())
    return torch.cat(out)


def reconstruct_uint8(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> uint8 (N, 3, H, W) posterior-mode reconstructions."""
    return ((reconstruct(vae, pixels) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def psnr(vae: nn.Module, pixels: torch.Tensor) -> float:
    """Mean PSNR (dB, peak 255) of posterior-mode reconstructions of uint8 (N, 3, H, W) images."""
    rec = (reconstruct(vae, pixels) + 1) * 127.5  # (N, 3, H, W) in [0, 255]
    mse = ((rec - pixels.float()) ** 2).flatten(1).mean(1)  # (N,)
    return float((10 * torch.log10(255.0**2 / mse.clamp_min(1e-10))).mean())


@dataclass(frozen=True)
class LatentStats:
    mean: float
    std: float

    @property
    def shift_factor(self) -> float:
        return self.mean

    @property
    def scaling_factor(self) -> float:
        return 1.0 / self.std


@torch.no_grad()
def latent_stats(vae: nn.Module, pixels: torch.Tensor, batch: int = 16) -> LatentStats:
    """Mean and std over every element of the posterior modes of uint8 (N, 3, H, W) images.

    FLUX normalises latents as (z - shift_factor) * scaling_factor; with shift = mean and scale = 1 / std
    the normalised latents of these images have mean 0 and variance 1.
    """
    device = next(vae.parameters()).device
    zs = [vae.encode(to_signed(c).to(device)).latent_dist.mode().double().cpu() for c in pixels.split(batch)]
    z = torch.cat(zs)
    return LatentStats(mean=float(z.mean()), std=float(z.std(correction=0)))


def reconstruction_grid(vae: nn.Module, pixels: torch.Tensor) -> Image.Image:
    """Originals (top row) over their reconstructions (bottom row)."""
    rec = reconstruct_uint8(vae, pixels)
    pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in torch.cat([pixels, rec])]
    return image_grid(pil, columns=max(1, math.ceil(len(pil) / 2)))
