"""Scene nodes: build a scene from a caption and IMAGE references, add references one node at a time, or load a
scene file. The MPP_SCENE they pass on is a validated `scene.Scene`, so every rule of the scene format (and
its one-line errors naming `refs[i].bbox`) applies unchanged.

The scene format points at image files, so each IMAGE reference is written once as a PNG named by the hash of
its pixels (`host.ref_folder()`); the same pixels give the same file, and the compose pipeline's reference
cache (keyed by path and mtime) is hit across queue runs.

A scene file is chosen from ComfyUI's input directory (`host.input_folder()`), as LoadImage chooses an image: the
file and every image it names must resolve inside that folder, so a (possibly remote) user of the ComfyUI server
reads nothing else on the machine, and a refusal does not tell whether a file outside exists.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from PIL import Image

from moviepostproduction.comfyui.host import input_folder, ref_folder
from moviepostproduction.comfyui.images import check_image, check_mask, to_pil
from moviepostproduction.comfyui.inputs import checked
from moviepostproduction.comfyui.types import CATEGORY, SCENE, side
from moviepostproduction.errors import FileProblem, Problem, ValidationError, parse_structured
from moviepostproduction.scene import (
    DEFAULT_MAX_REFS,
    DEPTHS,
    SUFFIXES,
    Scene,
    load_scene,
    resolve_inside,
    scene_from_dict,
)
from moviepostproduction.visualize import save_png

UNIT = {"min": 0.0, "max": 1.0, "step": 0.01}  # a normalised bbox coordinate
MAX_BBOX_TEXT = 8_000  # characters of the bboxes input: 50 boxes of full-precision floats
MAX_LISTED = 1_000  # scene files offered in MPP Load Scene's list (folders walked: 10 x as many)
NOT_A_SCENE_FILE = "must name a .json / .yaml / .yml scene file inside the input directory"


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
    """YAML for lists of numbers, parsed within the bounds of `errors.parse_structured` (no tags, aliases counted
    as expanded) and at most 3 levels deep: a list of boxes needs 2."""
    if len(text) <= MAX_BBOX_TEXT:
        try:
            return parse_structured(text, "yaml", max_depth=3, max_values=MAX_BBOX_TEXT)
        except ValidationError:
            pass
    raise ValidationError([Problem(field, text, f"cannot be parsed, write it like {example}")])


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
    if count > DEFAULT_MAX_REFS:  # before any PNG is written
        raise ValidationError([Problem("images", f"batch of {count}", f"at most {DEFAULT_MAX_REFS} references")])
    boxes = _parse("bboxes", bboxes, "[[0.1, 0.2, 0.5, 0.9], [0.5, 0.1, 0.9, 0.5]]")
    if isinstance(boxes, list) and len(boxes) == 4 and not any(isinstance(b, list) for b in boxes):
        boxes = [boxes]  # one bare [x0, y0, x1, y1]
    if not isinstance(boxes, list) or not boxes:
        raise ValidationError([Problem("bboxes", bboxes, "must be a list of [x0, y0, x1, y1], one per image")])
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

    @checked
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

    @checked
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


def scene_files(root: Path) -> list[str]:
    """The scene files under `root` as relative POSIX names (`shots/a.json`) for MPP Load Scene's list, at most
    MAX_LISTED; hidden entries and links to folders are skipped, as is a folder past the walk's bound."""
    names: list[str] = []
    for walked, (folder, dirs, files) in enumerate(os.walk(root)):
        if walked >= 10 * MAX_LISTED or len(names) >= MAX_LISTED:
            break
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder).relative_to(root)
        names += [(base / f).as_posix() for f in files if f.lower().endswith(SUFFIXES) and not f.startswith(".")]
    return sorted(names)[:MAX_LISTED]


def scene_path(name: object, root: Path) -> Path:
    """The scene file `name` (relative to `root`) resolved; one refusal, the same line, for a name that is missing,
    leaves `root` (absolute, `~`, `..`, a link), is not a regular file (a FIFO, a device, a folder) or not a scene
    file, so that it reveals nothing about files outside `root`."""
    path = resolve_inside(name.strip(), root, root) if isinstance(name, str) else None
    try:
        if path is not None and path.suffix.lower() in SUFFIXES and path.is_file():
            return path
    except OSError:  # a name too long
        pass
    raise ValidationError([Problem("scene_file", name, NOT_A_SCENE_FILE)])


class MppLoadScene:
    """Read a scene file from ComfyUI's input directory (outside ComfyUI: the current directory), validated as
    `mpp validate` does; its image paths are relative to it and must stay inside the input directory."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "scene_file": (
                    scene_files(input_folder()),
                    {"tooltip": "A .json / .yaml scene file in ComfyUI's input directory (or a subfolder of it)."},
                ),
                "max_refs": ("INT", {"default": DEFAULT_MAX_REFS, "min": 0, "max": 10000}),
            }
        }

    RETURN_TYPES = (SCENE,)
    RETURN_NAMES = ("scene",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, scene_file: str) -> bool | str:  # noqa: N802 - ComfyUI's name
        """ComfyUI's hook (as LoadImage's): a name not in the list, e.g. uploaded since, passes if `load` takes it."""
        try:
            scene_path(scene_file, input_folder())
        except ValidationError as err:
            return str(err)
        return True

    @classmethod
    def IS_CHANGED(cls, scene_file: str, max_refs: int) -> str:  # noqa: N802 - ComfyUI's name
        """ComfyUI runs the node again when this changes: an edited scene file is read again."""
        try:
            stat = scene_path(scene_file, input_folder()).stat()
        except (ValidationError, OSError):
            return ""
        return f"{stat.st_mtime_ns} {stat.st_size} {max_refs}"

    @checked
    def load(self, scene_file: str, max_refs: int) -> tuple[Scene]:
        root = input_folder()
        path = scene_path(scene_file, root)
        try:
            return (load_scene(path, max_refs=max_refs, root=root),)
        except ValidationError as err:  # named as the user named it, not by the server's absolute path
            raise ValidationError(err.problems, source=scene_file.strip()) from None
        except FileProblem as err:  # too large, not UTF-8, unreadable
            raise FileProblem(scene_file.strip(), err.reason) from None
