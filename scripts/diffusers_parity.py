"""Measure how far mpp's pipelines are from diffusers' on the tiny hub-layout replicas (docs/sampling.md, "Seeds and
parity with diffusers"): the same prompt, seed, steps, guidance and size through ComposePipeline / FillPipeline and
FluxPipeline / FluxFillPipeline, fp32 on the CPU. Prints one line per case: the max abs difference of the images
in [0, 1] (fill: of the final packed latents, and of the pixels inside the mask).

    .venv/bin/python scripts/diffusers_parity.py [--steps 3] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.compose.adapter_init import init_adapter
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.scene import scene_from_dict
from moviepostproduction.toyworld.replica import flux_replica
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PROMPT = "a blue square in the kitchen"
SQUARE = {"image": "refs/blue_square.png", "bbox": [0.25, 0.25, 0.75, 0.75], "depth": "fg", "caption": "a blue square"}


def with_adapter(variant: str, tmp: Path) -> ComposePipeline:
    root = tmp / variant
    shutil.copytree(flux_replica(variant=variant), root)
    shutil.copytree(tiny_random_model_dir() / "image_encoders", root / "image_encoders")
    init_adapter(root, out=root / "adapter")
    return ComposePipeline.from_model_dir(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from diffusers import FluxFillPipeline, FluxPipeline

    tmp = Path(tempfile.mkdtemp())
    for variant, guidance in (("dev", 3.5), ("schnell", 0.0)):
        ours = with_adapter(variant, tmp)
        theirs = FluxPipeline.from_pretrained(flux_replica(variant=variant), local_files_only=True)
        for refs, n in (([], 1), ([SQUARE], 1), ([SQUARE], 2)):
            scene = scene_from_dict({"caption": PROMPT, "width": 64, "height": 64, "refs": refs}, base_dir=EXAMPLES)
            worst = 0.0
            for seed in args.seeds:
                a = ours(scene, num_inference_steps=args.steps, guidance_scale=guidance, seed=seed,
                         num_images_per_prompt=n, output_type="pt").images  # fmt: skip
                b = theirs(PROMPT, height=64, width=64, num_inference_steps=args.steps, guidance_scale=guidance,
                           num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(seed),
                           max_sequence_length=ours.defaults.max_text_tokens, output_type="pt").images  # fmt: skip
                worst = max(worst, float((a - b).abs().max()))
            print(f"compose {variant:8s} refs {len(refs)} images {n}: image max abs diff {worst:.2e}")
    fill = FillPipeline.from_model_dir(flux_replica(variant="fill"))
    reference = FluxFillPipeline.from_pretrained(flux_replica(variant="fill"), local_files_only=True)
    rng = np.random.default_rng(0)
    plate = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    hole = np.zeros((64, 64), np.uint8)
    hole[16:48, 8:40] = 255
    mask, inside = Image.fromarray(hole), torch.from_numpy(hole > 0)
    worst_latent = worst_pixel = 0.0
    for seed in args.seeds:
        outs = {}
        for output_type in ("latent", "pt"):
            a = fill(plate, mask, prompt=PROMPT, num_inference_steps=args.steps, seed=seed, output_type=output_type)
            b = reference(PROMPT, image=plate, mask_image=mask, height=64, width=64, num_inference_steps=args.steps,
                          generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
                          max_sequence_length=fill.defaults.max_text_tokens)  # fmt: skip
            outs[output_type] = (a.images - b.images).abs()
        worst_latent = max(worst_latent, float(outs["latent"].max()))
        worst_pixel = max(worst_pixel, float(outs["pt"][..., inside].max()))
    print(f"fill     Fill-dev refs 0 images 1: latent max abs diff {worst_latent:.2e}, "
          f"pixels inside the mask {worst_pixel:.2e} (8-bit output)")  # fmt: skip


if __name__ == "__main__":
    main()
