"""COCO instance annotations (and optionally COCO captions) read, checked and filtered into per-image plans.

Nothing here decodes an image or a mask: every check that needs only the JSON and the file system runs first, so a
malformed file is refused before any sample is built. Decoding is `coco_sample.py`'s.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

from moviepostproduction.datasets.problems import DataProblem, Tally
from moviepostproduction.errors import FileProblem, MppError, shown_path
from moviepostproduction.files import open_regular, resolve_input
from moviepostproduction.scene import resolve_inside

MAX_JSON_BYTES = 1 << 30  # COCO's largest file, instances_train2017.json, is 448 MB (~4 GB of RAM parsed)
MAX_IMAGES = 2_000_000  # per file (COCO train2017: 118,287)
MAX_ANNOTATIONS = 20_000_000  # per file (COCO train2017: 860,001)
BBOX_SLACK = 1.0  # pixels a box may reach past the image edge (float rounding in exporters); clipped


@dataclass(frozen=True)
class CocoAnnotation:
    id: int
    category: str  # the category name, or the annotation's own "caption" when it has one
    bbox: tuple[float, float, float, float]  # x, y, w, h in pixels, clipped to the image
    segmentation: object  # polygons or RLE, decoded by masks.segmentation_mask


@dataclass
class CocoImage:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    caption: str | None = None
    annotations: list[CocoAnnotation] = field(default_factory=list)


@dataclass(frozen=True)
class CocoFilters:
    min_area: float = 0.001  # box area as a fraction of the image
    max_refs: int = 50


def read_json(path: str | Path, what: str) -> object:
    """A JSON file a user named, at most MAX_JSON_BYTES, as plain data; every refusal is one line naming the file."""
    try:
        with open_regular(resolve_input(path), MAX_JSON_BYTES) as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
    except FileProblem as err:
        raise FileProblem(path, f"{what} {err.reason}") from None
    try:
        return json.loads(raw.decode("utf-8-sig"), parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise FileProblem(path, f"{what} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise MppError(f"{shown_path(path)}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None
    except (ValueError, RecursionError) as err:  # NaN / Infinity, an integer past 4300 digits, nesting
        reason = str(err).splitlines()[0] if isinstance(err, ValueError) else "nested too deeply"
        raise MppError(f"{shown_path(path)}: invalid JSON: {reason}") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _records(data: object, key: str, path: Path, most: int) -> list:
    if not isinstance(data, dict):
        raise MppError(f"{shown_path(path)}: must be a COCO JSON object with an {key!r} list")
    records = data.get(key)
    if not isinstance(records, list):
        raise MppError(f"{shown_path(path)}: {key!r} must be a list (a COCO file holds images and annotations)")
    if len(records) > most:
        raise MppError(f"{shown_path(path)}: {len(records)} {key}, more than the {most} allowed")
    return records


def _categories(data: dict, path: Path) -> dict[int, str]:
    names = {}
    for k, cat in enumerate(data.get("categories") if isinstance(data.get("categories"), list) else [None]):
        ok = isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)
        if not ok or not cat["name"].strip():
            raise MppError(f"{shown_path(path)}: categories[{k}] must have an integer id and a non-empty name")
        names[cat["id"]] = cat["name"].strip()
    return names


def _images(data: dict, path: Path, images_dir: Path, tally: Tally) -> dict[int, CocoImage]:
    images: dict[int, CocoImage] = {}
    for k, rec in enumerate(_records(data, "images", path, MAX_IMAGES)):
        if not isinstance(rec, dict) or not _is_int(rec.get("id")):
            tally.bad(DataProblem(path, f"images[{k}]", "needs an integer id", "bad image record"))
            continue
        name, width, height = rec.get("file_name"), rec.get("width"), rec.get("height")
        where = f"image id {rec['id']}"
        if rec["id"] in images:
            tally.bad(DataProblem(path, where, "appears twice in images", "bad image record"))
        elif not isinstance(name, str) or not name:
            tally.bad(DataProblem(path, where, "file_name must be a non-empty string", "bad image record"))
        elif not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            tally.bad(DataProblem(path, where, f"width / height must be positive integers, got {width!r} x {height!r}",
                                  "bad image record"))  # fmt: skip
        else:
            images[rec["id"]] = CocoImage(rec["id"], name, images_dir / name, width, height)
    return images


def _bbox(value: object, image: CocoImage) -> tuple[float, float, float, float] | str:
    """The box clipped to the image, or why it is refused."""
    numbers_ok = isinstance(value, list) and len(value) == 4
    if not numbers_ok or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        return f"bbox must be [x, y, width, height] numbers, got {value!r}"
    x, y, w, h = (float(v) for v in value)
    if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0:
        return f"bbox {value!r} needs finite numbers and a positive width and height"
    s = BBOX_SLACK
    if x < -s or y < -s or x + w > image.width + s or y + h > image.height + s:
        return f"bbox {value!r} lies outside the {image.width}x{image.height} image"
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return f"bbox {value!r} lies outside the {image.width}x{image.height} image"
    return (x0, y0, x1 - x0, y1 - y0)


def _annotation(rec: object, k: int, ctx: tuple, tally: Tally, filters: CocoFilters) -> None:
    path, images, categories = ctx
    if not isinstance(rec, dict) or not _is_int(rec.get("id")):
        return tally.bad(DataProblem(path, f"annotations[{k}]", "needs an integer id", "bad annotation"))
    where = f"annotation id {rec['id']}"
    crowd = rec.get("iscrowd", 0)
    if crowd not in (0, 1) or isinstance(crowd, bool):
        return tally.bad(DataProblem(path, where, f"iscrowd must be 0 or 1, got {crowd!r}", "bad annotation"))
    if crowd == 1:
        return tally.skip("crowd")
    if rec.get("category_id") not in categories:
        message = f"category_id {rec.get('category_id')!r} is not in categories"
        return tally.bad(DataProblem(path, where, message, "unknown category"))
    image = images.get(rec.get("image_id"))
    if image is None:
        message = f"image_id {rec.get('image_id')!r} is not in images"
        return tally.bad(DataProblem(path, where, message, "unknown image"))
    if isinstance(box := _bbox(rec.get("bbox"), image), str):
        return tally.bad(DataProblem(path, where, box, "bbox outside image"))
    if "segmentation" not in rec:
        return tally.bad(DataProblem(path, where, "has no segmentation", "bad segmentation"))
    caption = rec.get("caption")
    if caption is not None and (not isinstance(caption, str) or not caption.strip()):
        return tally.bad(DataProblem(path, where, "caption must be a non-empty string", "bad caption"))
    if box[2] * box[3] < filters.min_area * image.width * image.height:
        return tally.skip("small")
    name = caption.strip() if caption else categories[rec["category_id"]]
    image.annotations.append(CocoAnnotation(rec["id"], name, box, rec["segmentation"]))


def _captions(path: Path, images: dict[int, CocoImage], tally: Tally) -> None:
    """The first caption of each image in file order (COCO captions hold five per image)."""
    for k, rec in enumerate(_records(read_json(path, "captions file"), "annotations", path, MAX_ANNOTATIONS)):
        if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or not rec["caption"].strip():
            tally.bad(DataProblem(path, f"annotations[{k}]", "needs a non-empty caption string", "bad caption"))
        elif (image := images.get(rec.get("image_id"))) is not None and image.caption is None:
            image.caption = " ".join(rec["caption"].split())


def read_coco(
    instances: str | Path,
    images_dir: str | Path,
    captions: str | Path | None = None,
    *,
    filters: CocoFilters | None = None,
    tally: Tally | None = None,
) -> list[CocoImage]:
    """The images (file order) that keep at least one ref after the filters, each with its refs (the `max_refs`
    largest boxes, largest first); crowd, small and surplus refs and images left without refs are counted in
    `tally`, bad records raised (or counted with `tally.skip_bad`). Image files are checked to exist inside
    `images_dir`; none is opened."""
    filters, tally = filters or CocoFilters(), tally if tally is not None else Tally()
    path, images_dir = Path(instances), Path(images_dir).resolve()
    if not images_dir.is_dir():
        raise MppError(f"--images {shown_path(images_dir)}: not a folder")
    data = read_json(path, "instances file")
    records = _records(data, "annotations", path, MAX_ANNOTATIONS)
    images = _images(data, path, images_dir, tally)
    ctx = (path, images, _categories(data, path))
    for k, rec in enumerate(records):
        _annotation(rec, k, ctx, tally, filters)
    if captions is not None:
        _captions(Path(captions), images, tally)
    kept = []
    for image in images.values():
        image.annotations.sort(key=lambda a: -a.bbox[2] * a.bbox[3])
        if len(image.annotations) > filters.max_refs:
            tally.skip("over max refs", len(image.annotations) - filters.max_refs)
            del image.annotations[filters.max_refs :]
        if not image.annotations:
            tally.skip("no refs")
            continue
        inside = resolve_inside(image.file_name, images_dir, images_dir)
        if inside is None or not inside.is_file():
            why = "leaves the --images folder" if inside is None else f"not found in {shown_path(images_dir)}"
            message = f"file_name {image.file_name!r} {why}"
            tally.bad(DataProblem(path, f"image id {image.id}", message, "missing image"))
            continue
        image.path = inside
        kept.append(image)
    return kept
