"""`mpp prepare-data --from-scenes DIR`: scene files beside their target images -> RealSamples.

DIR holds scene files (`NAME.json` / `.yaml` / `.yml`, the Scene schema, read by `load_scene`) and, beside each, its
target image `NAME.png` / `.jpg` / `.jpeg` / `.webp` (exactly one). A ref's image is its RGBA crop (alpha = the
instance mask), or an RGB / grey crop with its mask beside it as `REFNAME.mask.png` (same size, non-zero = inside),
or a crop with neither (kept whole: alpha 255). This is the layout `mpp annotate` writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moviepostproduction.datasets.crops import UnreadableImage, load_rgb, stored_target, to_rgb
from moviepostproduction.datasets.problems import DataProblem, Tally
from moviepostproduction.datasets.real_format import RealRef, RealSample
from moviepostproduction.errors import FileProblem, MppError, shown_path
from moviepostproduction.scene import SUFFIXES, Reference, Scene, load_scene, open_image

TARGET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_SCENE_FILES = 2_000_000
MAX_SCENE_REFS = 1000  # refs a scene file may list; --max-refs keeps the first of them
ASPECT_TOLERANCE = 0.02  # |log(scene aspect / target aspect)|: the Scene's multiple-of-16 sides round the aspect


@dataclass(frozen=True)
class SceneFilters:
    min_area: float = 0.001
    max_refs: int = 50


def scene_files(folder: str | Path) -> list[Path]:
    """The scene files of `folder` (not its subfolders), sorted by name; at most MAX_SCENE_FILES."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MppError(f"--from-scenes {shown_path(folder)}: not a folder")
    files = []
    for path in folder.iterdir():
        if path.suffix.lower() in SUFFIXES and path.is_file():
            files.append(path)
            if len(files) > MAX_SCENE_FILES:
                raise MppError(f"--from-scenes {shown_path(folder)}: more than {MAX_SCENE_FILES} scene files")
    if not files:
        raise MppError(f"--from-scenes {shown_path(folder)}: holds no .json / .yaml / .yml scene file")
    return sorted(files)


def _target(path: Path) -> Path:
    found = [path.with_suffix(s) for s in TARGET_SUFFIXES if path.with_suffix(s).is_file()]
    if len(found) != 1:
        reason = "bad scene" if found else "missing image"
        names = ", ".join(p.name for p in found) or f"{path.stem}{{{','.join(TARGET_SUFFIXES)}}}"
        raise DataProblem(path, "target image", f"needs exactly one target image beside it, found: {names}", reason)
    return path.with_suffix(next(s for s in TARGET_SUFFIXES if path.with_suffix(s).is_file()))


def _ref_rgba(ref: Reference, path: Path, index: int) -> np.ndarray:
    """(h, w, 4) uint8 of one ref: its own alpha, else its .mask.png, else opaque."""
    where = f"refs[{index}].image"
    with open_image(ref.image) as (_, img):
        img.load()
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        rgba = np.asarray(img.convert("RGBA")) if has_alpha else None
        rgb = None if has_alpha else np.asarray(to_rgb(img))
    if rgba is None:
        mask_path = ref.image.with_name(ref.image.stem + ".mask.png")
        alpha = np.full(rgb.shape[:2], 255, dtype=np.uint8)
        if mask_path.is_file():
            with open_image(mask_path) as (_, mask_img):
                mask = np.asarray(mask_img.convert("L"))
            if mask.shape != rgb.shape[:2]:
                message = f"{mask_path.name} is {mask.shape[1]}x{mask.shape[0]}, the crop {rgb.shape[1]}x{rgb.shape[0]}"
                raise DataProblem(path, where, message, "bad scene")
            alpha = np.where(mask > 0, 255, 0).astype(np.uint8)
        rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    if not rgba[..., 3].any():
        raise DataProblem(path, where, f"{ref.image.name}: the mask is empty", "empty mask")
    return rgba


def scene_sample(path: Path, key: str, *, filters: SceneFilters, tally: Tally, max_pixels: int) -> RealSample | None:
    """The sample of one scene file; bad input raises a DataProblem (the caller counts it with --skip-bad)."""
    try:
        scene: Scene = load_scene(path, max_refs=MAX_SCENE_REFS)
    except MppError as err:
        lines = str(err).splitlines()
        more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
        raise DataProblem(path, "scene", lines[0].removeprefix(f"{shown_path(path)}: ") + more, "bad scene") from None
    if scene.panorama:
        raise DataProblem(path, "panorama", "panorama scenes cannot be imported (their boxes may wrap)", "bad scene")
    target = _target(path)
    try:
        pil = load_rgb(target)
    except (FileProblem, UnreadableImage) as err:
        reason = err.reason if isinstance(err, FileProblem) else str(err)
        raise DataProblem(target, "target image", f"cannot read the image: {reason}", "unreadable image") from None
    if abs(math.log((scene.width / scene.height) / (pil.width / pil.height))) > ASPECT_TOLERANCE:
        message = f"the scene is {scene.width}x{scene.height}, its image {pil.width}x{pil.height} (another aspect)"
        raise DataProblem(path, "target image", message, "image size mismatch")
    refs = []
    for i, ref in enumerate(scene.refs):
        if ref.area < filters.min_area:
            tally.skip("small")
        elif len(refs) == filters.max_refs:
            tally.skip("over max refs")
        else:
            try:
                refs.append(RealRef(_ref_rgba(ref, path, i), ref.bbox, ref.depth, ref.caption))
            except DataProblem as problem:
                tally.bad(problem)
    if not refs:
        tally.skip("no refs")
        return None
    meta = {"source": path.name, "target": target.name, "depth_source": "scene file", "original_size": list(pil.size)}
    return RealSample(key, stored_target(pil, max_pixels), scene.caption, refs, meta)


def scene_samples(
    files: list[Path], *, filters: SceneFilters, tally: Tally, max_pixels: int
) -> Iterator[tuple[str, RealSample | None]]:
    """(source name, sample or None) per scene file, in order; bad files raised or counted in `tally`."""
    for path in files:
        try:
            sample = scene_sample(path, "", filters=filters, tally=tally, max_pixels=max_pixels)
        except DataProblem as problem:
            tally.bad(problem)
            sample = None
        yield path.name, sample
