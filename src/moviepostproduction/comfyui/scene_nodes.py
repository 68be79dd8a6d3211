"""Scene nodes: build a scene from a caption and IMAGE references, add references one node at a time, or load a
scene file. The MPP_SCENE they pass on is a validated `scene.Scene`, so every rule of the scene format (and
its one-line errors naming `refs[i].bbox`) applies unchanged.

The scene format points at image files, so each IMAGE reference is written once as a PNG named by the hash of
its pixels (`host.ref_folder()`); the same pixels give the same file, and the compose pipeline's reference
cache (keyed by path and mtime) is hit across queue runs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import yaml
from PIL import Image

from moviepostproduction.comfyui.host import ref_folder
from moviepostproduction.comfyui.images import check_image, check_mask, to_pil
from moviepostproduction.comfyui.types import CATEGORY, SCENE, side
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.scene import DEFAULT_MAX_REFS, DEPTHS, Scene, load_scene, scene_from_dict
from moviepostproduction.visualize import save_png

UNIT = {"min": 0.0, "max": 1.0, "step": 0.01}  # a normalised bbox coordinate


def check_scene(scene: object) -> Scene:
    if not isinstance(scene, Scene):
        raise ValidationError([Problem("scene", type(scene).__name__, f"must be an {SCENE} from a scene node")])
    return scene


def write_ref(image: Image.Image) -> Path:
    """Write `image` as PNG under `ref_folder()`, named by its content; returns the path."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()[:24]
    path = ref_folder() / f"{digest}.png"
    if not path.is_file():
        save_png(image, path)
    return path


def _parse(field: str, text: str, example: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ValidationError([Problem(field, text[:60], f"cannot be parsed, write it like {example}")]) from None


def _per_image(field: str, values: list, count: int) -> list:
    """One value per image: a single value is repeated, anything else must have `count` entries."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValidationError([Problem(field, len(values), f"needs one entry per image ({count} images)")])
    return values


def ref_entries(images: torch.Tensor, bboxes: str, depths: str, captions: str) -> list[dict]:
    """Scene-file ref entries for an IMAGE batch with its bboxes / depths / captions as text."""
    images = check_image("images", images)
    count = images.shape[0]
    boxes = _parse("bboxes", bboxes, "[[0.1, 0.2, 0.5, 0.9], [0.5, 0.1, 0.9, 0.5]]")
    if isinstance(boxes, list) and len(boxes) == 4 and not any(isinstance(b, list) for b in boxes):
        boxes = [boxes]  # one bare [x0, y0, x1, y1]
    if not isinstance(boxes, list) or not boxes:
        raise ValidationError([Problem("bboxes", bboxes[:60], "must be a list of [x0, y0, x1, y1], one per image")])
    boxes = _per_image("bboxes", boxes, count)
    depth_list = _per_image("depths", [d for d in depths.replace(",", " ").split() if d] or ["fg"], count)
    lines = [c.strip() for c in captions.splitlines()]
    caption_list = _per_image("captions", lines, count) if any(lines) else [""] * count
    return [
        {"image": str(write_ref(pil)), "bbox": box, "depth": depth} | ({"caption": text} if text else {})
        for pil, box, depth, text in zip(to_pil(images), boxes, depth_list, caption_list, strict=True)
    ]


class MppScene:
    """A scene: caption and canvas, plus optional references (an IMAGE batch, one bbox and depth per image)."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "caption": ("STRING", {"multiline": True, "default": ""}),
                "width": side(1024),
                "height": side(1024),
                "panorama": ("BOOLEAN", {"default": False, "tooltip": "Equirectangular: width must be 2 x height."}),
            },
            "optional": {
                "images": ("IMAGE",),
                "bboxes": ("STRING", {"default": "", "tooltip": "[[x0, y0, x1, y1], ...] normalised, one per image."}),
                "depths": ("STRING", {"default": "fg", "tooltip": "fg, mg or bg per image (one value: all)."}),
                "captions": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "One caption per line, optional."},
                ),
            },
        }

    RETURN_TYPES = (SCENE,)
    RETURN_NAMES = ("scene",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(
        self,
        caption: str,
        width: int,
        height: int,
        panorama: bool,
        images: torch.Tensor | None = None,
        bboxes: str = "",
        depths: str = "fg",
        captions: str = "",
    ) -> tuple[Scene]:
        refs = ref_entries(images, bboxes, depths, captions) if images is not None else []
        data = {"caption": caption, "width": width, "height": height, "panorama": panorama, "refs": refs}
        return (scene_from_dict(data, base_dir=ref_folder()),)


class MppAddReference:
    """Append one reference (a single IMAGE at a normalised bbox) to a scene; chain one node per reference."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "scene": (SCENE,),
                "image": ("IMAGE",),
                "x0": ("FLOAT", {**UNIT, "default": 0.25}),
                "y0": ("FLOAT", {**UNIT, "default": 0.25}),
                "x1": ("FLOAT", {**UNIT, "default": 0.75}),
                "y1": ("FLOAT", {**UNIT, "default": 0.75}),
                "depth": (list(DEPTHS), {"default": "fg"}),
            },
            "optional": {
                "caption": ("STRING", {"default": "", "tooltip": "What the reference is; located in the prompt."}),
                "mask": ("MASK", {"tooltip": "LoadImage's mask (1 = transparent); masked pixels become white."}),
            },
        }

    RETURN_TYPES = (SCENE,)
    RETURN_NAMES = ("scene",)
    FUNCTION = "add"
    CATEGORY = CATEGORY

    def add(
        self,
        scene: Scene,
        image: torch.Tensor,
        x0: float,
        y0: float,
        x1: float,
        y1: float,
        depth: str,
        caption: str = "",
        mask: torch.Tensor | None = None,
    ) -> tuple[Scene]:
        scene = check_scene(scene)
        image = check_image("image", image)
        if image.shape[0] != 1:
            raise ValidationError(
                [Problem("image", f"batch of {image.shape[0]}", "one reference per node: pass a single image")]
            )
        if mask is not None:
            mask = check_mask("mask", mask, 1, tuple(image.shape[1:3]))
        entry = {"image": str(write_ref(to_pil(image, mask)[0])), "bbox": [x0, y0, x1, y1], "depth": depth}
        data = scene.to_dict()
        data["refs"].append(entry | ({"caption": caption} if caption.strip() else {}))
        return (scene_from_dict(data, base_dir=scene.base_dir or ref_folder()),)


class MppLoadScene:
    """Read a scene file (.json / .yaml, image paths relative to it), validated as `mpp validate` does."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "path": ("STRING", {"default": ""}),
                "max_refs": ("INT", {"default": DEFAULT_MAX_REFS, "min": 0, "max": 10000}),
            }
        }

    RETURN_TYPES = (SCENE,)
    RETURN_NAMES = ("scene",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, path: str, max_refs: int) -> tuple[Scene]:
        return (load_scene(path.strip(), max_refs=max_refs),)
