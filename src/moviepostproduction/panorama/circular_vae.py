"""Circular width padding for the convolutions of a VAE (DESIGN 7: 360Anything names zero padding a seam source).

`circular_width_padding(vae)` makes every padded `Conv2d` under `vae` see the image as a cylinder: its input is
padded circularly along the width (the left edge continues the right one) and with zeros (or replicated rows)
along the height, then convolved with padding 0. Nothing is copied from diffusers and no module is replaced:
each conv gets a forward pre-hook and its `padding` set to 0, so weights, state-dict keys and LoRA wrappers
are untouched, and `remove()` restores the original behaviour exactly.

diffusers' `Downsample2D` with `padding=0` (the SD / FLUX VAE encoder) pads (0, 1, 0, 1) with zeros itself
before its stride-2 conv; for those convs the hook strips that zero column and row and re-pads them as above.
With the hook in place the decoder is equivariant to a roll of the latent by k columns (output rolled by
8k pixels) and the encoder to a roll of the image by multiples of 8 pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HEIGHT_MODES", "CircularPadding", "circular_width_padding", "pad_cylinder"]

HEIGHT_MODES = ("zeros", "replicate")
_MARK = "_mpp_circular_width"


def pad_cylinder(x: torch.Tensor, left: int, right: int, top: int, bottom: int, height_mode: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H + top + bottom, W + left + right): circular along W, `height_mode` along H."""
    if left or right:
        x = F.pad(x, (left, right, 0, 0), mode="circular")
    if top or bottom:
        x = F.pad(x, (0, 0, top, bottom), mode="constant" if height_mode == "zeros" else "replicate")
    return x


@dataclass
class _Patched:
    conv: nn.Conv2d
    padding: tuple[int, ...]
    handle: RemovableHandle


class CircularPadding:
    """What `circular_width_padding` changed; `remove()` or leaving a `with` block undoes it."""

    def __init__(self, patched: list[_Patched]):
        self._patched = patched

    @property
    def num_convs(self) -> int:
        return len(self._patched)

    def remove(self) -> None:
        for p in self._patched:
            p.handle.remove()
            p.conv.padding = p.padding
            delattr(p.conv, _MARK)
        self._patched = []

    def __enter__(self) -> CircularPadding:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _padded_conv_hook(pads: tuple[int, int, int, int], height_mode: str):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (pad_cylinder(args[0], *pads, height_mode), *args[1:])

    return hook


def _downsample_hook(height_mode: str):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0][..., :-1, :-1]  # drop the zero row / column Downsample2D appended
        return (pad_cylinder(x, 0, 1, 0, 1, height_mode), *args[1:])

    return hook


def _self_padding_downsamples(module: nn.Module) -> set[int]:
    """ids of the convs of diffusers `Downsample2D`s that pad their input themselves (padding=0, use_conv)."""
    from diffusers.models.downsampling import Downsample2D

    return {
        id(m.conv)
        for m in module.modules()
        if isinstance(m, Downsample2D) and m.use_conv and m.padding == 0 and isinstance(m.conv, nn.Conv2d)
    }


def circular_width_padding(module: nn.Module, *, height_mode: str = "zeros") -> CircularPadding:
    """Switch every padded Conv2d under `module` (e.g. an AutoencoderKL) to circular padding along width.

    height_mode: "zeros" keeps the original behaviour along the height, "replicate" repeats the edge rows
    (the poles of an equirectangular image). Returns a handle; the module is patched in place until
    `handle.remove()`. Patching an already patched conv raises ValueError.
    """
    if height_mode not in HEIGHT_MODES:
        raise ValueError(f"height_mode must be one of {HEIGHT_MODES}, got {height_mode!r}")
    downsamples = _self_padding_downsamples(module)
    patched: list[_Patched] = []
    try:
        for name, conv in module.named_modules():
            if not isinstance(conv, nn.Conv2d):
                continue
            if hasattr(conv, _MARK):
                raise ValueError(f"conv {name!r} already has circular width padding")
            if id(conv) in downsamples:
                hook = _downsample_hook(height_mode)
            elif isinstance(conv.padding, str) or conv.padding_mode != "zeros":
                raise ValueError(f"conv {name!r}: padding={conv.padding!r} mode={conv.padding_mode!r} unsupported")
            elif any(conv.padding):
                ph, pw = conv.padding
                hook = _padded_conv_hook((pw, pw, ph, ph), height_mode)
            else:
                continue  # 1x1 and other unpadded convs do not see the border
            patched.append(_Patched(conv, tuple(conv.padding), conv.register_forward_pre_hook(hook)))
            conv.padding = (0, 0)
            setattr(conv, _MARK, True)
    except BaseException:
        CircularPadding(patched).remove()
        raise
    return CircularPadding(patched)
