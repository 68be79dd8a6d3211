"""Reading and checking what `mpp fill` / `FillPipeline` take: the plate, the repaint mask, a semantic map, refs.

Every problem is a `ValidationError` naming the input and the value (the CLI exits with code 2). Accepted sources:
a file path, a PIL image, or a numpy array ((H, W, 3) for images, (H, W) for masks; uint8, bool, or float in
[0, 1]). Masks are read as greyscale in [0, 1] and binarised at 0.5 (>= 0.5 = repaint), as diffusers' FLUX-Fill
mask processor does; an alpha channel is ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.errors import FileProblem, Problem, ValidationError
from moviepostproduction.files import resolve_input
from moviepostproduction.fill.model import MASK_THRESHOLD
from moviepostproduction.scene import Scene, load_scene, open_image

logger = logging.getLogger(__name__)

__all__ = ["FillInputs", "bbox_mask", "place_refs", "read_fill_inputs"]


@dataclass
class FillInputs:
    plate: torch.Tensor  # (1, 3, H, W) float32 in [-1, 1]
    plate_uint8: np.ndarray  # (H, W, 3): what is pasted back outside the mask
    mask: torch.Tensor  # (1, 1, H, W) float32, exactly 0 or 1 (1 = repaint)
    mask_bool: np.ndarray  # (H, W)
    semantic: torch.Tensor | None  # (1, 3, H, W) float32 in [-1, 1]
    scene: Scene | None
    prompt: str

    @property
    def size(self) -> tuple[int, int]:
        return self.mask_bool.shape


def _invalid(field: str, value: object, message: str) -> ValidationError:
    return ValidationError([Problem(field, value, message)])


def _open(field: str, path: str | Path) -> Image.Image:
    try:  # a FIFO or a device is refused unopened, a decompression bomb before decoding (scene.open_image)
        with open_image(resolve_input(path)) as (_, img):
            img.load()
            return img.copy()
    except FileProblem as err:
        raise _invalid(field, str(path), "file not found" if err.missing else err.reason) from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise _invalid(field, str(path), f"cannot decode image: {reason}") from None


def _array(field: str, source, channels: int) -> np.ndarray:
    """Any accepted source -> float64 array in [0, 1], (H, W, 3) for channels=3 or (H, W) for channels=1."""
    if isinstance(source, str | Path):
        source = _open(field, source)
    if isinstance(source, Image.Image):
        return np.asarray(source.convert("RGB" if channels == 3 else "L"), dtype=np.float64) / 255.0
    if isinstance(source, torch.Tensor):
        source = source.detach().cpu().numpy()
    if not isinstance(source, np.ndarray):
        raise _invalid(field, type(source).__name__, "must be a file path, a PIL image or a numpy array")
    expected = (3,) if channels == 3 else ()
    if source.ndim != 2 + len(expected) or source.shape[2:] != expected:
        raise _invalid(field, tuple(source.shape), f"must have shape {'(H, W, 3)' if channels == 3 else '(H, W)'}")
    if source.dtype == np.uint8:
        return source.astype(np.float64) / 255.0
    values = source.astype(np.float64)
    if not np.isfinite(values).all():
        raise _invalid(field, "NaN/Inf", "contains non-finite values")
    if values.min() < 0 or values.max() > 1:
        raise _invalid(field, (float(values.min()), float(values.max())), "float values must lie in [0, 1]")
    return values


def _check_size(field: str, array: np.ndarray, size: tuple[int, int]) -> None:
    if array.shape[:2] != size:
        got = f"{array.shape[1]}x{array.shape[0]}"
        raise _invalid(field, got, f"size differs from the image's {size[1]}x{size[0]} (width x height)")


def bbox_mask(scene: Scene, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool union of the refs' boxes (outward-rounded to whole pixels)."""
    h, w = size
    mask = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in (r.bbox for r in scene.refs):
        mask[int(np.floor(y0 * h)) : int(np.ceil(y1 * h)), int(np.floor(x0 * w)) : int(np.ceil(x1 * w))] = True
    return mask


def _scene(scene, prompt: str) -> Scene | None:
    if scene is None:
        return None
    loaded = scene if isinstance(scene, Scene) else load_scene(scene)
    if loaded.panorama:
        raise _invalid("refs", "panorama: true", "fill takes a plain scene, not a panorama")
    if prompt:
        raise _invalid("prompt", prompt, "give a prompt or a refs scene (its caption is the prompt), not both")
    return loaded


def read_fill_inputs(image, mask=None, *, semantic=None, scene=None, prompt: str = "") -> FillInputs:
    """Read and check every input; see the module docstring."""
    loaded = _scene(scene, prompt)
    plate = _array("image", image, 3)
    size = plate.shape[:2]
    if mask is None:
        if loaded is None or not loaded.refs:
            raise _invalid("mask", None, "required (or give refs: the union of their boxes becomes the mask)")
        hole = bbox_mask(loaded, size)
    else:
        values = _array("mask", mask, 1)
        _check_size("mask", values, size)
        between = int(((values > 0) & (values < 1)).sum())
        if between:
            logger.info("mask: %d grey pixels binarised at %.2f (>= is repaint)", between, MASK_THRESHOLD)
        hole = values >= MASK_THRESHOLD
    if not hole.any():
        raise _invalid("mask", "all black", "marks no pixel to repaint (white = repaint)")
    sem = None
    if semantic is not None:
        sem_values = _array("semantic", semantic, 3)
        _check_size("semantic", sem_values, size)
        sem = torch.from_numpy(sem_values).float().permute(2, 0, 1)[None] * 2 - 1
    plate_uint8 = np.rint(plate * 255).astype(np.uint8)
    return FillInputs(
        plate=torch.from_numpy(plate_uint8).float().permute(2, 0, 1)[None] / 127.5 - 1.0,
        plate_uint8=plate_uint8,
        mask=torch.from_numpy(hole).float()[None, None],
        mask_bool=hole,
        semantic=sem,
        scene=loaded,
        prompt=loaded.caption if loaded is not None else prompt,
    )


def place_refs(scene: Scene, size: tuple[int, int], padded: tuple[int, int], panels: int) -> Scene:
    """The scene on the arranged canvas: right/bottom padding shrinks the normalised boxes, and in a diptych
    they move into the generated (right) panel."""
    (h, w), (hp, wp) = size, padded
    refs = []
    for ref in scene.refs:
        x0, y0, x1, y1 = ref.bbox
        sx, sy = w / wp, h / hp
        x0, x1 = ((panels - 1) + x0 * sx) / panels, ((panels - 1) + x1 * sx) / panels
        refs.append(ref.model_copy(update={"bbox": (x0, y0 * sy, x1, y1 * sy)}))
    return scene.model_copy(update={"refs": refs, "width": int(wp) * panels, "height": int(hp)})
