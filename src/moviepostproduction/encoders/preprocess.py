"""Image preprocessing for the frozen image encoders, read from their preprocessor_config.json.

Same steps and order as transformers' CLIP/BiT image processors (convert to RGB over white, resize the
short edge with PIL, centre crop, rescale, normalise), done here so no torchvision is needed and so a
differentiable tensor path exists for losses on generated images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from moviepostproduction.encoders.checks import PREPROCESSOR_KEYS
from moviepostproduction.errors import WeightsError
from moviepostproduction.model_dir import read_json

BICUBIC = 3  # PIL / transformers resample code used by CLIP and DINOv2


def _hw(value: object, *, square_int: bool) -> tuple[int, int] | int | None:
    """Config sizes come as an int, {"shortest_edge": n} or {"height": h, "width": w}."""
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value) if square_int else value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    if isinstance(value, dict) and "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(f"unsupported size {value!r}")


@dataclass(frozen=True)
class ImagePreprocess:
    """resize (short edge -> int, or exact (H, W)), centre crop (H, W), x * rescale, (x - mean) / std."""

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    resample: int
    rescale: float | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None

    @classmethod
    def from_file(cls, path: Path, root: Path) -> ImagePreprocess:
        cfg = read_json(path, "an image preprocessor config", root, PREPROCESSOR_KEYS)  # types and sizes checked
        try:
            resize = _hw(cfg.get("size"), square_int=False) if cfg.get("do_resize", True) else None
            crop = _hw(cfg.get("crop_size"), square_int=True) if cfg.get("do_center_crop", True) else None
        except ValueError as exc:
            raise WeightsError(f"model dir {root}: {path}: {exc} (expected size/crop_size)") from None
        if not isinstance(crop, tuple) and not isinstance(resize, tuple):
            raise WeightsError(
                f"model dir {root}: {path} gives no fixed output size (expected crop_size, or size with height/width)"
            )
        normalize = cfg.get("do_normalize", True)
        if normalize and not (cfg.get("image_mean") and cfg.get("image_std")):
            raise WeightsError(f"model dir {root}: {path} lacks image_mean/image_std (expected both to normalise)")
        return cls(
            resize=resize,
            crop=crop if isinstance(crop, tuple) else None,
            resample=int(cfg.get("resample", BICUBIC)),
            rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None,
            mean=tuple(cfg["image_mean"]) if normalize else None,
            std=tuple(cfg["image_std"]) if normalize else None,
        )

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize  # type: ignore[return-value]

    def resized_hw(self, height: int, width: int) -> tuple[int, int]:
        """Target size of the resize step; the short edge rule truncates the long edge like torchvision."""
        if self.resize is None:
            return height, width
        if isinstance(self.resize, tuple):
            return self.resize
        if width <= height:
            return int(self.resize * height / width), self.resize
        return self.resize, int(self.resize * width / height)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images of any size and mode -> (R, 3, H, W) float32."""
        return torch.stack([self._one(im) for im in images])

    def _one(self, image: Image.Image) -> torch.Tensor:
        rgb = _to_rgb(image)
        h, w = self.resized_hw(rgb.height, rgb.width)
        if (h, w) != (rgb.height, rgb.width):
            rgb = rgb.resize((w, h), resample=Image.Resampling(self.resample))
        x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        x = _center_crop(x, self.crop) if self.crop else x
        return self._normalise(x.to(torch.float64) * (self.rescale or 1.0)).to(torch.float32)

    def tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable path: (R, 3, H, W) in [-1, 1] -> the encoder's input (close to, not equal to, PIL)."""
        x = (pixels + 1) / 2  # the PIL path's uint8 * 1/255 range
        h, w = self.resized_hw(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            mode = "bicubic" if self.resample == BICUBIC else "bilinear"
            # in fp32: the CPU's antialiased resize has no bf16 kernel (the decoded pixels are bf16 under autocast)
            resized = F.interpolate(x.float(), size=(h, w), mode=mode, antialias=True, align_corners=False)
            x = resized.clamp(0, 1).to(x.dtype)
        x = _center_crop(x, self.crop) if self.crop else x
        if self.rescale is None:  # encoder expects 0..255 values
            x = x * 255
        return self._normalise(x)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std


def _to_rgb(image: Image.Image) -> Image.Image:
    """Transparent pixels become white (cut-out references are usually RGBA on nothing)."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Centre crop of the last two dims; an image smaller than the crop is zero-padded around it."""
    ch, cw = size
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        top, left = math.ceil(max(ch - h, 0) / 2), math.ceil(max(cw - w, 0) / 2)
        pad = (left, max(cw - w, 0) - left, top, max(ch - h, 0) - top)
        x = F.pad(x, pad)
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[..., top : top + ch, left : left + cw]
