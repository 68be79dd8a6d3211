"""The toy-world model directory (DESIGN 6): the FLUX layout at toy size, with encoders trained on the toy world.

`TOY_SPEC` sizes every component for 128 px toy scenes and 64 px references; `write_toy_model_dir` writes the
standard layout (docs/model-directory.md) with the trained frozen parts (VAE, CLIP/T5 text encoders, CLIP/DINO
image encoders, see training/toy_encoders.py) and, until they are trained too, a random-init transformer and
adapter. model_index.json marks it `"toy_world": true` (never `tiny_random`), with the training stage reached.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from moviepostproduction.toyworld.tiny import TINY_MARKER, TinySpec, tiny_random_model_dir, write_tiny_model_dir

__all__ = [
    "TOY_MARKER",
    "TOY_SPEC",
    "TRAINED_BY_ENCODERS",
    "assemble_fill_model_dir",
    "default_fill_model_dir",
    "tiny_random_fill_dir",
    "toy_caption_words",
    "write_toy_model_dir",
]

TOY_MARKER = "toy_world"
TOY_DIR_VERSION = 1  # bump when TOY_SPEC or the trained components change

# FLUX at toy size: 4 heads x 32 = 128 wide, 2 double + 2 single blocks, no guidance embedding (not distilled);
# VAE 8x down with 16 latent channels;
# 2-layer 64-wide encoders; image encoders see 32 px (4 x 4 patches of 8 px): enough for pattern and shape.
TOY_SPEC = TinySpec(
    heads=4,
    head_dim=32,
    double_blocks=2,
    single_blocks=2,
    guidance_embeds=False,
    latent_channels=16,
    vae_channels=(32, 64, 64, 64),
    vae_groups=8,
    t5_dim=64,
    clip_text_dim=64,
    clip_vision_dim=64,
    clip_image_dim=64,
    dino_dim=64,
    encoder_layers=2,
    encoder_heads=4,
    image_size=32,
    patch_size=8,
)

# The sub-folders the encoder training writes; transformer/ and adapter/ are trained later by the backbone run.
TRAINED_BY_ENCODERS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "image_encoders/clip",
    "image_encoders/dino",
)


def toy_caption_words() -> set[str]:
    """Every word a toy-world caption can contain: palette, patterns, shapes, backgrounds and templates."""
    from moviepostproduction.toyworld.backgrounds import BACKGROUNDS
    from moviepostproduction.toyworld.synthetic import _PATTERN_WORDS, COLOURS, SHAPES

    templates = "a an and in front of behind on background scene with"
    words = [*COLOURS, *SHAPES, *_PATTERN_WORDS.values(), *BACKGROUNDS.values(), templates]
    return {w for phrase in words for w in re.findall(r"\w+", phrase)}


def write_toy_model_dir(
    path: str | Path,
    trained: Mapping[str, nn.Module],
    *,
    seed: int = 0,
    spec: TinySpec = TOY_SPEC,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a toy-world model dir at `path` (absent or empty) from trained components keyed by sub-folder.

    Every component of TRAINED_BY_ENCODERS must be given (a missing one would silently be random); the others
    (transformer/, adapter/) are random-init from `seed` unless given. `info` adds model_index.json keys.
    """
    missing = [name for name in TRAINED_BY_ENCODERS if name not in trained]
    if missing:
        raise KeyError(f"write_toy_model_dir needs trained {missing}; got {sorted(trained)}")
    stage = "backbone" if {"transformer", "adapter"} <= set(trained) else "encoders"
    label = "toy-world" if stage == "backbone" else "toy-world (encoders trained, transformer untrained)"
    index = {TINY_MARKER: False, TOY_MARKER: True, "_toy_version": TOY_DIR_VERSION, "_toy_stage": stage}
    index["label"] = label
    modules = dict(trained)
    if "adapter" not in modules:
        import torch

        from moviepostproduction.compose.modules import CompositionAdapter

        torch.manual_seed(seed)
        modules["adapter"] = CompositionAdapter(toy_adapter_config(spec))
    return write_tiny_model_dir(path, seed=seed, spec=spec, modules=modules, index={**index, **(info or {})})


def toy_adapter_config(spec: TinySpec = TOY_SPEC):
    """The toy model's adapter: the tiny derivation, widened so identity fits through the modulation path."""
    from moviepostproduction.toyworld.tiny import tiny_configs

    return tiny_configs(spec).adapter.with_(instance_dim=64, alpha_hidden=32, modulation_rank=16, feedback_rank=8)


def tiny_random_fill_dir(cache_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """`write_fill_model_dir` of a tiny random model dir (untrained: its fill is noise, and says so), built once
    into the cache: the fast fill model of tests and smoke runs."""
    from moviepostproduction.files import build_once
    from moviepostproduction.fill.weights import FILL_DIR_VERSION, write_fill_model_dir

    base = Path(tiny_random_model_dir(cache_dir, seed=seed))
    return build_once(
        base.with_name(f"{base.name}-fill-v{FILL_DIR_VERSION}"), lambda d: write_fill_model_dir(base, d, seed=seed)
    )


SHIPPED_FILL_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toy-fill"
FILL_ASSET_FILES = ("model_index.json", "fill/config.json")  # the rest is named by fill/config.json


def default_fill_model_dir(cache_dir: str | Path | None = None, *, assets: str | Path | None = None) -> Path:
    """The fill model used without `--model`: the toy-world fill model shipped in the package. The package holds
    only what fill training adds (`assets/toy-fill`: fill/ and model_index.json); the model dir is assembled once
    into the cache over the shipped toy model (`assemble_fill_model_dir`), in a folder named by the content of
    both, so an upgrade never reuses a stale copy. A missing asset is a WeightsError naming the path."""
    from moviepostproduction.errors import WeightsError
    from moviepostproduction.files import build_once
    from moviepostproduction.model_dir import default_cache_dir, default_model_dir
    from moviepostproduction.training.cache_key import encoder_fingerprint

    assets = Path(assets) if assets is not None else SHIPPED_FILL_ASSETS
    for name in FILL_ASSET_FILES:
        if not (assets / name).is_file():
            raise WeightsError(
                f"the shipped toy fill model is missing: {assets / name} (expected fill/ and model_index.json of "
                "the toy-world fill model; reinstall moviepostproduction or pass --model DIR)"
            )
    base = default_model_dir()
    key = encoder_fingerprint(assets)[:8] + encoder_fingerprint(base)[:8]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(cache / f"toy-fill-{key}", lambda d: assemble_fill_model_dir(base, assets, d))


FILL_BASE_FOLDER = "base"  # assets/toy-fill/base: the trained parts of the toy model the fill model was trained on


def assemble_fill_model_dir(base: str | Path, assets: str | Path, out: str | Path) -> Path:
    """A fill model dir at `out` from the plain model dir `base` it was trained on and its fill training's own
    files (`assets`: fill/ and model_index.json, as `export_fill_model_dir` wrote them): the same dir as that
    export, whose transformer is `base`'s widened to the fill input. When the shipped toy model has moved on since
    the fill model was trained, `assets` also holds base/ (that model's transformer/ and adapter/), which replace
    `base`'s folders of the same names first."""
    import shutil
    import tempfile

    from moviepostproduction.fill.weights import FILL_FOLDER, staged_fill_dir

    assets, out = Path(assets), Path(out)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-base-", dir=out.parent) as work:
        own = assets / FILL_BASE_FOLDER
        if own.is_dir():
            merged = Path(work) / "base"
            shutil.copytree(base, merged)
            for part in sorted(p for p in own.iterdir() if p.is_dir()):
                shutil.rmtree(merged / part.name, ignore_errors=True)
                shutil.copytree(part, merged / part.name)
            base = merged
        with staged_fill_dir(base, out) as (tmp, _):
            shutil.copytree(assets / FILL_FOLDER, tmp / FILL_FOLDER)
            shutil.copy2(assets / "model_index.json", tmp / "model_index.json")
    return out
