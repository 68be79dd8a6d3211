"""Seam ratios of every panorama setting on the seam probe and on a random tiny FLUX (docs/panorama.md table).

    .venv/bin/python scripts/measure_panorama_seams.py --batch 64 --height 128 --steps 1 --seed 0

CPU, about a minute. The probe (`tests/panorama_probe.py`) generates smooth random content whose
coherence comes from RoPE alone; the random tiny FLUX (tiny.py sizes) shows that untrained weights cannot
show a seam. Both decode with the same random tiny VAE (tiny.py sizes). Ratios are pooled over the batch
(the images stacked vertically), so one number per setting: 1.0 = the seam is like any other column step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from moviepostproduction.encoders import Vae
from moviepostproduction.panorama.pipeline import PanoramaPipeline
from moviepostproduction.panorama.seams import seam_ratio
from moviepostproduction.panorama.wrap import PanoramaConfig
from moviepostproduction.toyworld.tiny import tiny_configs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the seam probe is a test fixture
from panorama_probe import ProbeConfig, build_seam_probe  # noqa: E402

SETTINGS = {
    "nothing (pad 0, stock RoPE, zero-padded VAE)": PanoramaConfig(pad=0, circular_vae=False),
    "circular VAE only": PanoramaConfig(pad=0),
    "default: pad 1 opposite ids (DiT360) + circular VAE": PanoramaConfig(),
    "pad 1 continuous ids + circular VAE": PanoramaConfig(pad_ids="continuous"),
    "pad 2 continuous ids + circular VAE": PanoramaConfig(pad=2, pad_ids="continuous"),
    "roll random + circular VAE": PanoramaConfig(pad=0, roll="random"),
    "periodic RoPE, zero-padded VAE": PanoramaConfig(pad=0, periodic_rope=True, circular_vae=False),
    "periodic RoPE + circular VAE": PanoramaConfig(pad=0, periodic_rope=True),
    "periodic RoPE + pad 1 + circular VAE": PanoramaConfig(periodic_rope=True),
}


def seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def measure(model, vae, config: PanoramaConfig, args, text_dim: int, pooled_dim: int) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(args.seed)
    text = torch.randn(args.batch, 1, text_dim, generator=gen)
    pooled = torch.randn(args.batch, pooled_dim, generator=gen)
    pipe = PanoramaPipeline(model, vae, config=config)
    out = pipe(
        prompt_embeds=text, pooled_prompt_embeds=pooled, height=args.height, num_inference_steps=args.steps,
        seed=args.seed,
    )  # fmt: skip
    pixels = np.concatenate(list(out.images.permute(0, 2, 3, 1).numpy()))  # (B H, W, 3): one tall image
    latents = np.concatenate(list(out.latents.permute(0, 2, 3, 1).numpy()))  # (B h, w, C)
    return seam_ratio(pixels), seam_ratio(pixels, rotated=True), seam_ratio(latents, period=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    tiny = tiny_configs()
    vae = Vae(seeded(args.seed, lambda: AutoencoderKL(**tiny.vae)))
    probe_cfg = ProbeConfig(latent_channels=vae.latent_channels)
    models = {
        "probe": (build_seam_probe(probe_cfg), probe_cfg.text_dim, probe_cfg.pooled_dim),
        "random": (
            seeded(args.seed, lambda: FluxTransformer2DModel(**tiny.transformer)),
            tiny.transformer["joint_attention_dim"],
            tiny.transformer["pooled_projection_dim"],
        ),
    }
    print(f"batch {args.batch}, {args.height}x{2 * args.height}, {args.steps} step(s), seed {args.seed}")
    print("| setting | model | seam ratio | rotated view | latent (token boundaries) |")
    print("|---|---|---|---|---|")
    for name, config in SETTINGS.items():
        for label, (model, text_dim, pooled_dim) in models.items():
            px, rot, lat = measure(model, vae, config, args, text_dim, pooled_dim)
            print(f"| {name} | {label} | {px:.2f} | {rot:.2f} | {lat:.2f} |")


if __name__ == "__main__":
    main()
