"""The four compose losses (DESIGN 5): flow matching, identity, bbox alignment and region preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def sample_times(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B,) logit-normal(0, 1) training times in (0, 1), as SD3 / FLUX training."""
    return torch.sigmoid(torch.randn(batch, generator=generator, device=device))


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp(min=1e-6)


def flow_loss(velocity: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_t = (1 - t) x0 + t noise, target v = noise - x0; MSE in float32. Each (B, N, C)."""
    return F.mse_loss(velocity.float(), (noise - x0).float())


def predicted_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 implied by a velocity at time t: x_t - t v (exact for the linear path). t is (B,)."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * velocity


def crop_boxes(pixels: torch.Tensor, bboxes: torch.Tensor, size: int) -> torch.Tensor:
    """Differentiable crops: pixels (B, 3, H, W), bboxes (B, R, 4) normalised xyxy -> (B * R, 3, size, size)."""
    b, r, _ = bboxes.shape
    x0, y0, x1, y1 = bboxes.float().unbind(-1)  # each (B, R)
    theta = torch.zeros(b, r, 2, 3, device=pixels.device)
    theta[..., 0, 0] = x1 - x0
    theta[..., 0, 2] = x0 + x1 - 1
    theta[..., 1, 1] = y1 - y0
    theta[..., 1, 2] = y0 + y1 - 1
    grid = F.affine_grid(theta.view(b * r, 2, 3), [b * r, 3, size, size], align_corners=False)
    source = pixels.float().repeat_interleave(r, dim=0)  # (B * R, 3, H, W)
    return F.grid_sample(source, grid, align_corners=False, padding_mode="border")


def identity_loss(crop_dino: torch.Tensor, ref_dino: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """1 - cos(DINO CLS of the generated crop, DINO CLS of the ref), weighted (10 alpha for fg refs)."""
    cos = F.cosine_similarity(crop_dino.float(), ref_dino.float(), dim=-1)  # (B, R)
    return weighted_mean(1 - cos, weights)


def soft_argmax_centre(
    patches: torch.Tensor, patch_grid: tuple[int, int], ref: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Where each ref is in the image: softmax over patches of cos(patch, ref) -> expected centre (B, R, 2) xy."""
    ph, pw = patch_grid
    sim = F.normalize(ref.float(), dim=-1) @ F.normalize(patches.float(), dim=-1).transpose(1, 2)  # (B, R, P)
    weights = torch.softmax(sim / temperature, dim=-1)
    ys, xs = torch.meshgrid(
        (torch.arange(ph, device=ref.device) + 0.5) / ph,
        (torch.arange(pw, device=ref.device) + 0.5) / pw,
        indexing="ij",
    )
    centres = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # (P, 2)
    return weights @ centres


def bbox_alignment_loss(
    patches: torch.Tensor, patch_grid: tuple[int, int], ref: torch.Tensor, bboxes: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """L1 between the soft-argmax centre of each ref in the image and its bbox centre, weighted by 1 - alpha."""
    found = soft_argmax_centre(patches, patch_grid, ref)  # (B, R, 2)
    centre = rearrange(bboxes.float(), "b r (p c) -> b r p c", p=2).mean(-2)  # (B, R, 2)
    return weighted_mean((found - centre).abs().sum(-1), weights)


def region_preservation_loss(with_all: torch.Tensor, without: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """Mean squared change, on tokens outside the dropped refs' boxes, from dropping those refs.

    with_all / without (B, N, C) velocities; outside (B, N) bool. `without` is a target (detached).
    """
    diff = (with_all.float() - without.detach().float()).pow(2).mean(-1)  # (B, N)
    return weighted_mean(diff, outside.float())
