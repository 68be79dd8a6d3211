"""A fresh composition adapter for a stock FLUX folder: `adapter/` sized from the folder's own configs.

Every new branch starts at zero (DESIGN 2, `CompositionAdapter.reset_parameters`), so a model dir with a fresh
adapter samples exactly as stock FLUX until the adapter is trained (`mpp train`). The sizes come from
`transformer/config.json` (width = heads x head dim, double and single blocks) and the image encoders' configs
(CLIP `projection_dim`, DINOv2 `hidden_size`); everything else keeps ConditioningConfig's FLUX.1-dev defaults.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moviepostproduction.compose.modules import CompositionAdapter, ConditioningConfig
from moviepostproduction.errors import WeightsError
from moviepostproduction.files import staged_copy
from moviepostproduction.model_dir import ModelDir, as_model_dir, read_json

ADAPTER_FOLDER = "adapter"


def adapter_config(md: ModelDir) -> ConditioningConfig:
    """The ConditioningConfig that fits the dir's transformer and image encoders (a one-line error per bad file)."""
    tr = read_json(md.root / "transformer" / "config.json", "a FluxTransformer2DModel config", md.root)
    clip = read_json(md.root / "image_encoders" / "clip" / "config.json", "a CLIP vision config", md.root)
    dino = read_json(md.root / "image_encoders" / "dino" / "config.json", "a DINOv2 config", md.root)
    sizes = {
        ("transformer/config.json", "num_attention_heads"): tr.get("num_attention_heads"),
        ("transformer/config.json", "attention_head_dim"): tr.get("attention_head_dim"),
        ("transformer/config.json", "num_layers"): tr.get("num_layers"),
        ("transformer/config.json", "num_single_layers"): tr.get("num_single_layers"),
        ("image_encoders/clip/config.json", "projection_dim"): clip.get("projection_dim"),
        ("image_encoders/dino/config.json", "hidden_size"): dino.get("hidden_size"),
    }
    for (file, key), value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65536:
            raise WeightsError(f"model dir {md.root}: {file} {key} must be an integer in [1, 65536] (got {value!r})")
    return ConditioningConfig(
        hidden_dim=tr["num_attention_heads"] * tr["attention_head_dim"],
        num_double_blocks=tr["num_layers"],
        num_single_blocks=tr["num_single_layers"],
        clip_dim=clip["projection_dim"],
        dino_dim=dino["hidden_size"],
    )


def init_adapter(model_dir: str | Path, *, out: str | Path | None = None, seed: int = 0, overwrite: bool = False):
    """Write a fresh (zero-initialised branches) adapter for `model_dir` to `out` (default `model_dir/adapter`),
    atomically (`files.staged_copy`): a failed write leaves no folder and an existing one whole. Returns (path,
    config)."""
    md = as_model_dir(model_dir)
    target = Path(out) if out is not None else md.root / ADAPTER_FOLDER
    if target.exists() and not overwrite:
        raise WeightsError(f"{target} exists; pass --overwrite to replace it with a fresh, untrained adapter")
    cfg = adapter_config(md)
    with staged_copy(None, target, replace=True) as folder, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CompositionAdapter(cfg).save_pretrained(folder)
    return target, cfg
