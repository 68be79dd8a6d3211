"""Gradient checkpointing of a task's models (`trainer.gradient_checkpointing: true`).

Every module a task names that can recompute its activations in backward is told to: diffusers models through
their own `enable_gradient_checkpointing()` (FLUX's transformer: `ConditionedFlux` then runs each double and single
block under `torch.utils.checkpoint`, our modulation, Assemble-Attn and LoRA included; the VAE's decoder blocks, which
the decoded losses back-propagate through), and modules with a plain `gradient_checkpointing` flag (NanoDiT).
Non-reentrant checkpointing re-runs a block with the RNG state of its first run and re-registers the q/k/v capture
hooks of Assemble-Attn inside the block, so the loss and every gradient are those of the run without it
(tests/test_train_memory_options.py). What it costs: one more forward of the recomputed blocks per step.
"""

from __future__ import annotations

from torch import nn

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.training.task import TrainTask


def _recompute(module: nn.Module, root: bool) -> bool | None:
    """Turn checkpointing on for `module` if it has a switch: True when turned on, False when it is left as it is
    (a diffusers model without support; a transformers model: the frozen encoders run in eval mode, where
    transformers does not checkpoint), None when it has no switch (look inside it)."""
    if callable(getattr(module, "gradient_checkpointing_enable", None)):
        return False
    enable = getattr(module, "enable_gradient_checkpointing", None)
    if callable(enable):
        if not getattr(module, "_supports_gradient_checkpointing", True):
            return False
        enable()
        return True
    if root and isinstance(getattr(module, "gradient_checkpointing", None), bool):  # our own models' flag
        module.gradient_checkpointing = True
        return True
    return None


def enable_gradient_checkpointing(task: TrainTask) -> list[str]:
    """Switch it on in the outermost modules of `task.modules()` that have a switch; returns their names
    ("transformer", "vae.model", ...). A task with none is one line naming the field."""
    done: list[str] = []
    for root, module in task.modules().items():
        skip: list[str] = []  # subtrees already handled (or refused): their blocks follow their model's switch
        for name, sub in module.named_modules():
            if any(s == "" or name == s or name.startswith(s + ".") for s in skip):
                continue
            if (result := _recompute(sub, root=not name)) is not None:
                skip.append(name)
                if result:
                    done.append(f"{root}.{name}" if name else root)
    if not done:
        raise ValidationError(
            [
                Problem(
                    "trainer.gradient_checkpointing",
                    True,
                    f"task {task.name!r} has no model that can recompute activations",
                )
            ]
        )
    return done
