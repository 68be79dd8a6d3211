"""The memory switches a pipeline is loaded with (`--quantize`, `--offload`, `--vae-tiling`; docs/memory.md) and the
diffusers-style methods every FLUX pipeline has for them (`enable_model_cpu_offload`, ...).

`MemoryOptions` is what `from_model_dir(..., quantize=, offload=, vae_tiling=)` takes: it says where the weights
load (offloaded pipelines load on the CPU and move per component), which quantization configs the transformer and T5
load with (`quantize.py`), and what the pre-flight counts (`resources.preflight_weights`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moviepostproduction.encoders.offload import MODES, Offload, enable_offload
from moviepostproduction.encoders.quantize import SPECS, quantization_config
from moviepostproduction.errors import Problem, ValidationError


@dataclass(frozen=True)
class MemoryOptions:
    """quantize: nf4 | int8 | fp8 for the transformer and T5 weights (None: the pipeline dtype); offload: model |
    sequential (None: everything resident on the device); vae_tiling: decode large images tile by tile."""

    quantize: str | None = None
    offload: str | None = None
    vae_tiling: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.quantize is not None and self.quantize not in SPECS:
            problems.append(Problem("quantize", self.quantize, f"must be one of {', '.join(SPECS)}"))
        if self.offload is not None and self.offload not in MODES:
            problems.append(Problem("offload", self.offload, f"must be one of {', '.join(MODES)}"))
        if problems:
            raise ValidationError(problems)

    def load_device(self, device: str) -> str:
        """Where weights load: the CPU when offloaded (the hooks move them), else `device`."""
        return "cpu" if self.offload else device

    def quantized(self, dtype: torch.dtype, device: str) -> tuple[Any, Any]:
        """(transformer config, T5 config) for the loaders; (None, None) without `quantize`."""
        if self.quantize is None:
            return None, None
        transformer = quantization_config(self.quantize, compute_dtype=dtype, device=device)
        return transformer, quantization_config(self.quantize, target="t5", compute_dtype=dtype, device=device)

    def counted(self) -> dict[str, Any]:
        """The pre-flight's `quantize` / `offload` keywords (resources.preflight_weights)."""
        quantize = {"transformer": self.quantize, "text_encoder_2": self.quantize} if self.quantize else None
        return {"quantize": quantize, "offload": self.offload}

    def keywords(self, tiling: bool = True) -> dict[str, Any]:
        """These options as `from_model_dir` keywords (`tiling=False`: for a pipeline without the switch)."""
        return {
            "quantize": self.quantize,
            "offload": self.offload,
            **({"vae_tiling": self.vae_tiling} if tiling else {}),
        }

    def apply(self, pipe: Any, device: str) -> None:
        """After loading: tiling on the pipeline's VAE, offload hooks with `device` as the execution device."""
        if self.vae_tiling:
            pipe.enable_vae_tiling()
        if self.offload == "model":
            pipe.enable_model_cpu_offload(device)
        elif self.offload == "sequential":
            pipe.enable_sequential_cpu_offload(device)


class MemoryMixin:
    """diffusers' memory (and compile) methods for Compose / Panorama / Fill pipelines (they hold `vae`, and `model`
    with the FLUX transformer); `__call__` ends with `maybe_free_model_hooks()` as diffusers' pipelines do."""

    _offload: Offload | None = None

    def enable_model_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """One component at a time on `device` (encoders/offload.py); call on a pipeline loaded to the CPU."""
        self._offload = enable_offload(self, "model", device)

    def enable_sequential_cpu_offload(self, device: str | torch.device = "cuda") -> None:
        """Every layer's weights on `device` only for its own forward: the least memory, the slowest."""
        self._offload = enable_offload(self, "sequential", device)

    def maybe_free_model_hooks(self) -> None:
        """With model offload, send the component that ran last (the VAE) back to the CPU."""
        if self._offload is not None:
            self._offload.release()

    def enable_vae_tiling(self) -> None:
        self.vae.enable_tiling(True)

    def enable_compile(self, **options: Any) -> None:
        """`torch.compile` of the conditioned FLUX forward (`self.model`, in place; `options` go to torch.compile:
        backend, mode, dynamic ...). It traces with no graph break (tests/test_compile.py); the first call of each
        new size or ref count compiles, later ones reuse it."""
        self.model.compile(**options)

    def disable_vae_tiling(self) -> None:
        self.vae.enable_tiling(False)
