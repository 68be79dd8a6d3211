"""`mpp annotate DIR -o SCENES`: footage with no annotations -> scene files that `mpp prepare-data --from-scenes`
reads (docs/training-data.md, "Footage without annotations").

Per image of DIR: zero-shot detection of the text queries (`--labels`), a per-label non-maximum suppression, the
best `max_refs` boxes kept; a SAM mask per box; the RGBA crop of the box with the mask as alpha; a depth label from
the median nearness inside the mask (`depth_rule`, or the box rule without a depth model); a caption from the
captioner, else the labels joined ("a photo of person and car"). SCENES gets, per image with refs:
`NAME.json` (the Scene schema), `NAME.<ext>` (the image's bytes copied) and `refs/NAME/NN.png`.

SCENES is built under a temporary name beside it and renamed into place when every image is done: a failed or killed
run leaves no half-written folder, and an existing SCENES is replaced (only with `overwrite`) whole or not at all.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moviepostproduction.datasets.coco_sample import caption_from_refs
from moviepostproduction.datasets.crops import UnreadableImage, load_rgb, normalised, pixel_window, rgba_crop
from moviepostproduction.datasets.depth_rule import depth_from_box, depth_from_nearness
from moviepostproduction.datasets.problems import DataProblem, Tally
from moviepostproduction.datasets.real_format import canvas_size
from moviepostproduction.datasets.scenes import ASPECT_TOLERANCE, MAX_SCENE_FILES, TARGET_SUFFIXES
from moviepostproduction.errors import FileProblem, MppError, Problem, ValidationError, shown_path
from moviepostproduction.files import open_regular, resolve_input, staged_copy, write_json_atomic
from moviepostproduction.scene import DEPTHS

# Everyday things a film plate holds; `--labels` replaces them.
DEFAULT_LABELS = ("person", "car", "chair", "table", "dog", "cat", "bicycle", "bottle", "cup", "potted plant")
MAX_LABELS = 100  # Grounding DINO reads at most 256 text tokens for all of them together
MAX_LABEL_CHARS = 60


@dataclass(frozen=True)
class AnnotateConfig:
    """`mpp annotate`'s options (docs/training-data.md)."""

    labels: tuple[str, ...] = DEFAULT_LABELS
    threshold: float = 0.2  # detector score; OWLv2 scores run lower than Grounding DINO's (use ~0.35 there)
    nms_iou: float = 0.5  # of two boxes of one label overlapping more, the lower-scoring one is dropped
    max_refs: int = 20  # the best-scoring boxes of an image kept
    min_area: float = 0.001  # box area / image area; smaller boxes are dropped (as prepare-data does)
    max_images: int = MAX_SCENE_FILES
    max_pixels: int = 2048 * 2048  # the scene's canvas: the image scaled down to at most this, sides x16
    skip_bad: bool = False  # unreadable / odd-sized images skipped and counted instead of stopping the run
    overwrite: bool = False

    def check(self) -> None:
        checks = [
            ("--threshold", self.threshold, 0.0 <= self.threshold < 1.0, "must be in [0, 1)"),
            ("--nms-iou", self.nms_iou, 0.0 < self.nms_iou <= 1.0, "must be in (0, 1]"),
            ("--max-refs", self.max_refs, 1 <= self.max_refs <= 1000, "must be in [1, 1000]"),
            ("--min-area", self.min_area, 0.0 <= self.min_area < 1.0, "must be in [0, 1)"),
            ("--max-images", self.max_images, 1 <= self.max_images <= MAX_SCENE_FILES,
             f"must be in [1, {MAX_SCENE_FILES}]"),
            ("--max-pixels", self.max_pixels, 256 <= self.max_pixels <= 8192 * 8192, "must be in [256, 8192^2]"),
        ]  # fmt: skip
        problems = [Problem(flag, value, message) for flag, value, ok, message in checks if not ok]
        if not self.labels or len(self.labels) > MAX_LABELS:
            problems.append(Problem("--labels", len(self.labels), f"give 1 to {MAX_LABELS} labels"))
        for label in self.labels:
            if not label.strip() or len(label) > MAX_LABEL_CHARS or not label.isprintable():
                problems.append(Problem("--labels", label, f"each label: 1 to {MAX_LABEL_CHARS} printable characters"))
        if len(set(self.labels)) != len(self.labels):
            problems.append(Problem("--labels", ",".join(self.labels), "lists a label twice"))
        if problems:
            raise ValidationError(problems)


def parse_labels(text: str) -> tuple[str, ...]:
    """ "person, car" or one label a line (a labels file) -> ("person", "car"); blank entries dropped."""
    return tuple(part.strip() for line in text.splitlines() for part in line.split(",") if part.strip())


def read_labels_file(path: str | Path) -> tuple[str, ...]:
    """The labels of a UTF-8 text file, one a line (or comma-separated), at most 64 KiB; one line naming it."""
    try:
        with open_regular(resolve_input(path), 1 << 16) as fh:
            return parse_labels(fh.read().decode("utf-8-sig"))
    except FileProblem as err:
        raise MppError(f"--labels-file {shown_path(path)}: {err.reason}") from None
    except UnicodeDecodeError:
        raise MppError(f"--labels-file {shown_path(path)}: is not UTF-8 text") from None


def source_images(folder: str | Path, limit: int = MAX_SCENE_FILES) -> list[Path]:
    """The images of `folder` (not its subfolders; .png / .jpg / .jpeg / .webp), sorted by name; one line for a
    folder that is missing, empty, over `limit` or holds two images of one name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MppError(f"DIR {shown_path(folder)}: not a folder")
    found: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.suffix.lower() in TARGET_SUFFIXES and path.is_file():
            if path.stem in found:
                message = f"{found[path.stem].name} and {path.name} would write one scene file; rename one"
                raise MppError(f"DIR {shown_path(folder)}: {message}")
            found[path.stem] = path
            if len(found) > limit:
                raise MppError(f"DIR {shown_path(folder)}: more than {limit} images (--max-images)")
    if not found:
        raise MppError(f"DIR {shown_path(folder)}: holds no {' / '.join(TARGET_SUFFIXES)} image")
    return sorted(found.values())


def suppress(found: list, iou: float) -> list:
    """Greedy non-maximum suppression per label over Detections sorted best first: a box overlapping a kept box of
    its label by more than `iou` (intersection over union) is dropped."""
    kept: list = []
    for det in found:
        if all(k.label != det.label or box_iou(k.box, det.box) <= iou for k in kept):
            kept.append(det)
    return kept


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


@dataclass
class Annotators:
    """The loaded models; `segmenter` is required, the depth model and the captioner are optional."""

    detector: object
    segmenter: object
    depth: object | None = None
    captioner: object | None = None


def annotate_image(path: Path, stage: Path, models: Annotators, config: AnnotateConfig, tally: Tally) -> dict | None:
    """Detect, segment, label and write one image's scene into `stage`; returns the scene dict (None when no ref was
    left: nothing is written for it)."""
    try:
        pil = load_rgb(path)
    except (FileProblem, UnreadableImage) as err:
        reason = err.reason if isinstance(err, FileProblem) else str(err)
        tally.bad(DataProblem(path, "image", f"cannot read the image: {reason}", "unreadable image"))
        return None
    width, height = canvas_size(pil.width, pil.height, config.max_pixels)
    if abs(math.log((width / height) / (pil.width / pil.height))) > ASPECT_TOLERANCE:
        message = f"is {pil.width}x{pil.height}: its scene side would be {width}x{height} (another aspect; crop it)"
        tally.bad(DataProblem(path, "image", message, "image size mismatch"))
        return None
    found = suppress(models.detector.detect(pil, list(config.labels), config.threshold), config.nms_iou)
    windows, labels = [], []
    for det in found:
        x0, y0, x1, y1 = det.box
        window = pixel_window((x0, y0, x1 - x0, y1 - y0))
        if (window[2] - window[0]) * (window[3] - window[1]) < config.min_area * pil.width * pil.height:
            tally.skip("small")
        elif len(windows) == config.max_refs:
            tally.skip("over max refs")
        else:
            windows.append(window)
            labels.append(det.label)
    masks = models.segmenter.masks(pil, [tuple(map(float, w)) for w in windows])  # (K, H, W) bool
    nearness = models.depth.nearness(pil) if models.depth is not None and windows else None  # (H, W) in [0, 1]
    pixels = np.asarray(pil)  # (H, W, 3)
    refs = []
    for window, label, mask in zip(windows, labels, masks, strict=True):
        inside = np.zeros_like(mask)
        inside[window[1] : window[3], window[0] : window[2]] = mask[window[1] : window[3], window[0] : window[2]]
        if not inside.any():
            tally.skip("empty mask")
            continue
        box = normalised(window, pil.width, pil.height)
        depth = depth_from_box(box) if nearness is None else depth_from_nearness(nearness, inside)
        refs.append((rgba_crop(pixels, inside, window), box, depth, label))
    if not refs:
        tally.skip("no refs")
        return None
    refs.sort(key=lambda r: (DEPTHS.index(r[2]), -(r[1][2] - r[1][0]) * (r[1][3] - r[1][1])))  # front to back
    caption = models.captioner.caption(pil) if models.captioner is not None else ""
    scene = {
        "caption": caption or caption_from_refs([r[3] for r in refs]),
        "width": width,
        "height": height,
        "refs": [],
    }
    (stage / "refs" / path.stem).mkdir(parents=True)
    for i, (crop, box, depth, label) in enumerate(refs):
        name = f"refs/{path.stem}/{i:02d}.png"
        Image.fromarray(crop).save(stage / name)  # (h, w, 4) uint8: RGBA
        scene["refs"].append({"image": name, "bbox": [round(v, 6) for v in box], "depth": depth, "caption": label})
    shutil.copyfile(path, stage / f"{path.stem}{path.suffix.lower()}")
    write_json_atomic(scene, stage / f"{path.stem}.json")
    tally.images += 1
    tally.refs += len(refs)
    return scene


def check_scenes_out(out: str | Path, overwrite: bool) -> Path:
    """Refuse, before any work, a SCENES that is a file, or a non-empty folder without `overwrite`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValidationError([Problem("-o", str(out), "is a file, not a folder")])
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValidationError([Problem("-o", str(out), "is not empty; pass --overwrite to replace it whole")])
    return out


def annotate_folder(
    images: list[Path],
    out: str | Path,
    models: Annotators,
    config: AnnotateConfig,
    progress: Callable[[int], None] | None = None,
) -> Tally:
    """Annotate `images` into the folder `out` (staged, renamed into place at the end); returns the counts."""
    out = check_scenes_out(out, config.overwrite)
    tally = Tally(skip_bad=config.skip_bad)
    with staged_copy(None, out, replace=out.exists()) as stage:
        for path in images:
            annotate_image(path, stage, models, config, tally)
            if progress is not None:
                progress(1)
        if tally.images == 0:
            raise MppError(f"-o {shown_path(out)}: no image gave a ref ({tally.summary()}); nothing written")
    return tally


def annotate(
    images: str | Path,
    out: str | Path,
    *,
    detector: str | Path,
    segmenter: str | Path,
    depth: str | Path | None = None,
    captioner: str | Path | None = None,
    device: str = "auto",
    config: AnnotateConfig | None = None,
    progress: bool = False,
) -> Tally:
    """`mpp annotate`: the options, DIR and SCENES checked first, then the models loaded (each folder checked before
    it loads), then every image annotated. Returns the counts."""
    from tqdm import tqdm

    from moviepostproduction.datasets.annotate_models import Captioner, Detector, Segmenter, quiet_loading
    from moviepostproduction.datasets.depth_rule import DepthModel
    from moviepostproduction.devices import resolve_device
    from moviepostproduction.files import check_output

    config = config or AnnotateConfig()
    config.check()
    files = source_images(images, config.max_images)
    check_output(out, "-o", folder=True)
    check_scenes_out(out, config.overwrite)
    device = resolve_device(device)
    with quiet_loading():
        models = Annotators(
            Detector(detector, device),
            Segmenter(segmenter, device),
            DepthModel(depth, device, flag="--depth") if depth is not None else None,
            Captioner(captioner, device) if captioner is not None else None,
        )
    with tqdm(total=len(files), unit="image", desc="annotate", disable=None if progress else True) as bar:
        return annotate_folder(files, out, models, config, progress=bar.update)
