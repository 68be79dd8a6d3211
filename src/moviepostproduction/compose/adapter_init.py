"""A fresh composition adapter for a stock FLUX folder: an adapter folder sized from the FLUX and encoder configs.

Every new branch starts at zero (DESIGN 2, `CompositionAdapter.reset_parameters`), so FLUX with a fresh
adapter samples exactly as stock FLUX until the adapter is trained (`mpp train`). The sizes come from
`transformer/config.json` (width = heads x head dim, double and single blocks) and the image encoders' configs
(CLIP `projection_dim`, DINOv2 `hidden_size`); everything else keeps ConditioningConfig's FLUX.1-dev defaults.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import torch

from moviepostproduction.adapter_dir import write_index
from moviepostproduction.compose.modules import CompositionAdapter, ConditioningConfig
from moviepostproduction.encoders.single_file import CONFIG_ROOT, VARIANTS
from moviepostproduction.errors import WeightsError
from moviepostproduction.files import staged_copy
from moviepostproduction.model_dir import IMAGE_COMPONENTS, ModelDir, as_model_dir, read_json

ENCODER_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")  # configs, weights, vocabularies: no pickles


def adapter_config(md: ModelDir) -> ConditioningConfig:
    """The ConditioningConfig that fits the dir's transformer and image encoders (a one-line error per bad file)."""
    configs = {
        "transformer": md.transformer / "config.json",
        "clip": md.image_clip / "config.json",
        "dino": md.image_dino / "config.json",
    }
    tr = read_json(configs["transformer"], "a FluxTransformer2DModel config", md.root)
    clip = read_json(configs["clip"], "a CLIP config (CLIPModel or CLIPVisionModelWithProjection)", md.root)
    dino = read_json(configs["dino"], "a DINOv2 config", md.root)
    sizes = {
        ("transformer", "num_attention_heads"): tr.get("num_attention_heads"),
        ("transformer", "attention_head_dim"): tr.get("attention_head_dim"),
        ("transformer", "num_layers"): tr.get("num_layers"),
        ("transformer", "num_single_layers"): tr.get("num_single_layers"),
        ("clip", "projection_dim"): clip.get("projection_dim"),
        ("dino", "hidden_size"): dino.get("hidden_size"),
    }
    for (file, key), value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65536:
            raise WeightsError(f"{configs[file]}: {key} must be an integer in [1, 65536] (got {str(value)[:40]!r})")
    return ConditioningConfig(
        hidden_dim=tr["num_attention_heads"] * tr["attention_head_dim"],
        num_double_blocks=tr["num_layers"],
        num_single_blocks=tr["num_single_layers"],
        clip_dim=clip["projection_dim"],
        dino_dim=dino["hidden_size"],
    )


def _copy_encoder(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for pattern in ENCODER_FILES:
        for file in sorted(source.glob(pattern)):
            shutil.copy2(file, target / file.name)


def init_adapter(
    model_dir: str | Path,
    *,
    out: str | Path,
    clip: str | Path | None = None,
    dino: str | Path | None = None,
    copy_encoders: bool = False,
    seed: int = 0,
    overwrite: bool = False,
):
    """Write a fresh (zero-initialised branches) adapter for the FLUX folder `model_dir` (or a FLUX.1 variant's name,
    flux1-dev / flux1-schnell / flux1-fill-dev, for users of single files) to `out`, with the CLIP and
    DINOv2 folders it uses (as downloaded; None: the model dir's image_encoders/) named in its adapter_index.json, or
    copied into it with `copy_encoders`. Written atomically (`files.staged_copy`): a failed write leaves no folder and
    an existing one whole. Returns (path, config)."""
    shipped = str(model_dir) in VARIANTS  # single files only (ComfyUI): the package's configs of that FLUX.1
    md = as_model_dir(CONFIG_ROOT / str(model_dir) if shipped else model_dir)
    target = Path(out).expanduser()
    if target.exists() and not overwrite:
        raise WeightsError(f"{target} exists; pass --overwrite to replace it with a fresh, untrained adapter")
    given = {"image_clip": clip, "image_dino": dino}
    md = replace(md, **{k: Path(v).expanduser().resolve() for k, v in given.items() if v is not None})
    md.check([*([] if shipped else ["transformer"]), *IMAGE_COMPONENTS])  # what loads later: checked before writing
    cfg = adapter_config(md)
    with staged_copy(None, target, replace=True) as folder, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CompositionAdapter(cfg).save_pretrained(folder)
        if copy_encoders:
            _copy_encoder(md.image_clip, folder / "image_encoders" / "clip")
            _copy_encoder(md.image_dino, folder / "image_encoders" / "dino")
            write_index(folder, clip=None, dino=None)
        else:
            write_index(folder, clip=str(md.image_clip.resolve()), dino=str(md.image_dino.resolve()))
    return target, cfg
