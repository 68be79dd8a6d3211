"""The export of stages 1-3: an adapter folder (adapter_dir.py) that `mpp compose --model FLUX_DIR --adapter OUT` and
`ComposePipeline.from_pretrained(FLUX_DIR, adapter=OUT)` load beside the stock FLUX folder it was trained on.

    OUT/
      config.json, model.safetensors                       the trained CompositionAdapter
      transformer_lora/pytorch_lora_weights.safetensors    the trained transformer LoRA (stages 1-2; carried by 3)
      adapter_index.json                                   the image encoders it was trained with, sampling defaults
      image_encoders/clip, /dino                           only when the starting adapter held its own copies

The LoRA file is what diffusers' `FluxLoraLoaderMixin.save_lora_weights` writes: keys
`transformer.<module>.lora_A.weight` / `lora_B.weight`, and the peft `LoraConfig` under the safetensors header key
`lora_adapter_metadata` as JSON with keys `transformer.r`, `transformer.lora_alpha`, ... (diffusers'
`_pack_dict_with_prefix`), so peft rebuilds the same rank and alpha when diffusers or compose/lora.py load it.
The folder is built under a temporary name and renamed into place (`files.staged_copy`): never half-written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from moviepostproduction.adapter_dir import ADAPTER_CONFIG, LORA_FILE, write_index
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.files import STORAGE_DTYPES, save_safetensors, staged_copy

TRAINED_LORA = "default"  # the peft adapter name the trainer's LoRA has (peft's default; compose_task.py adds it)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
MODEL_DIR_MARKERS = ("model_index.json", "transformer")  # what makes a folder a model dir, not an adapter folder


def is_adapter_folder(path: Path) -> bool:
    """An adapter folder as `mpp init-adapter` or an export writes it: its config and weights, no model dir parts."""
    return (
        (path / ADAPTER_CONFIG).is_file()
        and (path / "model.safetensors").is_file()
        and not any((path / m).exists() for m in MODEL_DIR_MARKERS)
    )


def export_problem(target: Path, field: str = "export") -> Problem | None:
    """Why `target` cannot take an adapter folder (None if it can): an existing file, or an existing folder that is
    not an adapter folder (a model dir, a data set, anything else is never replaced by an export)."""
    if target.exists() and not target.is_dir():
        return Problem(field, str(target), "is an existing file; give a folder name for the adapter folder")
    if target.is_dir() and any(target.iterdir()) and not is_adapter_folder(target):
        kind = "a model dir" if any((target / m).exists() for m in MODEL_DIR_MARKERS) else "not an adapter folder"
        return Problem(field, str(target), f"exists and is {kind}; an export replaces only an adapter folder")
    return None


def lora_state(transformer: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The trained LoRA of `transformer` in diffusers' file format: (state, safetensors header)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=TRAINED_LORA)  # "<module>.lora_A.weight"
    state = {f"transformer.{k}": v.detach().to("cpu", dtype) for k, v in state.items()}
    config = transformer.peft_config[TRAINED_LORA].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # JSON has no sets
    record = {f"transformer.{k}": v for k, v in config.items()}
    return state, {"format": "pt", METADATA_KEY: json.dumps(record, indent=2, sort_keys=True)}


def sampling_defaults(recipe) -> dict:
    """The sampling defaults an export names (adapter_index.json `sampling`), from the recipe."""
    return {
        "max_text_tokens": recipe.max_text_tokens,
        "ref_guidance_scale": float(recipe.ref_guidance),
        "noise_temperature": float(recipe.noise_temperature),
    }


def export_adapter_dir(recipe, task, md) -> Path:
    """Write the trained adapter (+ the transformer LoRA, if the run has one) of `task` to `recipe.export`.

    `md`: the ModelDir the run loaded; its image encoders are named by absolute path in adapter_index.json, or
    copied along when they lie inside the starting adapter folder (which the export may be replacing)."""
    out = Path(recipe.export)
    if problem := export_problem(out):  # checked before training too (recipe_preflight.py); the folder may have moved
        raise ValidationError([problem])
    transformer, adapter = task.model.transformer, task.model.adapter
    own = md.adapter.root.resolve()
    with staged_copy(None, out, replace=True) as tmp:
        adapter.save_pretrained(tmp)
        if TRAINED_LORA in getattr(transformer, "peft_config", {}):
            state, header = lora_state(transformer, STORAGE_DTYPES[recipe.export_dtype])
            save_safetensors(state, tmp / LORA_FILE, metadata=header)
        encoders = {}
        for name, folder in (("clip", md.image_clip), ("dino", md.image_dino)):
            folder = folder.resolve()
            if folder.is_relative_to(own):
                shutil.copytree(folder, tmp / "image_encoders" / name)
                encoders[name] = None
            else:
                encoders[name] = str(folder)
        write_index(tmp, **encoders, sampling=sampling_defaults(recipe))
    return out
