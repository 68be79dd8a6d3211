"""MPP Load Model's LoRA input: a .safetensors file from ComfyUI's `loras` folders, chosen from a list as ComfyUI's
own LoraLoader chooses one (outside ComfyUI: the `loras` folder of the current directory).

As MPP Load Scene confines scene files to the input directory, the name must resolve inside one of those folders
(no absolute path, `~`, `..` or link out of it), so a remote user of the server reads nothing else on the machine.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.scene import resolve_inside

LORA_FOLDER = "loras"  # ComfyUI's folder_paths name, and the folder under the current directory outside ComfyUI
NO_LORA = "None"
MAX_LISTED = 1_000
NOT_A_LORA = "must name a .safetensors file inside ComfyUI's loras folder"


def lora_roots() -> list[Path]:
    """ComfyUI's `loras` folders (folder_paths) when running inside it, else ./loras."""
    try:
        folder_paths = importlib.import_module("folder_paths")
    except ImportError:
        folder_paths = None
    if folder_paths is not None and hasattr(folder_paths, "get_folder_paths"):
        return [Path(p).resolve() for p in folder_paths.get_folder_paths(LORA_FOLDER)]
    return [(Path.cwd() / LORA_FOLDER).resolve()]


def lora_files() -> list[str]:
    """The .safetensors files under the LoRA folders as relative POSIX names, at most MAX_LISTED; hidden entries
    are skipped."""
    names: set[str] = set()
    for root in lora_roots():
        for walked, (folder, dirs, files) in enumerate(os.walk(root)):
            if walked >= 10 * MAX_LISTED or len(names) >= MAX_LISTED:
                break
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            base = Path(folder).relative_to(root)
            names |= {(base / f).as_posix() for f in files if f.endswith(".safetensors") and not f.startswith(".")}
    return sorted(names)[:MAX_LISTED]


def lora_path(name: object) -> Path:
    """The file `name` names inside a LoRA folder; one refusal, the same line, for any name that is missing, leaves
    the folders or is not a .safetensors file, so that it reveals nothing about files outside them."""
    for root in lora_roots() if isinstance(name, str) else ():
        path = resolve_inside(name.strip(), root, root)
        try:
            if path is not None and path.suffix == ".safetensors" and path.is_file():
                return path
        except OSError:  # a name too long
            pass
    raise ValidationError([Problem("lora", name, NOT_A_LORA)])


def lora_inputs() -> dict[str, tuple]:
    """The optional `lora` / `lora_strength` inputs of the loader nodes (listed afresh for each INPUT_TYPES call)."""
    return {
        "lora": ([NO_LORA, *lora_files()], {"default": NO_LORA, "tooltip": "From ComfyUI's loras folder."}),
        "lora_strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05}),
    }
