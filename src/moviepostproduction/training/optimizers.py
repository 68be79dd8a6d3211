"""The trainer's optimiser (`trainer.optimizer`): torch's AdamW, or bitsandbytes' 8-bit AdamW.

`adamw8bit` keeps both Adam moments as uint8 codes with one fp32 absmax per block of 256 values (bitsandbytes'
blockwise dynamic quantization, Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"): about 2.03
bytes a trained value instead of 8. Tensors under 4096 values keep fp32 moments (bitsandbytes' `min_8bit_size`).

Why bitsandbytes and not torchao's `AdamW8bit`: both are in the `quant` extra and both run on CPU and CUDA, but
torchao compiles its step with torch.compile (about 28 s of inductor compilation before the first step on the
2-core test machine, and a C++ toolchain required on CPU), while bitsandbytes runs eagerly; and its state is plain
tensors (codes, absmax, the 256-entry quantization maps), which checkpoints store as they are, so a resumed run
continues from the very same bytes (training/checkpoints.py).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

import torch

from moviepostproduction.errors import Problem, ValidationError

OPTIMIZERS = ("adamw", "adamw8bit")
EXTRA = "pip install 'moviepostproduction[quant]'"
# The per-parameter state each optimiser keeps, as checkpoints name it: "<module>.<param>.<key>"
ADAMW_STATE = ("exp_avg", "exp_avg_sq", "step")
BNB_STATE = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "step")  # qmap / absmax: 8-bit tensors


def optimizer_problem(name: object) -> Problem | None:
    """One line for an unknown optimiser or one whose package is not installed (checked when the recipe is read)."""
    if name not in OPTIMIZERS:
        return Problem("optimizer", name, f"expected one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return Problem("optimizer", name, f"needs the bitsandbytes package: {EXTRA}")
    return None


def build_optimizer(name: str, groups: list[dict[str, Any]], weight_decay: float) -> torch.optim.Optimizer:
    """The optimiser over the task's parameter groups (each with its own "lr")."""
    if problem := optimizer_problem(name):
        raise ValidationError([problem])
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def is_8bit(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is one of bitsandbytes' (only ever imported when `build_optimizer` made one)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(optimizer, bnb.optim.optimizer.Optimizer8bit)


def state_keys(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    """The per-parameter state keys `optimizer` keeps (what a checkpoint stores of it)."""
    return BNB_STATE if is_8bit(optimizer) else ADAMW_STATE


def moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimiser's per-parameter tensors (moments, absmax, maps), each storage counted once."""
    seen: dict[int, int] = {}
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
