"""Names shared by the nodes: custom link types, the menu category and common widget specs."""

from __future__ import annotations

from moviepostproduction.sampling import MAX_SEED, MAX_STEPS

CATEGORY = "moviepostproduction"
MODEL = "MPP_MODEL"  # comfyui.model.MppModel
SCENE = "MPP_SCENE"  # scene.Scene (validated, immutable)

MAX_SIDE = 16384  # ComfyUI's MAX_RESOLUTION
SEED = ("INT", {"default": 0, "min": 0, "max": MAX_SEED - 1, "control_after_generate": True})
STEPS = ("INT", {"default": 28, "min": 1, "max": MAX_STEPS})
GUIDANCE = ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "FLUX guidance embedding."})


def side(default: int, step: int = 16) -> tuple[str, dict]:
    """An image height or width widget."""
    return ("INT", {"default": default, "min": step, "max": MAX_SIDE, "step": step})
