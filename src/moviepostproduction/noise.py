"""Starting noise drawn as diffusers draws it, so a seed gives the image a diffusers user gets with that seed.

diffusers' FluxPipeline.prepare_latents draws `randn_tensor((B, C, 2 (H // 16), 2 (W // 16)))` in the pipeline's
dtype, on the generator's device (a CPU generator draws on the CPU and the tensor is then moved), one draw for the
whole batch (or one per generator in a list), and packs it 2x2 into tokens. `seed` here means what a diffusers
user writes: `torch.Generator("cpu").manual_seed(seed)`. Packed `latents=` (B, N, 4C) are accepted as FluxPipeline
accepts them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from moviepostproduction.errors import Problem
from moviepostproduction.sampling import MAX_SEED, SamplingValueError, pack_latents, require_valid, seed_problem

__all__ = [
    "Generators",
    "batch_problem",
    "check_packed_latents",
    "diffusers_latent_hw",
    "draw_latents",
    "draw_packed",
    "make_noise",
    "seeded_generator",
]

Generators = torch.Generator | Sequence[torch.Generator]


def batch_problem(field: str, value: object) -> Problem | None:
    """The problem with a number of images per prompt, if any: an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return Problem(field, value, "must be an integer >= 1")
    return None


def diffusers_latent_hw(height: int, width: int, vae_factor: int = 8) -> tuple[int, int]:
    """The VAE latent size FluxPipeline samples for an image of height x width pixels: 2 (H // 2f), 2 (W // 2f)."""
    return 2 * (int(height) // (2 * vae_factor)), 2 * (int(width) // (2 * vae_factor))


def seeded_generator(seed: int | None, offset: int = 0) -> torch.Generator:
    """`torch.Generator("cpu").manual_seed(seed + offset)` (None: seed 0), wrapping at 2**64 (a storyboard's k)."""
    require_valid(seed_problem("seed", seed))
    return torch.Generator("cpu").manual_seed((int(seed or 0) + offset) % MAX_SEED)


def draw_latents(
    shape: Sequence[int],
    generator: Generators,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """diffusers' randn_tensor: standard normal `shape` in `dtype`, drawn on the generator's device and moved to
    `device`; with a list of generators (one per batch item) each draws its own item."""
    shape = tuple(int(s) for s in shape)
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
    generators = list(generator)
    if len(generators) == 1:
        return draw_latents(shape, generators[0], dtype=dtype, device=device)
    if len(generators) != shape[0]:
        raise SamplingValueError([Problem("generator", len(generators), f"need one generator per image ({shape[0]})")])
    items = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device) for g in generators]
    return torch.cat(items)


def draw_packed(
    batch: int,
    channels: int,
    latent_hw: tuple[int, int],
    generator: Generators,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """FluxPipeline.prepare_latents' noise: drawn (B, C, h, w) then packed to (B, (h/2)(w/2), 4C)."""
    return pack_latents(draw_latents((batch, channels, *latent_hw), generator, dtype=dtype, device=device))


def make_noise(
    shape: Sequence[int],
    *,
    generator: Generators | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training noise: standard normal `shape` from exactly one of `generator` (or one per batch item) or `seed`,
    drawn in float32 on the generator's device and then cast and moved, so a seed gives the same noise on every
    device and dtype. The pipelines draw with `draw_latents` instead (diffusers' dtype and shape)."""
    if (generator is None) == (seed is None):
        raise SamplingValueError([Problem("seed", seed, "give exactly one of generator or seed")])
    gen = seeded_generator(seed) if seed is not None else generator
    if not isinstance(gen, torch.Generator) and len(list(gen)) != shape[0]:
        raise SamplingValueError(
            [Problem("generator", len(list(gen)), f"need one generator per batch item ({shape[0]})")]
        )
    return draw_latents(shape, gen, dtype=torch.float32, device="cpu").to(device=device, dtype=dtype)


def check_packed_latents(latents: torch.Tensor, expected: Sequence[int], field: str = "latents") -> None:
    """A user's starting latents must be packed FLUX tokens of the expected shape (B, N, 4C), and finite."""
    expected = tuple(int(s) for s in expected)
    if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise SamplingValueError([Problem(field, shape, f"must be packed latents of shape {expected} (B, N, 4C)")])
    if not bool(torch.isfinite(latents).all()):
        raise SamplingValueError([Problem(field, "NaN/Inf", "contains non-finite values")])
