"""Training objective of NanoDiT (`mpp vary`): CFG dropout and the rectified-flow loss (seed 003, DESIGN 4-5).

Each sample independently falls in one of four conditioning cases, so that one model learns every velocity
that dual CFG needs at sampling time: v(none), v(text), v(image), v(text, image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.noise import make_noise
from moviepostproduction.sampling import is_probability, noise_latents
from moviepostproduction.vary.nanodit import VaryConditioning

__all__ = ["TIMESTEP_SAMPLING", "DropoutProbs", "flow_matching_loss", "sample_dropout", "sample_timesteps"]

TIMESTEP_SAMPLING = ("logit_normal", "uniform")


class DropoutValueError(ValidationError, ValueError):
    """Bad dropout probabilities or loss options: an `MppError` for the CLI, a `ValueError` for callers."""


@dataclass(frozen=True)
class DropoutProbs:
    """Probability of each conditioning case per training sample; must sum to 1 (seed 003 defaults).

    `text_only` keeps the text and drops the image (CLS and patches together); `image_only` the reverse.
    """

    uncond: float = 0.10
    text_only: float = 0.30
    image_only: float = 0.05
    both: float = 0.55

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        problems = [
            Problem(k, v, "must be a probability in [0, 1]") for k, v in values.items() if not is_probability(v)
        ]
        total = math.fsum(values.values()) if not problems else 1.0  # only numbers in range are summed
        if abs(total - 1.0) > 1e-6:
            problems.append(Problem("dropout", values, f"probabilities sum to {total:g}, not 1"))
        if problems:
            raise DropoutValueError(problems, source="DropoutProbs")


def sample_dropout(
    batch: int, probs: DropoutProbs | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw each sample's case: (drop_text, drop_image), each (batch,) bool on the generator's device.

    Image dropping is one flag, so the DINO CLS and the DINO patches are always dropped together.
    """
    probs = probs or DropoutProbs()
    device = generator.device if generator is not None else "cpu"
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)  # (B,) in [0, 1)
    edges = torch.tensor(
        [probs.uncond, probs.uncond + probs.text_only, probs.uncond + probs.text_only + probs.image_only],
        dtype=torch.float64,
        device=device,
    )
    case = torch.bucketize(u, edges, right=True)  # 0 uncond, 1 text only, 2 image only, 3 both
    drop_text = (case == 0) | (case == 2)
    drop_image = (case == 0) | (case == 1)
    return drop_text, drop_image


def sample_timesteps(batch: int, generator: torch.Generator | None = None, mode: str = "logit_normal") -> torch.Tensor:
    """(batch,) float32 training times in (0, 1): logit-normal(0, 1) (SD3, Esser et al. 2024) or uniform."""
    if mode not in TIMESTEP_SAMPLING:
        raise DropoutValueError([Problem("timestep_sampling", mode, f"expected one of {', '.join(TIMESTEP_SAMPLING)}")])
    device = generator.device if generator is not None else "cpu"
    if mode == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    return torch.sigmoid(torch.randn(batch, generator=generator, device=device))


def flow_matching_loss(
    model: torch.nn.Module,
    x0: torch.Tensor,
    cond: VaryConditioning,
    generator: torch.Generator | None = None,
    *,
    probs: DropoutProbs | None = None,
    timestep_sampling: str = "logit_normal",
) -> torch.Tensor:
    """Rectified-flow MSE with CFG dropout: x_t = (1 - t) x0 + t noise, target noise - x0 (scalar, float32).

    x0 (B, C, H, W) clean latents; `cond` holds the B samples' precomputed text / DINO features. All the
    randomness (cases, times, noise) comes from `generator`, so a seeded generator reproduces the loss.
    """
    b = x0.shape[0]
    if cond.batch_size != b:
        raise DropoutValueError([Problem("cond", cond.batch_size, f"batch size differs from x0's {b}")])
    drop_text, drop_image = sample_dropout(b, probs, generator)
    t = sample_timesteps(b, generator, timestep_sampling).to(x0.device)  # (B,)
    noise = (
        make_noise(x0.shape, generator=generator, device=x0.device) if generator is not None else torch.randn_like(x0)
    )
    x0 = x0.float()
    x_t = noise_latents(x0, noise.float(), t)  # (B, C, H, W)
    v = model(
        x_t,
        t,
        text=cond.text,
        text_mask=cond.text_mask,
        cls=cond.cls,
        patches=cond.patches,
        drop_text=drop_text.to(x0.device),
        drop_image=drop_image.to(x0.device),
    )
    return F.mse_loss(v.float(), noise.float() - x0)
