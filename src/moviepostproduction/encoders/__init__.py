"""The frozen encoders of a model dir (T5 + CLIP text, CLIP + DINOv2 image, the VAE) and the transformer loader.

frozen.py holds the encoder wrappers; preprocess.py reads each image encoder's preprocessor_config.json.
"""

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
