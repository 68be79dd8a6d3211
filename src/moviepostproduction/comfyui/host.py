"""What the nodes take from a running ComfyUI when there is one: device, progress bar, interrupt, temp and input
folders.

ComfyUI's own modules (`comfy.model_management`, `comfy.utils`, `folder_paths`) exist only inside ComfyUI; the
pack imports without them, so it can be tested and used from plain Python. Each hook below asks for the module
when called and does the plain-Python thing when it is absent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from moviepostproduction.model_dir import default_cache_dir

REF_FOLDER = "moviepostproduction-refs"


def _host_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def default_device() -> str:
    """ComfyUI's torch device when running inside it; else cuda when available, else cpu."""
    mm = _host_module("comfy.model_management")
    if mm is not None:
        return str(mm.get_torch_device())
    return "cuda" if torch.cuda.is_available() else "cpu"


def ref_folder() -> Path:
    """Where reference images from IMAGE inputs are written as PNG (the scene format points at files)."""
    folder_paths = _host_module("folder_paths")
    base = Path(folder_paths.get_temp_directory()) if folder_paths is not None else default_cache_dir()
    return base / REF_FOLDER


def input_folder() -> Path:
    """The only folder MPP Load Scene reads from: ComfyUI's input directory inside ComfyUI (where LoadImage reads
    and uploads land), else the current directory. Scene files and the images they name must resolve inside it."""
    folder_paths = _host_module("folder_paths")
    return Path(folder_paths.get_input_directory() if folder_paths is not None else Path.cwd()).resolve()


def step_callback(total: int) -> Callable | None:
    """A sampler callback that moves ComfyUI's progress bar and honours its Cancel button (None outside ComfyUI)."""
    utils = _host_module("comfy.utils")
    mm = _host_module("comfy.model_management")
    if utils is None and mm is None:
        return None
    bar = utils.ProgressBar(total) if utils is not None else None

    def callback(pipe: object, step: int, timestep: torch.Tensor, callback_kwargs: dict) -> dict:
        del pipe, step, timestep  # diffusers' callback_on_step_end form; nothing replaced
        if mm is not None:
            mm.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update(1)
        return {}

    return callback
