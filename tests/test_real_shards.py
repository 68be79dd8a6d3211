"""The real-data sample format: write -> iter_real_samples round trips, the scene member is a valid scene file, a
damaged shard is one line, resolution buckets, stored sizes, stable splits, and `--from-scenes` (RGBA crops, crops +
masks, opaque crops) into the same shards."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

from moviepostproduction.datasets.buckets import bucket_bbox, bucket_for, cover_crop, make_buckets
from moviepostproduction.datasets.prepare import PrepareConfig, prepare_scenes, write_real_dataset
from moviepostproduction.datasets.problems import Tally
from moviepostproduction.datasets.real_format import (
    RealRef,
    RealSample,
    canvas_size,
    decode_real_sample,
    iter_real_samples,
    read_real_manifest,
    sample_members,
    split_of,
)
from moviepostproduction.errors import MppError
from moviepostproduction.files import default_file_mode
from moviepostproduction.scene import scene_from_dict


def sample(seed: int, width: int = 48, height: int = 32, refs: int = 2) -> RealSample:
    rng = np.random.default_rng(seed)
    made = [
        RealRef(rng.integers(0, 256, (5 + i, 7, 4), dtype=np.uint8), (0.1 * i, 0.2, 0.1 * i + 0.3, 0.9), "mg", f"r{i}")
        for i in range(refs)
    ]
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return RealSample("", image, f"scene {seed}", made, {"source": f"img{seed}.png"})


def test_round_trip_write_then_iter_real_samples(tmp_path):
    written = [sample(i, refs=i % 3) for i in range(5)]
    items = [(s.meta["source"], s) for s in written]
    config = PrepareConfig(heldout_frac=0.0, shard_size=2, lossless=True)
    manifest = write_real_dataset(tmp_path / "out", items, config=config, tally=Tally(), source={"kind": "test"})
    assert manifest == read_real_manifest(tmp_path / "out")
    assert manifest["splits"]["train"] == {
        "count": 5,
        "shards": ["train/shard-000000.tar", "train/shard-000001.tar", "train/shard-000002.tar"],
    }
    assert manifest["splits"]["heldout"] == {"count": 0, "shards": []}
    assert (tmp_path / "out" / "train" / "shard-000000.tar").stat().st_mode & 0o777 == default_file_mode()
    read = list(iter_real_samples(tmp_path / "out" / "train"))
    assert [s.key for s in read] == [f"{i:08d}" for i in range(5)]
    for a, b in zip(written, read, strict=True):
        assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.meta == b.meta
        assert (b.width, b.height) == (48, 32) and b.bboxes.shape == (len(a.refs), 4)
        for ra, rb in zip(a.refs, b.refs, strict=True):
            assert np.array_equal(ra.crop, rb.crop) and rb.bbox == pytest.approx(ra.bbox)
            assert (rb.depth, rb.caption) == (ra.depth, ra.caption)
    with pytest.raises(MppError, match="holds the splits, not shards"):
        next(iter_real_samples(tmp_path / "out"))


def test_members_are_named_as_documented_and_the_scene_is_a_scene_file(tmp_path):
    s = sample(1)
    s.key = "00000007"
    members = dict(sample_members(s))
    assert list(members) == [
        "00000007.image.jpg",
        "00000007.ref0.png",
        "00000007.ref1.png",
        "00000007.scene.json",
        "00000007.meta.json",
    ]
    scene = json.loads(members["00000007.scene.json"])
    for i in range(2):
        Image.open(io.BytesIO(members[f"00000007.ref{i}.png"])).save(tmp_path / f"ref{i}.png")
    loaded = scene_from_dict(scene, base_dir=tmp_path)  # images checked: the refs decode
    assert (loaded.width, loaded.height, loaded.caption) == (48, 32, "scene 1")
    assert [r.image.name for r in loaded.refs] == ["ref0.png", "ref1.png"]
    raw = {"__key__": "00000007", **{name.split(".", 1)[1]: data for name, data in members.items()}}
    back = decode_real_sample(raw)
    assert np.abs(back.image.astype(int) - s.image).mean() < 12  # JPEG, quality 95, 4:4:4 (random noise: worst case)


def test_a_bad_sample_is_refused_before_it_is_written():
    bad = sample(2)
    bad.refs[0].bbox = (0.5, 0.2, 0.4, 0.9)  # x0 > x1
    with pytest.raises(MppError, match=r"refs\[0\].bbox: needs x0 < x1"):
        sample_members(bad)


def test_a_damaged_shard_is_one_line_naming_file_and_sample(tmp_path):
    items = [("a", sample(0)), ("b", sample(1))]
    config = PrepareConfig(heldout_frac=0.0)
    write_real_dataset(tmp_path / "out", items, config=config, tally=Tally(), source={})
    shard = tmp_path / "out" / "train" / "shard-000000.tar"
    damaged = tmp_path / "damaged.tar"
    with tarfile.open(shard) as src, tarfile.open(damaged, "w") as dst:
        for member in src:
            if member.name != "00000001.scene.json":
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(MppError) as err:
        list(iter_real_samples(damaged))
    assert str(err.value) == (
        f"{damaged}: sample '00000001' is incomplete or corrupt (missing member 'scene.json'); write the data set "
        "again with mpp prepare-data"
    )
    damaged.write_bytes(shard.read_bytes()[:700])
    with pytest.raises(MppError, match=r"damaged.tar: (not a readable tar shard|sample '00000000' is incomplete)"):
        list(iter_real_samples(damaged))


def test_webdataset_reads_the_shards(tmp_path):
    import webdataset as wds

    config = PrepareConfig(heldout_frac=0.0)
    write_real_dataset(tmp_path / "o", [("a", sample(3))], config=config, tally=Tally(), source={})
    (raw,) = list(wds.WebDataset(str(tmp_path / "o" / "train" / "shard-000000.tar"), shardshuffle=False))
    assert decode_real_sample(raw).caption == "scene 3"


# ------------------------------------------------------------------------------------------------ sizes
def test_buckets_and_the_nearest_aspect_ratio():
    buckets = make_buckets()
    assert (1024, 1024) in buckets and (1152, 896) in buckets and (896, 1152) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and max(w, h) <= 4 * min(w, h) for w, h in buckets)
    assert all(w * h >= 0.85 * 1024 * 1024 for w, h in buckets)  # about equal area
    assert bucket_for(640, 480, buckets) == (1152, 896)  # 4:3 -> 1.286, the nearest of 1.2 / 1.286 / 1.46
    assert bucket_for(480, 640, buckets) == (896, 1152)
    assert bucket_for(1920, 1080, buckets) == (1344, 768)
    assert bucket_for(5, 5, buckets) == (1024, 1024)
    assert bucket_for(10_000, 10, buckets) == (2048, 512)  # past the widest: the widest
    assert bucket_for(100, 100, [(512, 256), (256, 512)]) == (512, 256)  # a tie: same area, the wider
    scale, left, top = cover_crop(640, 480, (1152, 896))
    assert (scale, left, top) == pytest.approx((896 / 480, (640 * 896 / 480 - 1152) / 2, 0))  # covers, centred
    assert bucket_bbox((0.0, 0.0, 1.0, 1.0), 640, 480, (1152, 896)) == (0.0, 0.0, 1.0, 1.0)
    assert bucket_bbox((0.0, 0.0, 0.01, 0.01), 400, 100, (256, 256)) is None  # cropped away


def test_canvas_size_and_stable_splits():
    assert canvas_size(640, 480, 2048 * 2048) == (640, 480)
    assert canvas_size(641, 427, 2048 * 2048) == (640, 432)
    w, h = canvas_size(6000, 4000, 2048 * 2048)
    assert w % 16 == 0 and h % 16 == 0 and w * h <= 2048 * 2048 * 1.01 and abs(math.log(w / h / 1.5)) < 0.01
    names = [f"img{i}.jpg" for i in range(2000)]
    held = [n for n in names if split_of(n, 0.1) == "heldout"]
    assert 150 < len(held) < 250 and held == [n for n in names if split_of(n, 0.1) == "heldout"]
    assert set(held) <= {n for n in names if split_of(n, 0.2) == "heldout"}  # a larger fraction keeps these


# ------------------------------------------------------------------------------------------------ --from-scenes
def write_scene(folder, name, refs, size=(64, 32), scene_size=(64, 32)):
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{name}.png")
    scene = {"caption": f"the {name}", "width": scene_size[0], "height": scene_size[1], "refs": refs}
    (folder / f"{name}.json").write_text(json.dumps(scene))


def test_from_scenes_rgba_crops_masks_and_opaque_crops(tmp_path):
    scenes = tmp_path / "scenes"
    (scenes / "refs").mkdir(parents=True)
    rgba = np.zeros((6, 8, 4), np.uint8)
    rgba[1:5, 2:6] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(scenes / "refs" / "a.png")
    Image.new("RGB", (8, 6), (200, 0, 0)).save(scenes / "refs" / "b.png")
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4] = 255
    Image.fromarray(mask, "L").save(scenes / "refs" / "b.mask.png")
    Image.new("L", (8, 6), 90).save(scenes / "refs" / "c.png")
    refs = [
        {"image": "refs/a.png", "bbox": [0.1, 0.1, 0.5, 0.9], "depth": "fg", "caption": "a"},
        {"image": "refs/b.png", "bbox": [0.5, 0.1, 0.9, 0.9], "depth": "mg"},
        {"image": "refs/c.png", "bbox": [0.0, 0.0, 0.01, 0.01], "depth": "bg"},  # 0.01 % of the frame: small
    ]
    write_scene(scenes, "one", refs)
    write_scene(scenes, "two", [refs[2] | {"bbox": [0.0, 0.0, 0.5, 0.5]}], size=(100, 50))  # stored as 96 x 48
    config = PrepareConfig(heldout_frac=0.0, lossless=True)
    manifest, tally = prepare_scenes(tmp_path / "out", scenes, config=config)
    assert tally.summary() == "2 images written, 3 refs kept; skipped: small 1"
    one, two = iter_real_samples(tmp_path / "out" / "train")
    assert one.caption == "the one" and np.array_equal(one.image, np.asarray(Image.open(scenes / "one.png")))
    assert np.array_equal(one.refs[0].crop, rgba)  # an RGBA crop as it is
    assert np.array_equal(one.refs[1].crop[..., 3], mask) and (one.refs[1].crop[..., :3] == (200, 0, 0)).all()
    assert one.ref_captions == ["a", None] and one.depths == ["fg", "mg"]
    assert two.image.shape == (48, 96, 3) and (two.refs[0].crop == (90, 90, 90, 255)).all()  # grey, opaque
    assert manifest["source"] == {"kind": "scenes", "scenes": str(scenes)}


def test_from_scenes_bad_files_are_one_line_or_counted(tmp_path):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(scenes / "r.png")
    ref = {"image": "r.png", "bbox": [0.1, 0.1, 0.9, 0.9]}
    write_scene(scenes, "a", [ref], size=(64, 64), scene_size=(64, 32))
    with pytest.raises(MppError) as err:
        prepare_scenes(tmp_path / "out", scenes)
    assert str(err.value) == (
        f"{scenes / 'a.json'}: target image: the scene is 64x32, its image 64x64 (another aspect)"
    )
    write_scene(scenes, "a", [ref])
    write_scene(scenes, "b", [ref | {"bbox": [0.9, 0.1, 0.2, 0.9]}])
    with pytest.raises(MppError, match=r"b.json: scene: refs\[0\].bbox: needs x0 < x1, got x0=0.9 > x1=0.2"):
        prepare_scenes(tmp_path / "out", scenes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenes"]
    (scenes / "b.png").unlink()
    (scenes / "b.json").write_text(json.dumps({"caption": "x", "width": 64, "height": 32, "refs": [ref]}))
    _, tally = prepare_scenes(tmp_path / "out", scenes, config=PrepareConfig(skip_bad=True))
    assert tally.skipped == {"missing image": 1} and tally.images == 1


def test_cli_prepare_data_from_scenes(tmp_path):
    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    scenes = tmp_path / "scenes"
    scenes.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(scenes / "r.png")
    write_scene(scenes, "a", [{"image": "r.png", "bbox": [0.1, 0.1, 0.9, 0.9]}])
    args = ["prepare-data", "--from-scenes", str(scenes), "--out", str(tmp_path / "out")]
    ok = CliRunner().invoke(app, args)
    assert ok.exit_code == 0 and "1 images written, 1 refs kept; skipped: none (" in ok.output, ok.output
    bad = CliRunner().invoke(app, [*args, "--overwrite", "--captions", "c.json"])
    assert bad.exit_code == 2 and bad.output.strip() == (
        "error: --captions: is for --from-coco (scene files hold their images, captions, depths) (got 'c.json')"
    )


def test_a_full_disk_is_one_line_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile, "open", full)
    with pytest.raises(MppError) as err:
        write_real_dataset(tmp_path / "out", [("a", sample(0))], config=PrepareConfig(), tally=Tally(), source={})
    assert str(err.value) == f"cannot write {tmp_path / 'out'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


def test_source_images_of_any_mode_become_rgb():
    from moviepostproduction.datasets.crops import to_rgb

    assert to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    assert to_rgb(palette).getpixel((1, 1)) == (10, 20, 30)
    palette.info["transparency"] = 1  # index 1 transparent: composited onto white
    assert to_rgb(palette).getpixel((1, 1)) == (255, 255, 255)
    deep = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))  # 16-bit grey: scaled by its max
    assert np.asarray(to_rgb(deep))[..., 0].tolist() == [[0, 63], [127, 255]]
    assert to_rgb(Image.new("LA", (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
