"""Draw the example reference sprites in examples/refs/: `python examples/make_example_refs.py`.

Three 128x128 RGBA sprites on a transparent background, one per depth layer of examples/scene.json.
Deterministic: re-running rewrites byte-identical PNGs.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
OUT = Path(__file__).resolve().parent / "refs"


def _sprite(draw_shape) -> Image.Image:
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    draw_shape(ImageDraw.Draw(img))
    return img


def red_circle(draw: ImageDraw.ImageDraw) -> None:
    draw.ellipse((12, 12, 116, 116), fill=(220, 40, 40, 255), outline=(120, 10, 10, 255), width=4)
    draw.ellipse((36, 30, 60, 54), fill=(255, 170, 170, 255))  # highlight, so the sprite has an orientation


def blue_square(draw: ImageDraw.ImageDraw) -> None:
    draw.rectangle((16, 16, 112, 112), fill=(40, 80, 220, 255), outline=(10, 30, 120, 255), width=4)
    for x in range(32, 112, 24):  # stripes: a texture the identity metric can tell apart from a flat fill
        draw.line((x, 20, x, 108), fill=(120, 160, 255, 255), width=6)


def green_triangle(draw: ImageDraw.ImageDraw) -> None:
    draw.polygon([(64, 10), (118, 116), (10, 116)], fill=(40, 170, 60, 255), outline=(10, 80, 20, 255))


SPRITES = {"red_circle": red_circle, "blue_square": blue_square, "green_triangle": green_triangle}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, shape in SPRITES.items():
        _sprite(shape).save(OUT / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()
