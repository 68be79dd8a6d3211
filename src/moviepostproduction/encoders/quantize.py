"""Quantized base weights through the libraries' own `quantization_config` (issue 41, item 4; docs/memory.md).

A short spec names the scheme: "nf4" (bitsandbytes 4-bit NormalFloat, double quantization off, computing in the
model dtype), "int8" (torchao int8 weight-only) or "fp8" (torchao float8 weight-only). The same spec builds the
diffusers config for the FLUX transformer (`target="transformer"`, for `load_transformer`) and the transformers
config for T5 (`target="t5"`, for `TextEncoder.load`). A backend that is missing, or a device that cannot run it,
is one line naming the spec before anything loads.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from moviepostproduction.errors import Problem, ValidationError

__all__ = ["BYTES_PER_VALUE", "SPECS", "TARGETS", "check_quantization", "quantization_config"]

SPECS = ("nf4", "int8", "fp8")
TARGETS = ("transformer", "t5")
# Bytes a quantized linear weight keeps per value (the pre-flight estimate): nf4 packs two values a byte plus one
# fp32 absmax per 64 values; int8 / fp8 one byte plus a per-row scale (negligible at FLUX widths).
BYTES_PER_VALUE = {"nf4": 0.5 + 4 / 64, "int8": 1.0, "fp8": 1.0}
BACKENDS = {"nf4": "bitsandbytes", "int8": "torchao", "fp8": "torchao"}
FP8_CAPABILITY = (8, 9)  # float8 matmuls: Ada / Hopper and newer


def _problem(spec: str, message: str) -> ValidationError:
    return ValidationError([Problem("quantize", spec, message)])


def check_quantization(spec: str, device: str | torch.device) -> None:
    """One line unless `spec` is known, its backend package is installed and `device` can run it."""
    if spec not in SPECS:
        raise _problem(spec, f"must be one of {', '.join(SPECS)}")
    backend = BACKENDS[spec]
    if importlib.util.find_spec(backend) is None:
        raise _problem(spec, f"needs the {backend} package: pip install 'moviepostproduction[quant]'")
    dev = torch.device(device)
    if spec == "nf4" and (dev.type != "cuda" or not torch.cuda.is_available()):
        # diffusers' bitsandbytes quantizer refuses to load without a GPU ("No GPU found")
        raise _problem(spec, f"needs a CUDA device (bitsandbytes through diffusers), not {dev}; use int8 on {dev}")
    if spec == "fp8":
        if dev.type != "cuda" or not torch.cuda.is_available():
            raise _problem(spec, f"needs a CUDA device of compute capability >= 8.9, not {dev}; use int8")
        capability = torch.cuda.get_device_capability(dev)
        if capability < FP8_CAPABILITY:
            have = f"{capability[0]}.{capability[1]}"
            raise _problem(spec, f"needs compute capability >= 8.9, {dev} has {have}; use int8")


def quantization_config(
    spec: str,
    *,
    target: str = "transformer",
    compute_dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
) -> Any:
    """The library config that loads `target`'s weights quantized by `spec`, after `check_quantization`.

    target "transformer": a diffusers config (`load_transformer(md, dtype, device, quantization_config=...)`);
    "t5": a transformers config (`TextEncoder.load(md, t5_quantization_config=...)`). `compute_dtype`: what nf4
    dequantizes to for its matmuls (the pipeline dtype)."""
    if target not in TARGETS:
        raise ValueError(f"target={target!r}: must be one of {', '.join(TARGETS)}")
    check_quantization(spec, device)
    if target == "transformer":
        import diffusers as library
    else:
        import transformers as library
    if spec == "nf4":
        return library.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        )
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    scheme = Int8WeightOnlyConfig() if spec == "int8" else Float8WeightOnlyConfig()
    return library.TorchAoConfig(quant_type=scheme)
