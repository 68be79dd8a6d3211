"""A user's photos to a picture (issue 42 item 7): photos with COCO instance annotations (polygons, RLE in both count
forms, a crowd region) and captions -> `mpp prepare-data --from-coco` -> `mpp train` stage 1 (the adapter created by
`init_adapter`) -> stage 2 from stage 1's export -> stage 3 from stage 2's -> `mpp compose --model REPLICA --adapter
STAGE3` writes the image that `ComposePipeline.from_pretrained(REPLICA, adapter=STAGE3)` draws. Every photo, mask and
model is made here: a tiny hub-layout FLUX.1-dev replica and tiny CLIP / DINOv2 folders, all random-init."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.datasets.real_format import iter_real_samples
from moviepostproduction.files import load_safetensors
from moviepostproduction.scene import load_scene
from moviepostproduction.toyworld.replica import write_replica_files
from moviepostproduction.toyworld.tiny import TinySpec, tiny_random_model_dir
from test_coco_import import rle_counts, rle_string
from test_train_export import stage_recipe, train

from helpers import invoke_cli

SIZE = 64  # every photo 64 x 64: one token grid (the cache stacks one size per split)
PHOTOS = 6  # photo-1 lands in the held-out split at --heldout-frac 0.3 (a hash of the name), the others train
CATEGORIES = {1: "ball", 2: "box", 3: "tent"}
LORA = "transformer_lora/pytorch_lora_weights.safetensors"


def textured_background(rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: a colour gradient with stripes at a random angle and sensor noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE] / SIZE
    angle, period = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    base = rng.uniform(60, 190, 3) + np.stack([xx * 50, yy * 50, stripes * 40], axis=-1)  # (H, W, 3)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)


def object_masks(rng: np.random.Generator) -> dict[int, tuple[np.ndarray, list[float]]]:
    """category id -> ((H, W) bool mask, flat polygon): an ellipse, a rectangle and a triangle at random places."""
    shapes = {}
    for category in CATEGORIES:
        w, h = rng.integers(14, 28, 2)
        x0, y0 = rng.integers(0, SIZE - w), rng.integers(0, SIZE - h)
        x1, y1 = x0 + w, y0 + h
        polygon = {
            1: [],
            2: [x0, y0, x1, y0, x1, y1, x0, y1],
            3: [(x0 + x1) / 2, y0, x1, y1, x0, y1],
        }[category]
        canvas = Image.new("L", (SIZE, SIZE))
        if category == 1:
            ImageDraw.Draw(canvas).ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
        else:
            ImageDraw.Draw(canvas).polygon([float(v) for v in polygon], fill=255)
        shapes[category] = (np.asarray(canvas) > 0, [float(v) for v in polygon])
    return shapes


def write_photos(root: Path) -> tuple[Path, Path, Path]:
    """ROOT/images/photo-I.png | .jpg (PNG and JPEG alternating), ROOT/instances.json, ROOT/captions.json. Per photo:
    the ball as an uncompressed RLE, the box as a polygon, the tent as a compressed RLE, and (on photo 0) a crowd
    region over the whole photo, which the import skips and counts."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(42)
    images, annotations, captions = [], [], []
    colours = {1: (220, 30, 30), 2: (30, 60, 220), 3: (40, 200, 60)}
    for i in range(PHOTOS):
        pixels = textured_background(rng)
        name = f"photo-{i}.{'jpg' if i % 2 else 'png'}"
        for category, (mask, polygon) in object_masks(rng).items():
            pixels[mask] = colours[category]
            ys, xs = np.nonzero(mask)
            bbox = [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]
            counts = rle_counts(mask)
            segmentation = {
                1: {"size": [SIZE, SIZE], "counts": counts},
                2: [polygon],
                3: {"size": [SIZE, SIZE], "counts": rle_string(counts)},
            }[category]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": category, "iscrowd": 0,
                                "bbox": bbox, "area": float(mask.sum()), "segmentation": segmentation})  # fmt: skip
        if i == 0:
            everything = np.ones((SIZE, SIZE), bool)
            crowd = {"size": [SIZE, SIZE], "counts": rle_counts(everything)}
            annotations.append({"id": 999, "image_id": 0, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, SIZE, SIZE],
                                "area": SIZE * SIZE, "segmentation": crowd})  # fmt: skip
        Image.fromarray(pixels).save(root / "images" / name, quality=95)
        images.append({"id": i, "file_name": name, "width": SIZE, "height": SIZE})
        captions.append({"id": i, "image_id": i, "caption": f"a red ball, a blue box and a green tent, photo {i}"})
    categories = [{"id": k, "name": name} for k, name in CATEGORIES.items()]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))  # fmt: skip
    (root / "captions.json").write_text(json.dumps({"annotations": captions}))
    return root / "instances.json", root / "images", root / "captions.json"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """root/photos (the user's), root/data (prepare-data's), root/stage1..3 (each stage's export, 2 steps each);
    returns (root, replica, the prepare-data output line)."""
    root = tmp_path_factory.mktemp("end-to-end")
    # FLUX.1-dev's hub layout at the tiny sizes, with 2 double blocks: stage 3's feedback bridge links a double block
    # to the one before it, so the 1-block replica of write_flux_replica has none to train (refused before training).
    replica = write_replica_files(root / "replica", spec=TinySpec(double_blocks=2))
    tiny = tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny")
    clip = shutil.copytree(tiny / "image_encoders" / "clip", root / "clip")  # CLIP and DINOv2 as downloaded
    dino = shutil.copytree(tiny / "image_encoders" / "dino", root / "dino")
    instances, images, captions = write_photos(root / "photos")
    args = ["--from-coco", str(instances), "--images", str(images), "--captions", str(captions)]
    prepared = invoke_cli(["prepare-data", *args, "--out", str(root / "data"), "--heldout-frac", "0.3"])
    assert prepared.exit_code == 0, prepared.output
    create = {"clip": str(clip), "dino": str(dino)}
    model = str(replica)
    one = stage_recipe(root, "stage1", model=model, adapter_dir=str(root / "fresh"), init_adapter=create)
    two = stage_recipe(root, "stage2", stage="2", model=model, adapter_dir=str(root / "stage1"))
    three = stage_recipe(root, "stage3", stage="3", model=model, adapter_dir=str(root / "stage2"))
    for k, recipe in enumerate((one, two, three), 1):
        result = train(root, recipe, f"stage{k}.yaml")
        assert result.exit_code == 0, result.output
    return root, replica, prepared.output


def test_prepare_data_turns_the_photos_and_their_coco_annotations_into_samples(chain):
    root, _, output = chain
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    assert manifest["format"] == "mpp-real-wds"
    assert {s: manifest["splits"][s]["count"] for s in ("train", "heldout")} == {"train": 5, "heldout": 1}
    assert manifest["refs"] == 3 * PHOTOS and manifest["skipped"] == {"crowd": 1}
    assert "5 train / 1 held-out" in output
    samples = [s for split in ("train", "heldout") for f in sorted((root / "data" / split).glob("*.tar"))
               for s in iter_real_samples(f)]  # fmt: skip
    assert len(samples) == PHOTOS
    for sample in samples:
        assert sample.image.shape == (SIZE, SIZE, 3)
        assert sorted(sample.ref_captions) == ["ball", "box", "tent"]  # the category names
        assert sample.caption.startswith("a red ball, a blue box and a green tent, photo ")
        assert all(ref.crop.shape[2] == 4 and ref.crop[..., 3].any() for ref in sample.refs)  # RGBA crops
    # The RLE-coded tent of photo 0 comes back as the exact mask it was drawn from: its alpha is the mask.
    photo0 = next(s for s in samples if s.meta["source"] == "photo-0.png")
    tent = next(r for r in photo0.refs if r.caption == "tent")
    pixels = np.asarray(Image.open(root / "photos" / "images" / "photo-0.png"))
    green = np.all(pixels == (40, 200, 60), axis=-1)
    x0, y0, x1, y1 = (round(v * SIZE) for v in tent.bbox)
    assert np.array_equal(tent.crop[..., 3] > 0, green[y0:y1, x0:x1])


def test_each_stage_exports_an_adapter_folder_the_next_one_starts_from(chain):
    root, _, _ = chain
    assert (root / "fresh" / "config.json").is_file() and not (root / "fresh" / "transformer_lora").exists()
    for name in ("stage1", "stage2", "stage3"):
        names = sorted(p.name for p in (root / name).iterdir())
        assert names == ["adapter_index.json", "config.json", "model.safetensors", "transformer_lora"], name
    lora = {name: load_safetensors(root / name / LORA) for name in ("stage1", "stage2", "stage3")}
    assert lora["stage1"].keys() == lora["stage2"].keys() == lora["stage3"].keys()
    assert not all(torch.equal(lora["stage1"][k], lora["stage2"][k]) for k in lora["stage1"])  # stage 2 trains it
    assert all(torch.equal(lora["stage2"][k], lora["stage3"][k]) for k in lora["stage2"])  # stage 3 carries it
    # Stage 3 trains the feedback bridge alone: its checkpoint holds only the bridge, the export is stage 2's adapter
    # with the checkpoint's bridge. (Here the bridge stays at its init: it feeds foreground refs only, alpha >= 0.5,
    # and two steps at lr_scale 100 of stages 1-2 left every ref's alpha at 0.45-0.49, so its gradient is 0.)
    (last,) = (root / "run-stage3" / "checkpoints").glob("step-000002")
    trained = load_safetensors(last / "trainable.safetensors")
    assert trained and all(k.startswith("adapter.feedback_bridge.") for k in trained), sorted(trained)
    two, three = (load_safetensors(root / name / "model.safetensors") for name in ("stage2", "stage3"))
    assert two.keys() == three.keys()
    for key, value in three.items():
        expected = trained.get(f"adapter.{key}", two[key])
        assert torch.equal(value, expected), key


def test_mpp_compose_with_the_stage_3_adapter_writes_the_pipelines_image(chain, tmp_path):
    root, replica, _ = chain
    crops = root / "photos" / "images"
    refs = [
        {"image": str(crops / "photo-2.png"), "bbox": [0.05, 0.4, 0.5, 0.95], "depth": "fg", "caption": "box"},
        {"image": str(crops / "photo-3.jpg"), "bbox": [0.55, 0.1, 0.9, 0.5], "depth": "bg", "caption": "tent"},
    ]
    scene = {"caption": "a blue box in front of a green tent", "width": 80, "height": 48, "refs": refs}
    (tmp_path / "scene.json").write_text(json.dumps(scene))
    png = tmp_path / "shot.png"
    args = ["compose", str(tmp_path / "scene.json"), "-o", str(png), "--model", str(replica)]
    result = invoke_cli([*args, "--adapter", str(root / "stage3"), "--steps", "2", "--seed", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    written = Image.open(png)
    assert written.format == "PNG" and written.size == (80, 48)
    pipe = ComposePipeline.from_pretrained(replica, adapter=root / "stage3")
    scene = load_scene(tmp_path / "scene.json")
    image = pipe(scene, num_inference_steps=2, seed=5).images[0]
    assert np.array_equal(np.asarray(written.convert("RGB")), np.asarray(image))
    untrained = ComposePipeline.from_pretrained(replica, adapter=root / "fresh")
    before = untrained(scene, num_inference_steps=2, seed=5, output_type="latent").images[0]
    after = pipe(scene, num_inference_steps=2, seed=5, output_type="latent").images[0]
    assert (after - before).abs().max() > 1e-4  # the three stages' adapter and LoRA act on the picture


def test_a_set_without_held_out_scenes_trains_with_training_scenes_in_its_sample_grids(chain):
    """`--heldout-frac 0` (or a few photos that all hash into train) leaves the held-out split empty: stage 1 still
    trains, its sample grids drawn from the training scenes (it stopped with "cache/heldout: no samples to encode"
    after caching the whole train split)."""
    root, replica, _ = chain
    photos = root / "photos"
    args = ["--from-coco", str(photos / "instances.json"), "--images", str(photos / "images")]
    prepared = invoke_cli(["prepare-data", *args, "--out", str(root / "all-train"), "--heldout-frac", "0"])
    assert prepared.exit_code == 0, prepared.output
    assert json.loads((root / "all-train" / "manifest.json").read_text())["splits"]["heldout"]["count"] == 0
    recipe = stage_recipe(root, "all-train-stage1", steps=1, model=str(replica), data=str(root / "all-train"))
    recipe.update(adapter_dir=str(root / "stage1"), trainer={**recipe["trainer"], "sample_every": 1})
    result = train(root, recipe, "all-train.yaml")
    assert result.exit_code == 0, result.output
    run = root / "run-all-train-stage1"
    assert sorted(p.name for p in (run / "cache").iterdir()) == ["train"]
    assert (run / "samples" / "step-000001.png").is_file()
    assert (root / "all-train-stage1" / "transformer_lora").is_dir()
