"""Scene files (DESIGN.md section 1): a caption, a canvas size and reference images placed by bbox.

A scene is read from JSON or YAML, validated by pydantic, and every violation is reported as a
`Problem` naming the field path (`refs[3].bbox`) and the offending value; all problems of a file are
collected before one `ValidationError` is raised. Image paths are relative to the scene file.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from moviepostproduction.errors import MppError, Problem, ValidationError, problems_from_pydantic, syntax_problem

Depth = Literal["fg", "mg", "bg"]
DEPTHS: tuple[str, ...] = ("fg", "mg", "bg")  # order of the depth one-hot (AlphaPredictor input)
DEFAULT_MAX_REFS = 50
SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class _Context:
    """What validation needs beyond the data itself (passed as pydantic's validation context)."""

    base_dir: Path = field(default_factory=Path.cwd)
    check_images: bool = True
    max_refs: int = DEFAULT_MAX_REFS
    # The raw `panorama` flag, known before refs are validated so that a wrapping bbox is judged in place;
    # None when unknown (direct construction), then `Scene` judges wraps after its refs are built.
    panorama: bool | None = None


def _context(info: ValidationInfo) -> _Context:
    return info.context if isinstance(info.context, _Context) else _Context()


def _fail(kind: str, message: str, shown: object = None) -> PydanticCustomError:
    """A pydantic error carrying our message; `shown` replaces the input as the reported value."""
    # The message travels in the context so that braces in user paths are never read as a template.
    ctx = {"message": message} | ({"shown": shown} if shown is not None else {})
    return PydanticCustomError(kind, "{message}", ctx)


def _image_problem(path: Path) -> str | None:
    """Why `path` is not a readable image, or None when it is."""
    if not path.is_file():
        return f"image file not found: {path}"
    # verify() catches bad checksums without decoding; load() then catches truncated pixel data.
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"cannot decode image file {path}: {reason}"
    return None


def _parse_bbox(value: object, panorama: bool | None) -> tuple[float, float, float, float]:
    if not isinstance(value, list | tuple):
        raise _fail("bbox", "must be a list of 4 numbers [x0, y0, x1, y1]")
    if len(value) != 4:
        raise _fail("bbox", f"must have 4 numbers [x0, y0, x1, y1], not {len(value)}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise _fail("bbox", f"entry {i} ({v!r}) is not a number")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise _fail("bbox", "must be finite (no NaN or inf)")
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise _fail("bbox", "coordinates must lie in [0, 1] (normalised to the canvas)")
    if y0 >= y1:
        raise _fail("bbox", f"needs y0 < y1, got y0={y0:g} >= y1={y1:g}")
    if x0 == x1:
        raise _fail("bbox", f"needs x0 < x1, got zero width at x={x0:g}")
    if x0 > x1:
        if panorama is False:
            raise _fail("bbox", f"needs x0 < x1, got x0={x0:g} > x1={x1:g} (wrapping boxes need panorama: true)")
        if x0 >= 1.0 or x1 <= 0.0:
            raise _fail("bbox", "a box that wraps the seam needs 0 < x1 < x0 < 1")
    return (x0, y0, x1, y1)


class Reference(BaseModel):
    """One reference image placed at a normalised bbox; `image` is absolute after loading."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    image: Path
    bbox: tuple[float, float, float, float]
    depth: Depth = "fg"
    caption: str | None = None

    @field_validator("image", mode="before")
    @classmethod
    def _resolve_image(cls, value: object, info: ValidationInfo) -> Path:
        if not isinstance(value, str | os.PathLike) or not str(value).strip():
            raise _fail("image", "must be a non-empty path to an image file")
        ctx = _context(info)
        path = (ctx.base_dir / Path(value).expanduser()).resolve()
        if ctx.check_images and (problem := _image_problem(path)):
            raise _fail("image", problem)
        return path

    @field_validator("bbox", mode="before")
    @classmethod
    def _check_bbox(cls, value: object, info: ValidationInfo) -> tuple[float, float, float, float]:
        return _parse_bbox(value, _context(info).panorama)

    @field_validator("caption")
    @classmethod
    def _check_caption(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise _fail("caption", "must be a non-empty string or left out")
        return value.strip() if value is not None else None

    @property
    def wraps(self) -> bool:
        """True when the box crosses the panorama seam (x0 > x1)."""
        return self.bbox[0] > self.bbox[2]

    @property
    def area(self) -> float:
        """Fraction of the canvas covered by the box (a wrapping box is 1 - x0 + x1 wide)."""
        x0, y0, x1, y1 = self.bbox
        width = 1.0 - x0 + x1 if self.wraps else x1 - x0
        return width * (y1 - y0)


class Scene(BaseModel):
    """A validated scene. Build it with `load_scene` or `scene_from_dict`."""

    # `panorama` and `height` come before `width`: validators see earlier fields, so the 2:1 rule can be
    # checked on `width` even when other fields are wrong. `to_dict` restores the documented key order.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    caption: str
    panorama: bool = False
    height: int = 1024
    width: int = Field(default=1024, validate_default=True)  # a panorama's default width must be checked too
    seed: int | None = None
    refs: list[Reference] = []

    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("caption")
    @classmethod
    def _check_caption(cls, value: str) -> str:
        if not value.strip():
            raise _fail("caption", "must be a non-empty string")
        return value.strip()

    @field_validator("height", "width")
    @classmethod
    def _check_size(cls, value: int, info: ValidationInfo) -> int:
        if value <= 0 or value % 16:
            raise _fail("size", "must be a positive multiple of 16 (VAE factor 8 x 2x2 packing)")
        height = info.data.get("height")
        if info.field_name == "width" and info.data.get("panorama") and height and value != 2 * height:
            raise _fail("size", f"a panorama needs width == 2 * height, got {value}x{height}")
        return value

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**64:
            raise _fail("seed", "must be in [0, 2**64) (torch.Generator range)")
        return value

    @field_validator("refs", mode="before")
    @classmethod
    def _check_count(cls, value: object, info: ValidationInfo) -> object:
        limit = _context(info).max_refs
        if isinstance(value, list) and len(value) > limit:
            raise _fail("refs", f"too many refs: at most {limit} allowed (max_refs)", len(value))
        return value

    @field_validator("refs")
    @classmethod
    def _check_wraps(cls, value: list[Reference], info: ValidationInfo) -> list[Reference]:
        # Only reached for direct construction: the loaders reject wraps per bbox, where the path is exact.
        if not info.data.get("panorama"):
            for i, ref in enumerate(value):
                if ref.wraps:
                    raise _fail("bbox", f"refs[{i}].bbox wraps the seam (x0 > x1), which needs panorama: true")
        return value

    def model_post_init(self, context: Any, /) -> None:
        if isinstance(context, _Context):
            self._base_dir = context.base_dir

    @property
    def base_dir(self) -> Path | None:
        """Folder the image paths were resolved against (the scene file's folder), if known."""
        return self._base_dir

    def load_ref_images(self) -> list[Image.Image]:
        """The reference images as RGB; transparent pixels are composited onto white."""
        # Files may have changed since validation (or it was skipped with check_images=False).
        problems = [
            Problem(f"refs[{i}].image", str(ref.image), message)
            for i, ref in enumerate(self.refs)
            if (message := _image_problem(ref.image))
        ]
        if problems:
            raise ValidationError(problems)
        images = []
        for ref in self.refs:
            with Image.open(ref.image) as img:
                rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            images.append(Image.alpha_composite(canvas, rgba).convert("RGB"))
        return images

    def to_dict(self) -> dict[str, Any]:
        """Plain data that `scene_from_dict(d, base_dir=scene.base_dir)` turns back into this scene."""
        refs = [
            {"image": _relative(ref.image, self._base_dir), "bbox": list(ref.bbox), "depth": ref.depth}
            | ({"caption": ref.caption} if ref.caption is not None else {})
            for ref in self.refs
        ]
        return {
            "caption": self.caption,
            "width": self.width,
            "height": self.height,
            "seed": self.seed,
            "panorama": self.panorama,
            "refs": refs,
        }


def _relative(path: Path, base_dir: Path | None) -> str:
    if base_dir is None:
        return path.as_posix()
    try:
        return Path(os.path.relpath(path, base_dir)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.as_posix()


def scene_from_dict(
    data: object,
    *,
    base_dir: str | os.PathLike,
    max_refs: int = DEFAULT_MAX_REFS,
    check_images: bool = True,
    source: str | None = None,
) -> Scene:
    """Validate plain data (as parsed from a scene file); image paths are relative to `base_dir`."""
    if isinstance(max_refs, bool) or not isinstance(max_refs, int) or max_refs < 0:
        raise ValidationError([Problem("max_refs", max_refs, "must be an integer >= 0")], source=source)
    if not isinstance(data, dict):
        kind = "nothing (empty file)" if data is None else f"a {type(data).__name__}"
        raise ValidationError(
            [Problem("(top level)", type(data).__name__, f"must be a mapping of keys to values, got {kind}")],
            source=source,
        )
    raw_panorama = data.get("panorama", False)
    ctx = _Context(
        base_dir=Path(base_dir).expanduser().resolve(),
        check_images=check_images,
        max_refs=max_refs,
        panorama=raw_panorama if isinstance(raw_panorama, bool) else None,
    )
    try:
        return Scene.model_validate(data, context=ctx)
    except PydanticValidationError as err:
        raise ValidationError(problems_from_pydantic(err, Scene, Reference), source=source) from None


def load_scene(path: str | os.PathLike, *, max_refs: int = DEFAULT_MAX_REFS, check_images: bool = True) -> Scene:
    """Read and validate a .json / .yaml / .yml scene file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise MppError(f"{path}: unsupported scene file suffix {path.suffix!r} (expected .json, .yaml or .yml)")
    if not path.is_file():
        raise MppError(f"{path}: scene file not found" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise MppError(f"{path}: cannot read scene file: {err}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValidationError([syntax_problem(err, text)], source=str(path)) from None
    return scene_from_dict(data, base_dir=path.parent, max_refs=max_refs, check_images=check_images, source=str(path))
