"""Where a compose run's adapter comes from: `adapter_dir` as it is, or created first from `init_adapter` (the same
fresh, zero-initialised adapter `mpp init-adapter` writes); the folder's transformer LoRA, when it has one (a stage's
export), becomes the run's own peft adapter, trained on by stage 2 and frozen in stage 3."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from moviepostproduction.errors import WeightsError

logger = logging.getLogger(__name__)


def start_lora(transformer, path: Path) -> None:
    """An adapter folder's transformer LoRA as the run's own peft adapter, the one LoRA stages train and export; in
    fp32 whatever the backbone's dtype (`backbone_dtype: bf16`), so stage 2 trains it from the file's values and
    stage 3 carries them into its export unrounded."""
    from moviepostproduction.compose.lora import check_fits, inject, read_lora
    from moviepostproduction.training.adapter_export import TRAINED_LORA

    lora = read_lora(path)
    check_fits(transformer, lora)
    inject(transformer, lora, TRAINED_LORA)
    if transformer.dtype == torch.float32:
        return
    from peft import set_peft_model_state_dict

    for name, param in transformer.named_parameters():  # peft made them in the backbone's dtype and rounded the file
        if f".{TRAINED_LORA}." in name and ".lora_" in name:
            param.data = param.data.float()
    state = {k.removeprefix("transformer."): v.float() for k, v in lora.state.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=TRAINED_LORA)  # the file's values, exactly
    if result.unexpected_keys:
        raise WeightsError(f"{path}: {len(result.unexpected_keys)} LoRA tensors match no layer")


def prepare_adapter(recipe) -> None:
    """Create `adapter_dir` with `init_adapter` (mpp init-adapter) when it does not exist yet; a resumed run finds the
    one its first run made."""
    if not recipe.init_adapter or Path(recipe.adapter_dir).exists():
        return
    from moviepostproduction.compose.adapter_init import init_adapter

    spec = recipe.init_adapter
    path, _ = init_adapter(
        recipe.model,
        out=recipe.adapter_dir,
        clip=spec["clip"],
        dino=spec["dino"],
        copy_encoders=spec.get("copy_encoders", False),
        seed=spec.get("seed", 0),
    )
    logger.info("created a fresh adapter %s", path)
