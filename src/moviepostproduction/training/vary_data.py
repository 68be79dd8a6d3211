"""Cached encoder features of toy-world scenes for NanoDiT (`mpp vary`, seed 003).

The frozen encoders of a model dir run once per scene, never per training step: the scene's VAE latents (the
target), the caption's T5 states and mask, and DINO CLS + patch tokens of two possible image inputs, the scene
itself and its foreground sprite's reference image (the sprite alone on white, as `mpp vary --ref` gets it).
Scenes come from `toyworld/synthetic.generate_scene`, a pure function of (index, seed, split, world config), so a
cache is identified by those plus the model dir, and one built for anything else is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.errors import WeightsError
from moviepostproduction.files import load_safetensors, read_metadata, save_safetensors
from moviepostproduction.toyworld.synthetic import COLOURS, ToyScene, ToyWorldConfig, generate_scene

__all__ = ["CACHE_VERSION", "VaryFeatures", "build_vary_features", "encode_scenes", "scene_signature"]

CACHE_VERSION = "1"


@dataclass
class VaryFeatures:
    """N scenes. T text tokens, G DINO width, P DINO patches; latents in the VAE's normalised space."""

    latents: torch.Tensor  # (N, C, h, w) clean latents of the scene
    text: torch.Tensor  # (N, T, Dt) T5 states of the caption
    text_mask: torch.Tensor  # (N, T) bool, True on real tokens
    scene_cls: torch.Tensor  # (N, G) DINO CLS of the scene
    scene_patches: torch.Tensor  # (N, P, G)
    ref_cls: torch.Tensor  # (N, G) DINO CLS of the foreground sprite's reference image
    ref_patches: torch.Tensor  # (N, P, G)
    pixels: torch.Tensor  # (N, 3, H, W) uint8 scene images (targets for the validation metrics)
    ref_pixels: torch.Tensor  # (N, 3, R, R) uint8 reference images (shown in sample grids)
    fg_colour: torch.Tensor  # (N,) long: the foreground sprite's colour, an index into data.sprites.COLOURS

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch: every tensor field indexed by `index`; features as float32."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)[index]
            out[f.name] = value.float() if value.is_floating_point() else value
        return out

    def save(self, path: str | Path, meta: dict[str, str]) -> Path:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["text_mask"] = state["text_mask"].to(torch.uint8)
        return save_safetensors(state, path, metadata={**meta, "version": CACHE_VERSION})

    @classmethod
    def load(cls, path: str | Path, expect: dict[str, str]) -> VaryFeatures:
        """Read a cache; a field of `expect` that differs from the file's metadata is a WeightsError."""
        meta = read_metadata(path)
        for key, want in {**expect, "version": CACHE_VERSION}.items():
            if meta.get(key) != want:
                raise WeightsError(
                    f"{path}: vary feature cache was built with {key}={meta.get(key)!r}, not {want!r}; "
                    "delete it to rebuild"
                )
        state = load_safetensors(path, "a vary feature cache")
        state["text_mask"] = state["text_mask"].bool()
        return cls(**{f.name: state[f.name] for f in fields(cls)})


def scene_signature(model_dir: str | Path, world: ToyWorldConfig, seed: int, split: str, n: int, tokens: int):
    """The metadata that identifies a cache: what a cache built for other values would not match."""
    import json

    return {
        "model": str(Path(model_dir).resolve()),
        "world": json.dumps(world.to_dict(), sort_keys=True),
        "seed": str(seed),
        "split": split,
        "n": str(n),
        "max_text_tokens": str(tokens),
    }


def _chw(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8


@torch.no_grad()
def encode_scenes(scenes: Sequence[ToyScene], text_encoder, image_encoder, vae, max_text_tokens: int) -> dict:
    """Features of a list of scenes (one batch of the cache build), as float16 / bool / uint8 tensors."""
    pixels = _chw([s.image for s in scenes])
    refs = [s.refs[0].image for s in scenes]  # refs[0] is the front sprite (fg)
    latents = vae.encode(pixels.float() / 127.5 - 1.0)  # (B, C, h, w), the posterior mode
    text = text_encoder.encode([s.caption for s in scenes], max_t5_tokens=max_text_tokens)
    scene = image_encoder.encode([Image.fromarray(s.image) for s in scenes])
    ref = image_encoder.encode([Image.fromarray(r) for r in refs])
    half = {
        "latents": latents,
        "text": text.t5,
        "scene_cls": scene.dino_cls,
        "scene_patches": scene.dino_patches,
        "ref_cls": ref.dino_cls,
        "ref_patches": ref.dino_patches,
    }
    out = {k: v.detach().cpu().to(torch.float16) for k, v in half.items()}
    colours = torch.tensor([list(COLOURS).index(s.refs[0].colour) for s in scenes])
    return {**out, "text_mask": text.t5_mask.cpu(), "pixels": pixels, "ref_pixels": _chw(refs), "fg_colour": colours}


def build_vary_features(
    n: int,
    seed: int,
    text_encoder,
    image_encoder,
    vae,
    *,
    world: ToyWorldConfig | None = None,
    split: str = "train",
    max_text_tokens: int = 80,
    batch_size: int = 32,
    progress: bool = True,
) -> VaryFeatures:
    """Encode scenes 0 .. n-1 of the `split` stream of `seed`."""
    from tqdm import tqdm

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    world = world or ToyWorldConfig()
    parts = []
    for start in tqdm(range(0, n, batch_size), desc=f"vary features {split}", disable=not progress):
        scenes = [generate_scene(i, seed, world, split=split) for i in range(start, min(n, start + batch_size))]
        parts.append(encode_scenes(scenes, text_encoder, image_encoder, vae, max_text_tokens))
    return VaryFeatures(**{f.name: torch.cat([p[f.name] for p in parts]) for f in fields(VaryFeatures)})
