"""The frozen encoders of a model dir (T5 + CLIP text, CLIP + DINOv2 image, the VAE) and the transformer loader.

frozen.py holds the encoder wrappers; preprocess.py reads each image encoder's preprocessor_config.json; checks.py
checks the values of a model dir's JSON files before anything is built from them. The names below load lazily (PEP
562): model_dir.py imports checks.py, and frozen.py imports model_dir.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

_LAZY = {
    "ImageEmbeddings": "frozen",
    "ImageEncoder": "frozen",
    "TextEmbeddings": "frozen",
    "TextEncoder": "frozen",
    "Vae": "frozen",
    "find_caption_spans": "frozen",
    "load_transformer": "frozen",
    "ImagePreprocess": "preprocess",
}

__all__ = [
    "ImageEmbeddings",
    "ImageEncoder",
    "ImagePreprocess",
    "TextEmbeddings",
    "TextEncoder",
    "Vae",
    "find_caption_spans",
    "load_transformer",
]

if TYPE_CHECKING:
    from moviepostproduction.encoders.frozen import (
        ImageEmbeddings,
        ImageEncoder,
        TextEmbeddings,
        TextEncoder,
        Vae,
        find_caption_spans,
        load_transformer,
    )
    from moviepostproduction.encoders.preprocess import ImagePreprocess


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
