"""Scene files (DESIGN.md section 1): a caption, a canvas size and reference images placed by bbox.

A scene is read from JSON or YAML, validated by pydantic, and every violation is reported as a
`Problem` naming the field path (`refs[3].bbox`) and the offending value; all problems of a file are
collected before one `ValidationError` is raised. Image paths are relative to the scene file.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticCustomError

from moviepostproduction.errors import (
    FileProblem,
    MppError,
    Problem,
    ValidationError,
    data_problem,
    problems_from_pydantic,
    shown_path,
)
from moviepostproduction.files import open_regular, read_structured, resolve_input

Depth = Literal["fg", "mg", "bg"]
DEPTHS: tuple[str, ...] = ("fg", "mg", "bg")  # order of the depth one-hot (AlphaPredictor input)
DEFAULT_MAX_REFS = 50
SUFFIXES = (".json", ".yaml", ".yml")
MAX_IMAGE_BYTES = 256 << 20  # an image file a user names; its pixels are bounded by PIL's MAX_IMAGE_PIXELS


@dataclass(frozen=True)
class _Context:
    """What validation needs beyond the data itself (passed as pydantic's validation context)."""

    base_dir: Path = field(default_factory=Path.cwd)
    check_images: bool = True
    root: Path | None = None  # when set, every image must resolve inside it (ComfyUI's input directory)
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


@contextmanager
def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Iterator[tuple[BinaryIO, Image.Image]]:
    """An image file a user named, open with only its header read: a FIFO, a device or a folder is refused unopened
    (`files.open_regular`), and more than `max_pixels` (default PIL's MAX_IMAGE_PIXELS) before any pixel is decoded
    (a decompression bomb); both as a FileProblem."""
    with open_regular(path, MAX_IMAGE_BYTES) as fh, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # bounded below, in one line
        limit = max_pixels or Image.MAX_IMAGE_PIXELS
        try:
            img = Image.open(fh)
        except Image.DecompressionBombError:  # past twice PIL's limit
            raise FileProblem(path, f"has more than {limit} pixels (a decompression bomb?)") from None
        with img:
            if limit and img.width * img.height > limit:
                raise FileProblem(
                    path, f"is {img.width}x{img.height}, more than {limit} pixels (a decompression bomb?)"
                )
            yield fh, img


def _image_problem(path: Path) -> str | None:
    """Why `path` is not a readable image, or None when it is."""
    # verify() catches bad checksums without decoding; load() then catches truncated pixel data.
    try:
        with open_image(path) as (fh, img):
            img.verify()
            fh.seek(0)
            with Image.open(fh) as again:
                again.load()
    except FileProblem as err:
        return f"image file {err.reason}: {shown_path(path)}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        reason = "not a format Pillow knows" if isinstance(err, UnidentifiedImageError) else reason
        return f"cannot decode image file {shown_path(path)}: {reason}"
    return None


def _unicode(text: str) -> str:
    """`text`, unless it holds a lone UTF-16 surrogate (JSON's "\\ud800"), which the tokenizer cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _fail("text", f"has a lone UTF-16 surrogate at character {err.start}") from None
    return text


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
        if ctx.root is not None and resolve_inside(str(value), ctx.base_dir, ctx.root) is None:
            raise _fail("image", "must be a relative path to an image file inside the input directory")
        try:
            path = resolve_input(value, ctx.base_dir)  # a loop, too long, an unknown ~user: refused unopened
        except FileProblem as err:
            raise _fail("image", f"image file {err.reason}") from None
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
        return _unicode(value.strip()) if value is not None else None

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
        return _unicode(value.strip())

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
            with open_image(ref.image) as (_, img):
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


def resolve_inside(name: str, base_dir: Path, root: Path) -> Path | None:
    """The resolved path of `name` (relative to `base_dir`) when it lies inside the resolved folder `root`; None
    when `name` is absolute, starts with `~`, or leaves `root` by `..` or through a link. The answer never depends
    on whether anything outside `root` exists, so a refusal reveals nothing about the rest of the machine."""
    if not name or Path(name).is_absolute() or name.startswith("~") or "\0" in name:
        return None
    try:
        lexical = Path(os.path.normpath(base_dir / name))  # `..` judged as written, before any link is followed
        path = lexical.resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a name too long
        return None
    return path if lexical.is_relative_to(root) and path.is_relative_to(root) else None


def scene_from_dict(
    data: object,
    *,
    base_dir: str | os.PathLike,
    max_refs: int = DEFAULT_MAX_REFS,
    check_images: bool = True,
    source: str | None = None,
    root: str | os.PathLike | None = None,
) -> Scene:
    """Validate plain data (as parsed from a scene file); image paths are relative to `base_dir`. With `root`
    (ComfyUI's input directory), every image path must be relative and resolve inside `root`."""
    if isinstance(max_refs, bool) or not isinstance(max_refs, int) or max_refs < 0:
        raise ValidationError([Problem("max_refs", max_refs, "must be an integer >= 0")], source=source)
    if not isinstance(data, dict):
        kind = "nothing (empty file)" if data is None else f"a {type(data).__name__}"
        raise ValidationError(
            [Problem("(top level)", type(data).__name__, f"must be a mapping of keys to values, got {kind}")],
            source=source,
        )
    if problem := data_problem(data):  # nesting, size, huge integers, lone surrogates: before pydantic recurses
        raise ValidationError([problem], source=source)
    raw_panorama = data.get("panorama", False)
    ctx = _Context(
        base_dir=Path(base_dir).expanduser().resolve(),
        check_images=check_images,
        max_refs=max_refs,
        root=Path(root).resolve() if root is not None else None,
        panorama=raw_panorama if isinstance(raw_panorama, bool) else None,
    )
    try:
        return Scene.model_validate(data, context=ctx)
    except PydanticValidationError as err:
        raise ValidationError(problems_from_pydantic(err, Scene, Reference), source=source) from None


def load_scene(
    path: str | os.PathLike,
    *,
    max_refs: int = DEFAULT_MAX_REFS,
    check_images: bool = True,
    root: str | os.PathLike | None = None,
) -> Scene:
    """Read and validate a .json / .yaml / .yml scene file (`root`: as in `scene_from_dict`). The file is read by
    `files.read_structured`: a FIFO, a device, a symlink loop, a path too long, an unknown `~user`, more than 1 MiB,
    nesting past 64, more than 100,000 values (YAML aliases counted in full), YAML tags, duplicate keys and
    integers past 4300 digits are refused in one line naming the file."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise MppError(f"{path}: unsupported scene file suffix {path.suffix!r} (expected .json, .yaml or .yml)")
    data = read_structured(path, "scene file")
    return scene_from_dict(
        data, base_dir=path.parent, max_refs=max_refs, check_images=check_images, source=shown_path(path), root=root
    )
