"""ComfyUI's image and mask tensors <-> what the Python API takes (PIL images, (B, 3, H, W) tensors).

ComfyUI conventions: IMAGE is (B, H, W, C) float32 in [0, 1] with C = 3 (some nodes pass 1 or 4 channels);
MASK is (B, H, W) float32 in [0, 1] where 1 marks the masked region (LoadImage makes it 1 - alpha).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from moviepostproduction.comfyui.types import MAX_SIDE
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.resources import require_finite

CHANNELS = (1, 3, 4)


def _as_float(name: str, tensor: torch.Tensor, kind: str, allowed: tuple[torch.dtype, ...] = ()) -> torch.Tensor:
    """A floating-point (or `allowed`) tensor whose height and width (dims 1, 2) are at most MAX_SIDE, as a float32
    CPU tensor outside autograd; else a ValidationError naming `name`."""
    if not (tensor.is_floating_point() or tensor.dtype in allowed):
        raise ValidationError([Problem(name, str(tensor.dtype), f"must be a floating-point {kind} tensor")])
    if max(tensor.shape[1:3]) > MAX_SIDE:
        message = f"height and width must be at most {MAX_SIDE} (ComfyUI's maximum)"
        raise ValidationError([Problem(name, tuple(tensor.shape), message)])
    return tensor.detach().float().cpu()


def check_image(name: str, image: object) -> torch.Tensor:
    """An IMAGE input as a finite (B, H, W, C) float32 CPU tensor, or a ValidationError naming `name`."""
    if not torch.is_tensor(image):
        raise ValidationError([Problem(name, type(image).__name__, "must be an IMAGE tensor (B, H, W, C)")])
    if image.ndim != 4 or image.shape[-1] not in CHANNELS or 0 in image.shape:
        raise ValidationError(
            [Problem(name, tuple(image.shape), "must be a non-empty IMAGE tensor (B, H, W, C) with C in 1, 3, 4")]
        )
    image = _as_float(name, image, "IMAGE")
    require_finite(**{name: image})
    return image


def check_mask(name: str, mask: object, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """A MASK input (B or 1, H, W) matching an image of `batch` x `size` (H, W); (H, W) is taken as one mask."""
    if not torch.is_tensor(mask):
        raise ValidationError([Problem(name, type(mask).__name__, "must be a MASK tensor (B, H, W)")])
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or tuple(mask.shape[1:]) != size or mask.shape[0] not in (1, batch):
        raise ValidationError(
            [Problem(name, tuple(mask.shape), f"must be a MASK (B, H, W) of the image's size {size[0]}x{size[1]}")]
        )
    mask = _as_float(name, mask, "MASK", allowed=(torch.bool,))
    require_finite(**{name: mask})
    return mask.expand(batch, -1, -1)


def to_pil(image: torch.Tensor, mask: torch.Tensor | None = None) -> list[Image.Image]:
    """(B, H, W, C) in [0, 1] -> B PIL images (values clamped, as ComfyUI's SaveImage does).

    With a MASK (B, H, W), the result is RGBA with alpha = 1 - mask, the inverse of LoadImage.
    """
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()  # (B, H, W, C)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if mask is not None:
        alpha = ((1 - mask.detach().float().clamp(0, 1)) * 255).round().to(torch.uint8).cpu().numpy()  # (B, H, W)
        arr = np.concatenate([arr[..., :3], alpha[..., None]], axis=-1)
    return [Image.fromarray(a, "RGBA" if a.shape[-1] == 4 else "RGB") for a in arr]


def from_pil(images: list[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> IMAGE (B, H, W, 3) float32 in [0, 1]."""
    arr = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in images])
    return torch.from_numpy(arr).contiguous()


def from_channels_first(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] (the pipelines' output_type="pt") -> IMAGE (B, H, W, 3) float32 on the CPU."""
    return pixels.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().contiguous()
