"""One COCO image and its kept annotations -> one RealSample: masks decoded, RGBA crops cut, depth labelled."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moviepostproduction.datasets.coco import CocoImage
from moviepostproduction.datasets.crops import (
    UnreadableImage,
    load_rgb,
    normalised,
    pixel_window,
    rgba_crop,
    stored_target,
)
from moviepostproduction.datasets.depth_rule import DepthModel, depth_from_box, depth_from_nearness
from moviepostproduction.datasets.masks import MaskProblem, segmentation_mask
from moviepostproduction.datasets.problems import DataProblem, Tally
from moviepostproduction.datasets.real_format import RealRef, RealSample
from moviepostproduction.errors import FileProblem
from moviepostproduction.scene import DEPTHS


def caption_from_refs(names: list[str]) -> str:
    """The global caption of an image without one: its ref captions, each once, in ref order."""
    unique = list(dict.fromkeys(names))
    listed = unique[0] if len(unique) == 1 else f"{', '.join(unique[:-1])} and {unique[-1]}"
    return f"a photo of {listed}"


def coco_sample(
    image: CocoImage,
    key: str,
    *,
    source: Path,
    tally: Tally,
    max_pixels: int,
    depth_model: DepthModel | None = None,
) -> RealSample | None:
    """The sample of `image`, or None when nothing of it is left (its bad annotations counted in `tally`, or raised:
    `source` names the instances file in messages)."""
    try:
        pil = load_rgb(image.path)
    except (FileProblem, UnreadableImage) as err:
        reason = err.reason if isinstance(err, FileProblem) else str(err)
        message = f"cannot read the image: {reason}"
        tally.bad(DataProblem(image.path, f"image id {image.id}", message, "unreadable image"))
        return None
    if pil.size != (image.width, image.height):
        message = f"is {pil.width}x{pil.height}, the annotations say {image.width}x{image.height}"
        tally.bad(DataProblem(image.path, f"image id {image.id}", message, "image size mismatch"))
        return None
    pixels = np.asarray(pil)  # (H, W, 3)
    nearness = depth_model.nearness(pil) if depth_model is not None else None  # (H, W) in [0, 1]
    refs, ids = [], []
    for ann in image.annotations:
        where = f"annotation id {ann.id}"
        try:
            mask = segmentation_mask(ann.segmentation, image.height, image.width)  # (H, W) bool
        except MaskProblem as err:
            tally.bad(DataProblem(source, where, str(err), "bad segmentation"))
            continue
        window = pixel_window(ann.bbox)
        crop = rgba_crop(pixels, mask, window)
        if not crop[..., 3].any():
            tally.bad(DataProblem(source, where, "the mask is empty inside the bbox", "empty mask"))
            continue
        box = normalised(window, image.width, image.height)
        depth = depth_from_box(box) if nearness is None else depth_from_nearness(nearness, mask)
        refs.append(RealRef(crop, box, depth, ann.category))
        ids.append(ann.id)
    if not refs:
        tally.skip("no refs")
        return None
    # Front to back: the depth label first, then the larger box (the toy world's order).
    order = sorted(range(len(refs)), key=lambda i: (DEPTHS.index(refs[i].depth), -_area(refs[i].bbox)))
    refs, ids = [refs[i] for i in order], [ids[i] for i in order]
    meta = {
        "source": image.file_name,
        "image_id": image.id,
        "annotation_ids": ids,
        "original_size": [image.width, image.height],
        "caption_source": "captions" if image.caption else "categories",
        "depth_source": f"model {depth_model.name}" if depth_model is not None else "box rule",
    }
    caption = image.caption or caption_from_refs([r.caption for r in refs])
    return RealSample(key, stored_target(pil, max_pixels), caption, refs, meta)


def _area(box: tuple[float, float, float, float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])
