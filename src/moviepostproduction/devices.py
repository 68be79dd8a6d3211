"""Device and dtype names as users give them (`--device auto`, `--dtype auto`), checked before anything loads.

`auto` picks what a diffusers user would: the first CUDA device in bf16 when torch sees one, else the CPU in fp32
(CPUs run bf16 matmuls several times slower than fp32, and fp16 not at all well). A device this torch cannot use is
one line naming it, never a traceback from the first `.to(device)`.
"""

from __future__ import annotations

import re

import torch

from moviepostproduction.errors import Problem, ValidationError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:\d{1,3})?")


def _refuse(field: str, value: str, message: str) -> ValidationError:
    return ValidationError([Problem(field, value, message)])


def resolve_device(name: str, field: str = "--device") -> str:
    """`auto` -> "cuda" when available else "cpu"; "cpu", "cuda", "cuda:N", "mps" checked against this machine."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = DEVICE_PATTERN.fullmatch(name)
    if match is None:
        raise _refuse(field, name, "must be auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
            raise _refuse(field, name, f"CUDA is not available here (torch {torch.__version__}: {build}); use cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index[1:]) >= count:
            raise _refuse(field, name, f"this machine has {count} CUDA device{'s' if count != 1 else ''}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise _refuse(field, name, "MPS is not available on this machine; use cpu")
    if kind == "cpu" and index is not None:
        raise _refuse(field, name, "the CPU takes no index; use cpu")
    return name


def resolve_dtype(name: str, device: str, field: str = "--dtype") -> torch.dtype:
    """`auto` -> bf16 on CUDA, fp32 elsewhere; else one of fp32, bf16, fp16."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise _refuse(field, name, f"must be auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]
