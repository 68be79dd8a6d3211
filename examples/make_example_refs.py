"""Draw the example reference sprites in examples/refs/: `python examples/make_example_refs.py`.

Three toy-world sprites (64 x 64, on white), rendered by the toy world's own sprite renderer so the embedded
default model (trained on that world) knows them: one per depth layer of examples/scene.json.
Deterministic: re-running rewrites byte-identical PNGs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.toyworld.synthetic import ToyWorldConfig, _reference_image

OUT = Path(__file__).resolve().parent / "refs"
SPRITES = {  # file -> (shape, colour, pattern)
    "red_circle.png": ("circle", "red", "stripes"),
    "blue_square.png": ("square", "blue", "solid"),
    "green_triangle.png": ("triangle", "green", "dots"),
}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    for i, (name, identity) in enumerate(SPRITES.items()):
        pixels = _reference_image(np.random.default_rng(i), identity, ToyWorldConfig())
        Image.fromarray(pixels).save(OUT / name)


if __name__ == "__main__":
    main()
