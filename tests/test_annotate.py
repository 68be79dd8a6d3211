"""`mpp annotate`: images with no annotations -> scene files, on tiny random-init models of the real transformers
classes (OWL-ViT detector, SAM, Depth Anything, BLIP captioner). Random weights find random boxes, so detection is
forced through threshold 0 and the tests assert the plumbing: boxes normalised inside the image, the crop's alpha is
the SAM mask inside the box, depth labels are the rule on the depth map, the caption is the captioner's, the files
are written whole, and `mpp prepare-data --from-scenes` turns them into shards that `iter_real_samples` reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.datasets.annotate import (
    AnnotateConfig,
    Annotators,
    annotate,
    annotate_folder,
    box_iou,
    parse_labels,
    read_labels_file,
    source_images,
    suppress,
)
from moviepostproduction.datasets.annotate_models import Captioner, Detection, Detector, Segmenter
from moviepostproduction.datasets.coco_sample import caption_from_refs
from moviepostproduction.datasets.crops import pixel_window
from moviepostproduction.datasets.depth_rule import DepthModel, depth_from_box, depth_from_nearness
from moviepostproduction.datasets.prepare import PrepareConfig, prepare_scenes
from moviepostproduction.datasets.real_format import iter_real_samples
from moviepostproduction.errors import MppError
from moviepostproduction.scene import load_scene
from test_coco_import import tiny_depth_model

LABELS = ("person", "car", "chair")
LABELS2 = ("person", "car", "potted plant")
W, H = 96, 64  # multiples of 16: the scene keeps the image's size


def tiny_detector(folder: Path) -> Path:
    """A random-init OWL-ViT (1-layer ViT and text encoder, width 16) with a letter-level CLIP tokenizer."""
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTProcessor
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}  # OWL-ViT masks queries whose first id is 0
    for suffix in ("", "</w>"):
        vocab |= {c + suffix: len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder
    )
    size = {"height": 32, "width": 32}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    OwlViTProcessor(OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer).save_pretrained(folder)
    return folder


def tiny_sam(folder: Path) -> Path:
    """A random-init SAM (ViT of one global-attention layer on 64 px, 16-wide prompt encoder and mask decoder)."""
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = SamVisionConfig(
        hidden_size=16,
        output_channels=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=64,
        patch_size=16,
        mlp_dim=32,
        global_attn_indexes=[0],
        num_pos_feats=8,
    )
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                                   iou_head_hidden_dim=16)  # fmt: skip
    torch.manual_seed(0)
    SamModel(
        SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    ).save_pretrained(folder)
    processor = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return folder


def tiny_captioner(folder: Path) -> Path:
    """A random-init BLIP captioner (1-layer vision and text transformers, width 16) with a 12-word BERT vocabulary."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "person", "car", "chair"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, bos_token="[DEC]", model_max_length=16)
    text = dict(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        encoder_hidden_size=16,
        bos_token_id=5,
        pad_token_id=0,
        sep_token_id=3,
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder
    )
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "detector": tiny_detector(root / "owlvit"),
        "segmenter": tiny_sam(root / "sam"),
        "depth": tiny_depth_model(root / "depth"),
        "captioner": tiny_captioner(root / "blip"),
    }


def write_images(folder: Path, n: int = 3) -> list[Path]:
    """`n` photo-like images (a gradient and two blobs), as PNG and JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:H, :W]
    paths = []
    for i in range(n):
        pixels = np.stack([xx * 2, yy * 3, np.full((H, W), 40 * i)], axis=-1).astype(np.float64)
        for _ in range(2):
            cx, cy, r = rng.uniform(10, W - 10), rng.uniform(10, H - 10), rng.uniform(6, 20)
            pixels[(xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = rng.uniform(0, 255, 3)
        path = folder / f"img{i}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_suppress_keeps_the_best_box_of_each_overlapping_group_per_label():
    a = Detection("car", 0.9, (0, 0, 10, 10))
    b = Detection("car", 0.8, (1, 0, 11, 10))  # IoU 9/11 with a: dropped
    c = Detection("person", 0.7, (1, 0, 11, 10))  # another label: kept
    d = Detection("car", 0.6, (20, 20, 30, 30))  # apart: kept
    assert box_iou(a.box, b.box) == pytest.approx(90 / 110)
    assert suppress([a, b, c, d], 0.5) == [a, c, d]
    assert suppress([a, b, c, d], 0.9) == [a, b, c, d]


def test_labels_from_the_option_or_a_file(tmp_path):
    (tmp_path / "labels.txt").write_text("person\ncar, potted plant\n\n")
    assert read_labels_file(tmp_path / "labels.txt") == parse_labels("person,car , potted plant,") == LABELS2
    with pytest.raises(MppError, match=r"^--labels-file .*nowhere\.txt: not found$"):
        read_labels_file(tmp_path / "nowhere.txt")
    with pytest.raises(MppError, match=r"^--labels: lists a label twice \(got 'car,car'\)$"):
        AnnotateConfig(labels=("car", "car")).check()


def test_annotate_writes_scenes_whose_refs_are_the_models_outputs(tmp_path, models):
    torch.set_num_threads(1)
    images = write_images(tmp_path / "footage")
    config = AnnotateConfig(labels=LABELS, threshold=0.0, max_refs=4, min_area=0.0)
    tally = annotate(tmp_path / "footage", tmp_path / "scenes", config=config, device="cpu", **models)
    assert tally.images == 3 and tally.refs > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["footage", "scenes"]  # no staging folder left
    detector, segmenter = Detector(models["detector"]), Segmenter(models["segmenter"])
    depth, captioner = DepthModel(models["depth"]), Captioner(models["captioner"])
    for path in images:
        pil = Image.open(path).convert("RGB")
        assert (tmp_path / "scenes" / path.name).read_bytes() == path.read_bytes()  # the target, copied
        scene = load_scene(tmp_path / "scenes" / f"{path.stem}.json")
        assert (scene.width, scene.height) == (W, H)
        assert scene.caption == (captioner.caption(pil) or caption_from_refs([r.caption for r in scene.refs]))
        # The expected refs, recomputed from the models: best boxes per label, SAM masks, the depth rule.
        found = suppress(detector.detect(pil, list(LABELS), 0.0), 0.5)[:4]
        windows = [pixel_window((d.box[0], d.box[1], d.box[2] - d.box[0], d.box[3] - d.box[1])) for d in found]
        masks = segmenter.masks(pil, [tuple(map(float, w)) for w in windows])  # (K, H, W)
        nearness = depth.nearness(pil)  # (H, W)
        expected = {}
        for det, (x0, y0, x1, y1), mask in zip(found, windows, masks, strict=True):
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
            if inside.any():
                box = tuple(round(v, 6) for v in (x0 / W, y0 / H, x1 / W, y1 / H))  # as the scene file holds it
                expected[box] = (det.label, depth_from_nearness(nearness, inside), inside[y0:y1, x0:x1])
        assert len(scene.refs) == len(expected) > 0
        for ref in scene.refs:
            assert 0 <= ref.bbox[0] < ref.bbox[2] <= 1 and 0 <= ref.bbox[1] < ref.bbox[3] <= 1
            label, depth_label, alpha = expected[ref.bbox]
            assert (ref.caption, ref.depth) == (label, depth_label)
            crop = np.asarray(Image.open(ref.image))  # (h, w, 4): the box's pixels, alpha = the mask
            assert crop.shape == (*alpha.shape, 4) and np.array_equal(crop[..., 3] > 0, alpha)
            x0, y0 = round(ref.bbox[0] * W), round(ref.bbox[1] * H)
            assert np.array_equal(crop[..., :3], np.asarray(pil)[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]])
    manifest, _ = prepare_scenes(tmp_path / "shards", tmp_path / "scenes", config=PrepareConfig(heldout_frac=0.0))
    samples = list(iter_real_samples(tmp_path / "shards" / "train"))
    assert manifest["refs"] == tally.refs and len(samples) == 3
    first = load_scene(tmp_path / "scenes" / "img0.json")
    sample = next(s for s in samples if s.meta["source"] == "img0.json")
    assert sample.caption == first.caption and sample.depths == [r.depth for r in first.refs]


def test_without_depth_or_captioner_the_box_rule_and_the_labels_caption(tmp_path, models):
    torch.set_num_threads(1)
    write_images(tmp_path / "footage", n=1)
    config = AnnotateConfig(labels=LABELS, threshold=0.0, max_refs=3, min_area=0.0)
    detector, segmenter = Detector(models["detector"]), Segmenter(models["segmenter"])
    files = source_images(tmp_path / "footage")
    annotate_folder(files, tmp_path / "scenes", Annotators(detector, segmenter), config)
    scene = load_scene(tmp_path / "scenes" / "img0.json")
    assert 0 < len(scene.refs) <= 3
    assert scene.caption == caption_from_refs([r.caption for r in scene.refs])
    assert [r.depth for r in scene.refs] == [depth_from_box(r.bbox) for r in scene.refs]
    assert all(r.caption in LABELS for r in scene.refs)


def cli(*args: str):
    return CliRunner().invoke(app, ["annotate", *map(str, args)])


def test_cli_annotates_then_prepare_data_reads_the_scenes(tmp_path, models):
    write_images(tmp_path / "footage", n=2)
    flags = [f"--{k}={v}" for k, v in models.items()]
    result = cli(tmp_path / "footage", "-o", tmp_path / "scenes", *flags, "--labels", "person, car", "--threshold",
                 "0", "--min-area", "0", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r".*scenes: 2 images written, \d+ refs kept; skipped: .*", result.output.strip())
    again = cli(tmp_path / "footage", "-o", tmp_path / "scenes", *flags)
    assert again.exit_code == 2 and "is not empty; pass --overwrite" in again.output
    before = json.loads((tmp_path / "scenes" / "img0.json").read_text())
    (tmp_path / "scenes" / "stale.json").write_text("{}")
    flags += ["--labels", "chair", "--threshold", "0", "--min-area", "0", "--overwrite"]
    assert cli(tmp_path / "footage", "-o", tmp_path / "scenes", *flags).exit_code == 0
    after = json.loads((tmp_path / "scenes" / "img0.json").read_text())
    assert {r["caption"] for r in after["refs"]} == {"chair"} != {r["caption"] for r in before["refs"]}
    assert not (tmp_path / "scenes" / "stale.json").exists()  # replaced whole
    out = CliRunner().invoke(app, ["prepare-data", "--from-scenes", str(tmp_path / "scenes"), "--out",
                                   str(tmp_path / "shards"), "--heldout-frac", "0"])  # fmt: skip
    assert out.exit_code == 0, out.output
    assert len(list(iter_real_samples(tmp_path / "shards" / "train"))) == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"detector": "/nowhere"}, r"^error: --detector /nowhere: not a folder"),
        (
            {"detector": "segmenter"},
            r"^error: --detector .*sam: is a 'sam' model; --detector takes zero-shot object detection models \(owlv2, ",
        ),
        (
            {"segmenter": "detector"},
            r"^error: --segmenter .*owlvit: is a 'owlvit' model; --segmenter takes SAM mask generation models \(sam\)$",
        ),
        ({"depth": "detector"}, r"^error: --depth .*owlvit: cannot load a depth-estimation model"),
        (
            {"captioner": "depth"},
            r"^error: --captioner .*depth: is a 'depth_anything' model; --captioner takes image captioning models",
        ),
        ({"images": "empty"}, r"^error: DIR .*empty: holds no \.png / \.jpg / \.jpeg / \.webp image$"),
        ({"images": "bad"}, r"^error: .*bad/zbroken\.png: image: cannot read the image: not a format Pillow knows$"),
        ({"labels": ","}, r"^error: --labels: give 1 to 100 labels \(got 0\)$"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, models, change, message):
    (tmp_path / "empty").mkdir()
    write_images(tmp_path / "bad", n=1)
    (tmp_path / "bad" / "zbroken.png").write_bytes(b"not an image")  # after img0.png: its scene was staged
    write_images(tmp_path / "good", n=1)
    options = {k: str(v) for k, v in models.items()} | {"images": str(tmp_path / "good"), "labels": "car"}
    for key, value in change.items():  # another model's folder, a folder of tmp_path, or the value itself
        options[key] = str(
            models[value] if value in models else tmp_path / value if value in ("empty", "bad") else value
        )
    images = options.pop("images")
    result = cli(images, "-o", tmp_path / "scenes", *[f"--{k}={v}" for k, v in options.items()], "--threshold", "0")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines
    assert not (tmp_path / "scenes").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty", "good"]  # nothing half-written


def test_skip_bad_counts_an_unreadable_image(tmp_path, models):
    write_images(tmp_path / "footage", n=1)
    (tmp_path / "footage" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    Image.new("RGB", (100, 20)).save(tmp_path / "footage" / "strip.png")  # 96x16 as a scene: another aspect
    config = AnnotateConfig(labels=LABELS, threshold=0.0, min_area=0.0, skip_bad=True)
    tally = annotate(tmp_path / "footage", tmp_path / "scenes", detector=models["detector"],
                     segmenter=models["segmenter"], device="cpu", config=config)  # fmt: skip
    assert tally.images == 1 and tally.skipped["unreadable image"] == tally.skipped["image size mismatch"] == 1
    assert tally.summary().endswith("unreadable image 1, image size mismatch 1")
    with pytest.raises(MppError, match=r"--max-refs: must be in \[1, 1000\] \(got 0\)"):
        AnnotateConfig(max_refs=0).check()
