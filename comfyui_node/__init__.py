"""ComfyUI custom-node folder of moviepostproduction: link or copy it to `ComfyUI/custom_nodes/moviepostproduction`.

The nodes live in the installed package (`pip install -e <repo>` in ComfyUI's Python); when the package is not
installed but this folder sits in (or links into) the repository, the repository's `src/` is used instead.
See docs/comfyui.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except ModuleNotFoundError as err:
    src = Path(__file__).resolve().parents[1] / "src"
    if err.name != "moviepostproduction" or not (src / "moviepostproduction").is_dir():
        raise
    sys.path.insert(0, str(src))
    from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
