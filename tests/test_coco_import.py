"""`mpp prepare-data --from-coco`: COCO polygons and RLE (both count forms) decoded by our own code, RGBA crops whose
alpha is the instance mask, normalised boxes, captions, depth labels (box rule and a tiny random-init Depth Anything),
filters counted, bad records as one-line errors naming the file and the annotation (or skipped with --skip-bad), and
nothing written on failure. Every image and JSON is made here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.datasets.coco import CocoFilters, read_coco
from moviepostproduction.datasets.depth_rule import DepthModel, depth_from_box, depth_from_nearness
from moviepostproduction.datasets.masks import polygon_mask, rle_counts_from_string, rle_mask
from moviepostproduction.datasets.prepare import PrepareConfig, prepare_coco
from moviepostproduction.datasets.problems import Tally
from moviepostproduction.datasets.real_format import iter_real_samples
from moviepostproduction.errors import MppError


# ------------------------------------------------------------------------------------------------ COCO fixtures
def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a (H, W) bool mask in column-major order, 0s first (the COCO RLE definition)."""
    flat = mask.T.ravel().astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def rle_string(counts: list[int]) -> str:
    """COCO's compressed counts (maskApi.c rleToString), written from the spec: from the third value on store the
    difference from the value two before; each value as 5-bit groups, low first, +48, 0x20 = more follows, and the
    last group's 0x10 bit is the sign."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = x & 0x1F
            x >>= 5  # arithmetic shift, as C's on a signed long
            more = x != -1 if group & 0x10 else x != 0
            chars.append(chr((group | (0x20 if more else 0)) + 48))
    return "".join(chars)


def disc(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def bbox_of(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


W, H = 64, 48
RECT = np.zeros((H, W), bool)
RECT[8:24, 8:24] = True  # the polygon [8, 8, 24, 8, 24, 24, 8, 24] by the pixel-centre rule
DISC = disc(H, W, 44, 30, 9)
DISC2 = disc(H, W, 20, 38, 7)


def make_coco(root: Path, changes: dict | None = None) -> tuple[Path, Path, Path]:
    """images/a.png (RGB 64x48), images/b.png (grey 32x32), images/c.png (RGBA 32x32); instances.json with a
    polygon, an uncompressed RLE, a compressed RLE, a crowd and a too-small annotation on a.png and one polygon on
    b.png and c.png; captions.json with a caption for a.png only. `changes` edits annotations by id."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(images / "b.png")
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: composited onto white
    Image.fromarray(rgba, "RGBA").save(images / "c.png")
    anns = [
        {"id": 1, "image_id": 10, "category_id": 1, "bbox": [8, 8, 16, 16], "iscrowd": 0,
         "segmentation": [[8, 8, 24, 8, 24, 24, 8, 24]]},
        {"id": 2, "image_id": 10, "category_id": 2, "bbox": bbox_of(DISC), "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": rle_counts(DISC)}},
        {"id": 3, "image_id": 10, "category_id": 1, "bbox": bbox_of(DISC2), "iscrowd": 0,
         "segmentation": {"size": [H, W], "counts": rle_string(rle_counts(DISC2))}},
        {"id": 4, "image_id": 10, "category_id": 1, "bbox": [0, 0, 30, 30], "iscrowd": 1,
         "segmentation": {"size": [H, W], "counts": rle_counts(RECT)}},
        {"id": 5, "image_id": 10, "category_id": 2, "bbox": [40, 2, 1, 2], "iscrowd": 0,
         "segmentation": [[40, 2, 41, 2, 41, 4, 40, 4]]},
        {"id": 6, "image_id": 11, "category_id": 2, "bbox": [0, 16, 32, 16], "iscrowd": 0,
         "segmentation": [[0, 16, 32, 16, 32, 32, 0, 32]]},
        {"id": 7, "image_id": 12, "category_id": 1, "bbox": [4, 4, 8, 8], "iscrowd": 0,
         "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]},
    ]  # fmt: skip
    for ann in anns:
        ann.update((changes or {}).get(ann["id"], {}))
    data = {
        "images": [
            {"id": 10, "file_name": "a.png", "width": W, "height": H},
            {"id": 11, "file_name": "b.png", "width": 32, "height": 32},
            {"id": 12, "file_name": "c.png", "width": 32, "height": 32},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "instances.json").write_text(json.dumps(data))
    captions = {"annotations": [{"id": 1, "image_id": 10, "caption": "  two  cats and a dog "},
                                {"id": 2, "image_id": 10, "caption": "a second caption"}]}  # fmt: skip
    (root / "captions.json").write_text(json.dumps(captions))
    return root / "instances.json", images, root / "captions.json"


# ------------------------------------------------------------------------------------------------ masks
def test_polygon_mask_is_the_pixel_centre_rule():
    assert np.array_equal(polygon_mask([[8, 8, 24, 8, 24, 24, 8, 24]], H, W), RECT)
    tri = polygon_mask([[0, 0, 10, 0, 0, 10]], 12, 12)
    yy, xx = np.mgrid[:12, :12]
    assert np.array_equal(tri, (xx + 0.5) + (yy + 0.5) < 10)  # centres strictly inside the hypotenuse
    two = polygon_mask([[0, 0, 2, 0, 2, 2, 0, 2], [5, 5, 7, 5, 7, 7, 5, 7]], 8, 8)
    assert two.sum() == 8 and two[0, 0] and two[6, 6] and not two[3, 3]  # several parts: their union


def centre_inside(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """(h, w) bool by brute force: the edges crossing the row through each pixel centre at or left of it are odd in
    number (an edge spans the centre's y when it lies in [min y, max y) of the edge)."""
    yy, xx = np.mgrid[:h, :w] + 0.5
    odd = np.zeros((h, w), bool)
    for (x0, y0), (x1, y1) in zip(points, np.roll(points, -1, axis=0), strict=True):
        if y0 != y1:
            spans = (min(y0, y1) <= yy) & (yy < max(y0, y1))
            odd ^= spans & (x0 + (yy - y0) * (x1 - x0) / (y1 - y0) <= xx)
    return odd


def test_polygon_mask_matches_a_brute_force_centre_test():
    rng = np.random.default_rng(3)
    for _ in range(20):
        points = rng.uniform(-5, 45, (int(rng.integers(3, 9)), 2))  # self-intersecting, partly outside
        assert np.array_equal(polygon_mask([points.ravel().tolist()], 30, 40), centre_inside(points, 30, 40))


def test_rle_decoding_uncompressed_and_compressed_counts():
    for mask in (DISC, DISC2, RECT, np.ones((H, W), bool), np.zeros((H, W), bool)):
        counts = rle_counts(mask)
        assert np.array_equal(rle_mask({"size": [H, W], "counts": counts}, H, W), mask)
        assert rle_counts_from_string(rle_string(counts)) == counts
        assert np.array_equal(rle_mask({"size": [H, W], "counts": rle_string(counts)}, H, W), mask)
    # a value that shrinks against the one two before: a negative difference, stored with its sign bit
    assert rle_counts_from_string(rle_string([3, 1000, 2, 5, 900])) == [3, 1000, 2, 5, 900]


# ------------------------------------------------------------------------------------------------ import
def test_coco_import_writes_crops_masks_boxes_captions_and_counts(tmp_path):
    instances, images, captions = make_coco(tmp_path / "coco")
    config = PrepareConfig(heldout_frac=0.0, lossless=True)
    manifest, tally = prepare_coco(tmp_path / "out", instances, images, captions, config=config)
    assert tally.skipped == {"crowd": 1, "small": 1}
    assert tally.summary() == "3 images written, 5 refs kept; skipped: crowd 1, small 1"
    assert manifest["splits"]["train"]["count"] == 3 and manifest["skipped"] == {"crowd": 1, "small": 1}
    a, b, c = iter_real_samples(tmp_path / "out" / "train")
    source = np.asarray(Image.open(images / "a.png"))
    assert a.meta["source"] == "a.png" and np.array_equal(a.image, source)  # 64x48: already a multiple of 16
    assert a.caption == "two cats and a dog"  # the first caption of the image, spaces collapsed
    by_id = dict(zip(a.meta["annotation_ids"], a.refs, strict=True))
    assert sorted(by_id) == [1, 2, 3]
    for ann, mask in ((1, RECT), (2, DISC), (3, DISC2)):
        ref = by_id[ann]
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        assert ref.bbox == pytest.approx((x0 / W, y0 / H, x1 / W, y1 / H))  # normalised xyxy
        assert np.array_equal(ref.crop[..., 3], mask[y0:y1, x0:x1] * 255)  # alpha == the mask in the box
        assert np.array_equal(ref.crop[..., :3], source[y0:y1, x0:x1])
        assert ref.depth == depth_from_box(ref.bbox)
    assert [by_id[i].caption for i in (1, 2, 3)] == ["cat", "dog", "cat"]
    assert a.depths == sorted(a.depths, key=("fg", "mg", "bg").index)  # front to back
    assert b.caption == "a photo of dog" and b.meta["caption_source"] == "categories"
    assert b.image.shape == (32, 32, 3) and np.array_equal(b.image[..., 0], np.asarray(Image.open(images / "b.png")))
    assert b.refs[0].depth == "fg"  # the whole lower half, touching the frame's bottom edge
    assert (c.image == 255).all()  # transparent RGBA composited onto white


def test_filters_max_refs_min_area_and_images_left_without_refs(tmp_path):
    instances, images, _ = make_coco(tmp_path / "coco")
    tally = Tally()
    plans = read_coco(instances, images, filters=CocoFilters(min_area=0.05, max_refs=1), tally=tally)
    # a.png: the three boxes over 5 % keep the largest (the disc of radius 9); b.png's half; c.png's 8x8 is 6.25 %
    assert [(p.file_name, [a.id for a in p.annotations]) for p in plans] == [("a.png", [2]), ("b.png", [6]),
                                                                             ("c.png", [7])]  # fmt: skip
    assert tally.skipped == {"crowd": 1, "small": 1, "over max refs": 2}
    tally = Tally()
    assert [p.file_name for p in read_coco(instances, images, filters=CocoFilters(min_area=0.2), tally=tally)] == [
        "b.png"
    ]
    assert tally.skipped["no refs"] == 2


BAD_CASES = [
    ({2: {"bbox": [60, 40, 20, 20]}}, "annotation id 2: bbox [60, 40, 20, 20] lies outside the 64x48 image"),
    ({1: {"segmentation": [[0, 0, 1, 0, 0, 1]], "bbox": [30, 30, 4, 4]}}, "annotation id 1: the mask is empty"),
    ({3: {"category_id": 9}}, "annotation id 3: category_id 9 is not in categories"),
    ({2: {"segmentation": {"size": [H, W], "counts": [5, 5]}}}, "annotation id 2: RLE counts sum to 10"),
    ({3: {"segmentation": {"size": [H, W], "counts": "\x7f"}}}, "annotation id 3: RLE counts string has a char"),
]


@pytest.mark.parametrize(("changes", "message"), BAD_CASES)
def test_bad_annotations_are_one_line_errors_and_nothing_is_written(tmp_path, changes, message):
    instances, images, _ = make_coco(tmp_path / "coco", changes)
    out = tmp_path / "out"
    with pytest.raises(MppError) as err:
        prepare_coco(out, instances, images)
    assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith(str(instances))
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco"]  # no OUT, no temporary folder
    _, tally = prepare_coco(out, instances, images, config=PrepareConfig(skip_bad=True))
    assert sum(tally.skipped.values()) == 3 and tally.images == 3  # the bad one counted, its image kept


def test_bad_files_are_one_line_errors_naming_them(tmp_path, monkeypatch):
    instances, images, _ = make_coco(tmp_path / "coco")
    (images / "b.png").unlink()
    with pytest.raises(MppError, match=r"instances.json: image id 11: file_name 'b.png' not found in ") as err:
        prepare_coco(tmp_path / "out", instances, images)
    assert len(str(err.value).splitlines()) == 1
    _, tally = prepare_coco(tmp_path / "out", instances, images, config=PrepareConfig(skip_bad=True))
    assert tally.skipped["missing image"] == 1 and tally.images == 2

    (images / "b.png").write_bytes(b"not an image")
    with pytest.raises(MppError, match=r"b.png: image id 11: cannot read the image: not a format Pillow knows$"):
        prepare_coco(tmp_path / "out2", instances, images)
    assert not (tmp_path / "out2").exists() and not list(tmp_path.glob(".out2*"))

    Image.new("RGB", (32, 32)).save(images / "b.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # a.png's 3072 pixels: refused from its header
    with pytest.raises(MppError, match=r"a.png: image id 10: cannot read the image: is 64x48, more than 2000 pix"):
        prepare_coco(tmp_path / "out2", instances, images)
    monkeypatch.undo()

    Image.new("RGB", (30, 32)).save(images / "b.png")
    with pytest.raises(MppError, match=r"b.png: image id 11: is 30x32, the annotations say 32x32$"):
        prepare_coco(tmp_path / "out2", instances, images)

    instances.write_text('{"images": [], "annotations": [}')
    with pytest.raises(MppError, match=r"instances.json: line 1, column 32: invalid JSON: Expecting value$"):
        prepare_coco(tmp_path / "out2", instances, images)
    instances.write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": NaN}]}')
    with pytest.raises(MppError, match=r"instances.json: invalid JSON: NaN is not a JSON number$"):
        prepare_coco(tmp_path / "out2", instances, images)


def test_an_existing_output_is_refused_then_replaced_whole_with_overwrite(tmp_path):
    instances, images, captions = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    prepare_coco(out, instances, images, config=PrepareConfig(heldout_frac=0.0))
    (out / "notes.txt").write_text("keep me")
    before = (out / "train" / "shard-000000.tar").read_bytes()
    with pytest.raises(MppError, match="is not empty; pass --overwrite"):
        prepare_coco(out, instances, images)
    instances.write_text("{")  # a failed --overwrite run leaves the earlier data set as it was
    with pytest.raises(MppError, match="invalid JSON"):
        prepare_coco(out, instances, images, config=PrepareConfig(overwrite=True))
    assert (out / "train" / "shard-000000.tar").read_bytes() == before
    make_coco(tmp_path / "coco")
    manifest, _ = prepare_coco(out, instances, images, captions, config=PrepareConfig(overwrite=True, max_refs=1))
    assert (out / "notes.txt").read_text() == "keep me" and manifest["refs"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco", "out"]


# ------------------------------------------------------------------------------------------------ depth
def test_the_box_rule():
    assert depth_from_box((0.2, 0.5, 0.6, 0.9)) == "fg"  # large, low
    assert depth_from_box((0.45, 0.9, 0.5, 0.96)) == "fg"  # touches the bottom edge
    assert depth_from_box((0.1, 0.1, 0.5, 0.35)) == "bg"  # ends high in the frame
    assert depth_from_box((0.5, 0.5, 0.55, 0.55)) == "bg"  # small (0.25 %)
    assert depth_from_box((0.4, 0.4, 0.5, 0.6)) == "mg"


def tiny_depth_model(folder: Path) -> Path:
    """A random-init Depth Anything (DINOv2 backbone) of a few thousand weights, saved as a local model folder."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                            image_size=28, patch_size=14, out_features=["stage1", "stage2"],
                            reshape_hidden_states=False)  # fmt: skip
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 16],
                                 reassemble_factors=[2, 1], fusion_hidden_size=8, head_hidden_size=4)  # fmt: skip
    torch.manual_seed(0)
    DepthAnythingForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessorPil(size={"height": 28, "width": 28}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_depth_labels_from_a_tiny_depth_model(tmp_path):
    import torch

    torch.set_num_threads(1)
    instances, images, _ = make_coco(tmp_path / "coco")
    folder = tiny_depth_model(tmp_path / "depth")
    config = PrepareConfig(heldout_frac=0.0)
    prepare_coco(tmp_path / "out", instances, images, config=config, depth_model=folder)
    a = next(iter_real_samples(tmp_path / "out" / "train"))
    assert a.meta["depth_source"] == "model depth"
    model = DepthModel(folder)
    nearness = model.nearness(Image.open(images / "a.png").convert("RGB"))  # (H, W) in [0, 1]
    assert nearness.shape == (H, W) and nearness.min() >= 0 and nearness.max() <= 1
    masks = {1: RECT, 2: DISC, 3: DISC2}
    assert a.depths == [depth_from_nearness(nearness, masks[i]) for i in a.meta["annotation_ids"]]


def test_depth_from_nearness_takes_the_median_inside_the_mask():
    nearness = np.tile(np.linspace(0, 1, 30), (10, 1))  # (10, 30): nearer to the right
    left, middle, right = (np.zeros((10, 30), bool) for _ in range(3))
    left[:, :5], middle[:, 12:18], right[:, 25:] = True, True, True
    assert [depth_from_nearness(nearness, m) for m in (left, middle, right)] == ["bg", "mg", "fg"]
    with pytest.raises(MppError, match=r"--depth-model .*nowhere: no config.json"):
        DepthModel("/nowhere")
    with pytest.raises(MppError, match=r"^--device 'gpu': not a torch device"):
        DepthModel("/nowhere", device="gpu")


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_prepare_data_from_coco(tmp_path):
    instances, images, captions = make_coco(tmp_path / "coco")
    out = tmp_path / "out"
    args = ["prepare-data", "--from-coco", str(instances), "--images", str(images), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--captions", str(captions), "--heldout-frac", "0"])
    assert result.exit_code == 0, result.output
    assert (
        result.output.strip()
        .splitlines()[-1]
        .startswith(
            f"{out}: 3 images written, 5 refs kept; skipped: crowd 1, small 1 (3 train / 0 held-out in 1 shards, "
        )
    )
    for extra, line in [
        (["--n", "5"], "error: --n: is for the toy world only (got 5)"),
        (["--min-area", "2"], "error: --min-area: must be in [0, 1) (got 2.0)"),
        (["--from-scenes", str(tmp_path)], "error: --from-scenes: give --from-coco or --from-scenes, not both"),
    ]:
        bad = CliRunner().invoke(app, [*args, "--overwrite", *extra])
        assert bad.exit_code == 2 and bad.output.strip().splitlines()[0].startswith(line), bad.output
    toy = CliRunner().invoke(app, ["prepare-data", "--out", str(tmp_path / "t"), "--n", "2", "--skip-bad"])
    assert toy.exit_code == 2
    assert toy.output.strip() == "error: --skip-bad: is for --from-coco / --from-scenes (got True)"


def test_the_generated_coco_like_set_imports_whole(tmp_path):
    from moviepostproduction.datasets.sample_set import write_coco_like

    instances, images, captions = write_coco_like(tmp_path / "set", 3, width=64, height=48, objects=2)
    manifest, tally = prepare_coco(tmp_path / "out", instances, images, captions)
    assert (tally.images, tally.refs, dict(tally.skipped)) == (3, 6, {})
    counts = [manifest["splits"][s]["count"] for s in ("train", "heldout")]
    assert sum(counts) == 3
    samples = [s for split in ("train", "heldout") for s in iter_real_samples(tmp_path / "out" / split)]
    assert sorted(s.caption for s in samples) == [f"a generated scene number {i}" for i in range(3)]
