"""moviepostproduction: controllable diffusion-transformer image generation for film post-production.

The public API: the four pipelines, `load_scene` and `Scene`. The pipelines load lazily (PEP 562), so that importing
the package (or its ComfyUI node pack) does not import diffusers or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

_LAZY = {
    "ComposePipeline": "moviepostproduction.compose.pipeline",
    "PanoramaPipeline": "moviepostproduction.panorama.pipeline",
    "FillPipeline": "moviepostproduction.fill.pipeline",
    "VaryPipeline": "moviepostproduction.vary.pipeline",
    "Scene": "moviepostproduction.scene",
    "load_scene": "moviepostproduction.scene",
}

__all__ = ["ComposePipeline", "FillPipeline", "PanoramaPipeline", "Scene", "VaryPipeline", "load_scene"]

if TYPE_CHECKING:
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.panorama.pipeline import PanoramaPipeline
    from moviepostproduction.scene import Scene, load_scene
    from moviepostproduction.vary.pipeline import VaryPipeline


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'moviepostproduction' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
