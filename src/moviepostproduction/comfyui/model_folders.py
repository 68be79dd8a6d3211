"""Model files chosen from ComfyUI's own model folders, as its UNETLoader, DualCLIPLoader and VAELoader choose them
(`folder_paths`); outside ComfyUI, the folder of the same name under the current directory.

A name must resolve inside one of its folders (no absolute path, `~`, `..` or link out of it), as comfyui/loras.py
confines LoRA names: a remote user of the server reads nothing else on the machine, and one refusal line, the same
for a missing and a forbidden name, tells nothing about files outside the folders.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.scene import resolve_inside

MAX_LISTED = 1_000


@dataclass(frozen=True)
class ModelFolder:
    """One kind of ComfyUI model folder: its folder_paths names (current first, then the legacy alias ComfyUI still
    maps: "unet" -> "diffusion_models", "clip" -> "text_encoders") and the file suffixes the pack loads from it."""

    names: tuple[str, ...]
    suffixes: tuple[str, ...]

    @property
    def refusal(self) -> str:
        kinds = " or ".join(self.suffixes)
        return f"must name a {kinds} file inside ComfyUI's {self.names[0]} folder"

    def roots(self) -> list[Path]:
        """The folders of every name (each once) inside ComfyUI, else ./<first name>."""
        try:
            folder_paths = importlib.import_module("folder_paths")
        except ImportError:
            folder_paths = None
        if folder_paths is None or not hasattr(folder_paths, "get_folder_paths"):
            return [(Path.cwd() / self.names[0]).resolve()]
        roots: list[Path] = []
        for name in self.names:
            try:
                found = folder_paths.get_folder_paths(name)
            except KeyError:  # a ComfyUI that knows only the legacy (or only the new) name
                continue
            roots += [r for r in (Path(p).resolve() for p in found) if r not in roots]
        return roots

    def files(self) -> list[str]:
        """The loadable files under the folders as relative POSIX names, sorted, at most MAX_LISTED; hidden
        entries are skipped."""
        names: set[str] = set()
        for root in self.roots():
            for walked, (folder, dirs, files) in enumerate(os.walk(root)):
                if walked >= 10 * MAX_LISTED or len(names) >= MAX_LISTED:
                    break
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                base = Path(folder).relative_to(root)
                names |= {(base / f).as_posix() for f in files if f.endswith(self.suffixes) and not f.startswith(".")}
        return sorted(names)[:MAX_LISTED]

    def path(self, field: str, name: object) -> Path:
        """The file `name` names inside one of the folders; else one ValidationError naming `field` and `name`."""
        for root in self.roots() if isinstance(name, str) else ():
            path = resolve_inside(name.strip(), root, root)
            try:
                if path is not None and path.suffix in self.suffixes and path.is_file():
                    return path
            except OSError:  # a name too long
                pass
        raise ValidationError([Problem(field, name, self.refusal)])


DIFFUSION_MODELS = ModelFolder(("diffusion_models", "unet"), (".safetensors", ".gguf"))
TEXT_ENCODERS = ModelFolder(("text_encoders", "clip"), (".safetensors",))
VAES = ModelFolder(("vae",), (".safetensors",))


def likely_first(names: list[str], hint: str) -> list[str]:
    """`names` with those containing `hint` first (each group sorted): a combo's first entry is its default, so
    the T5 input starts at a t5xxl file and the CLIP-L input at a clip_l file of the same folder."""
    return sorted(names, key=lambda n: (hint not in n.lower(), n))
