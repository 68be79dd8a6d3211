"""Depth labels (fg / mg / bg) for refs: from a depth model when one is given, else from the box alone.

The box rule (no model): in a photograph taken near eye level the ground plane rises toward the horizon, so the
lower an object's ground contact (its box's bottom edge) sits in the frame, the nearer it is; and of objects of a
similar size, the nearer one covers more of the frame (Hoiem, Efros and Hebert 2006, "Putting objects in
perspective"). The toy world places its sprites by the same rule (big and low = fg, small near the horizon = bg).
Area thresholds are COCO's own size classes at its typical 640 x 480: "large" (> 96^2 px, 3 % of the frame) and
"small" (< 32^2 px, 0.33 %).

The model rule: the depth map, turned into nearness in [0, 1] (1 = nearest; the 2nd and 98th percentiles of the
image mapped to 0 and 1), and the median nearness inside the instance mask: fg from 2/3 up, bg below 1/3, else mg.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.errors import MppError

LARGE_AREA = 0.03  # COCO "large" (96^2 of 640 x 480)
SMALL_AREA = 0.0033  # COCO "small" (32^2 of 640 x 480)
FG_BOTTOM = 0.6  # a large box whose bottom edge is in the lower 40 % of the frame
FRAME_BOTTOM = 0.95  # a box touching the bottom edge of the frame
BG_BOTTOM = 0.4  # a box ending in the upper 40 % of the frame
FG_NEARNESS, BG_NEARNESS = 2 / 3, 1 / 3
DISTANCE_MODELS = ("zoedepth", "glpn")  # model types whose output grows with distance (metric depth)


def depth_from_box(bbox: tuple[float, float, float, float]) -> str:
    """The box rule: "fg" for a large box low in the frame or any box touching the frame's bottom edge, "bg" for a
    small box or one ending high in the frame, else "mg"."""
    x0, y0, x1, y1 = bbox
    area = (x1 - x0) * (y1 - y0)
    if (area >= LARGE_AREA and y1 >= FG_BOTTOM) or y1 >= FRAME_BOTTOM:
        return "fg"
    if area < SMALL_AREA or y1 < BG_BOTTOM:
        return "bg"
    return "mg"


def depth_from_nearness(nearness: np.ndarray, mask: np.ndarray) -> str:
    """The model rule on a (H, W) nearness map in [0, 1] and a (H, W) bool instance mask (not empty)."""
    value = float(np.median(nearness[mask]))
    return "fg" if value >= FG_NEARNESS else "bg" if value < BG_NEARNESS else "mg"


def to_nearness(depth: np.ndarray, grows_with_distance: bool) -> np.ndarray:
    """(H, W) model output -> (H, W) nearness in [0, 1]: robust min-max (2nd / 98th percentiles), flipped for a
    metric model; a flat map is 0.5 everywhere (every ref "mg")."""
    depth = depth.astype(np.float64)
    lo, hi = np.percentile(depth, [2, 98])
    if not np.isfinite([lo, hi]).all() or hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.full(depth.shape, 0.5)
    near = np.clip((depth - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 - near if grows_with_distance else near


class DepthModel:
    """A transformers depth-estimation pipeline from a local model folder (Depth Anything, DPT, ZoeDepth, ...),
    safetensors weights only (a pickled .bin is never loaded)."""

    def __init__(self, folder: str | Path, device: str = "cpu", flag: str = "--depth-model"):
        import torch

        folder = Path(folder)
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise MppError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps)") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise MppError(f"--device {device!r}: this machine has no CUDA device")
        if not (folder / "config.json").is_file():
            raise MppError(f"{flag} {folder}: no config.json (expected a transformers depth-estimation folder)")
        try:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation, pipeline

            model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True)
            processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MppError(f"{flag} {folder}: cannot load a depth-estimation model ({reason})") from None
        self.pipe = pipeline("depth-estimation", model=model.eval(), image_processor=processor, device=device)
        config = model.config
        self.grows_with_distance = (
            getattr(config, "depth_estimation_type", None) == "metric" or config.model_type in DISTANCE_MODELS
        )
        self.name = folder.name

    def nearness(self, image: Image.Image) -> np.ndarray:
        """(H, W) nearness in [0, 1] at the image's own size (the pipeline resizes its prediction back)."""
        out = self.pipe(image)
        depth = out["predicted_depth"].detach().float().cpu().numpy().reshape(image.height, image.width)
        return to_nearness(depth, self.grows_with_distance)
