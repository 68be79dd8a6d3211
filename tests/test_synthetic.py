"""The toy world (DESIGN 6): deterministic scenes, labels that match the pixels, stable splits, shards."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import MppError, ValidationError
from moviepostproduction.toyworld.backgrounds import MAX_BG_CHROMA
from moviepostproduction.toyworld.metrics import bbox_iou
from moviepostproduction.toyworld.regions import dilate
from moviepostproduction.toyworld.shards import iter_shards, read_manifest, write_dataset
from moviepostproduction.toyworld.sprite_match import colour_index_map
from moviepostproduction.toyworld.sprites import SEMANTIC_COLOURS, mask_bbox
from moviepostproduction.toyworld.synthetic import (
    COLOURS,
    DEPTHS,
    HELDOUT_COMBOS,
    PATTERNS,
    SHAPES,
    ToyWorldConfig,
    describe,
    generate_scene,
)

SCENES = [generate_scene(i, 11) for i in range(24)]


def _arrays(scene):
    return [scene.image, scene.semantic, scene.labels] + [a for r in scene.refs for a in (r.image, r.mask)]


def test_vocabulary_sizes():
    assert len(SHAPES) >= 6 and len(COLOURS) >= 6 and PATTERNS == ("solid", "stripes", "dots", "checker")
    assert set(SEMANTIC_COLOURS) == set(SHAPES)


def test_same_seed_gives_identical_scenes():
    a, b = generate_scene(5, 3), generate_scene(5, 3)
    assert a.caption == b.caption and a.meta() == b.meta()
    for x, y in zip(_arrays(a), _arrays(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_different_seeds_indices_and_splits_differ():
    base = generate_scene(0, 0).image
    for other in (generate_scene(0, 1), generate_scene(1, 0), generate_scene(0, 0, split="heldout")):
        assert not np.array_equal(base, other.image)


def test_labels_are_consistent_with_pixels():
    for scene in SCENES:
        assert scene.image.shape == (128, 128, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.refs) <= 4
        assert len({r.colour for r in scene.refs}) == len(scene.refs)  # colours distinct: unambiguous captions
        for i, ref in enumerate(scene.refs):
            x0, y0, x1, y1 = ref.bbox
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            assert ref.bbox == mask_bbox(ref.mask)
            if ref.visible > 0.99:  # the drawn, unoccluded sprite fills its box
                assert bbox_iou(ref.bbox, mask_bbox(scene.labels == i + 1)) > 0.9
            assert ref.image.shape == (64, 64, 3)
            assert (ref.image[0, 0] == 255).all() and (ref.image[-1, -1] == 255).all()  # alone on white
            assert ref.caption in scene.caption
            assert (scene.semantic[scene.labels == i + 1] == SEMANTIC_COLOURS[ref.shape]).all()
        assert (scene.semantic[scene.labels == 0] == 0).all()


def test_depth_order_front_to_back_and_occlusion():
    for scene in SCENES:
        ranks = [DEPTHS.index(r.depth) for r in scene.refs]
        assert ranks[0] == 0 and ranks == sorted(ranks)  # refs[0] is fg, then mg, then bg
        for near in range(len(scene.refs)):
            for far in range(near + 1, len(scene.refs)):
                a, b = scene.refs[near], scene.refs[far]
                if ranks[near] < ranks[far]:
                    assert a.mask.sum() > b.mask.sum()  # fg is larger than mg, mg larger than bg
                overlap = a.mask & b.mask
                assert not (b.visible_mask & overlap).any()  # the nearer sprite occludes
                core = overlap & ~dilate(~a.mask, 1)  # away from anti-aliased edges
                if core.any():  # and it is the nearer sprite's colour that shows there
                    seen = colour_index_map(scene.image)[core]
                    assert (seen == list(COLOURS).index(a.colour)).mean() > 0.9
                    assert not (seen == list(COLOURS).index(b.colour)).any()


def test_backgrounds_are_muted():
    for scene in SCENES[:8]:
        sprite = np.zeros(scene.labels.shape, dtype=bool)
        for ref in scene.refs:
            sprite |= ref.mask
        bg = scene.image[~dilate(sprite, 1)].astype(int)
        assert (bg.max(-1) - bg.min(-1)).max() <= MAX_BG_CHROMA + 1  # + rounding


def test_captions_and_articles():
    assert describe("red", "stripes", "star") == "a red striped star"
    assert describe("orange", "solid", "ring") == "an orange ring"
    assert all(s.caption.endswith("background") or " scene with " in s.caption for s in SCENES)


def test_small_images_and_config_validation():
    scene = generate_scene(2, 0, ToyWorldConfig(size=64, ref_size=32))
    assert scene.image.shape == (64, 64, 3) and scene.refs[0].image.shape == (32, 32, 3)
    with pytest.raises(ValidationError, match=r"max_refs: must be <= 7 .*\(got 9\)"):
        ToyWorldConfig(max_refs=9)
    with pytest.raises(ValidationError, match=r"heldout_combos\[0\]"):
        ToyWorldConfig(heldout_combos=(("hexagon", "red"),))
    with pytest.raises(ValidationError, match="split"):
        generate_scene(0, 0, split="test")


def test_heldout_combinations_only_in_heldout_split():
    held = set(HELDOUT_COMBOS)
    train = [(r.shape, r.colour) for s in SCENES for r in s.refs]
    heldout = [(r.shape, r.colour) for i in range(12) for r in generate_scene(i, 11, split="heldout").refs]
    assert not held & set(train)
    assert held & set(heldout)


def _digest(path):
    return {
        p.relative_to(path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.rglob("*")
        if p.is_file()
    }


def test_shards_are_deterministic_and_round_trip(tmp_path):
    m = write_dataset(tmp_path / "a", 7, seed=4, heldout_frac=0.3, shard_size=3)
    write_dataset(tmp_path / "b", 7, seed=4, heldout_frac=0.3, shard_size=3, workers=2)  # same bytes
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert m["splits"]["train"] == {"count": 5, "shards": ["train/shard-000000.tar", "train/shard-000001.tar"]}
    assert m["splits"]["heldout"]["count"] == 2 and read_manifest(tmp_path / "a") == m
    with tarfile.open(tmp_path / "a/train/shard-000000.tar") as tar:
        members = tar.getmembers()
    assert all(t.mtime == 0 and t.uid == 0 and t.gid == 0 for t in members)
    assert [t.name for t in members[:4]] == ["000000.scene.png", *[f"000000.ref{i}.png" for i in range(3)]][:4]

    samples = list(iter_shards(tmp_path / "a/train"))
    assert [s.key for s in samples] == [f"{i:06d}" for i in range(5)]
    for sample in samples:
        scene = generate_scene(int(sample.key), 4)
        np.testing.assert_array_equal(sample.scene, scene.image)
        np.testing.assert_array_equal(sample.labels, scene.labels)
        np.testing.assert_array_equal(sample.refs[-1], scene.refs[-1].image)
        assert sample.caption == scene.caption and sample.depths == [r.depth for r in scene.refs]
        np.testing.assert_array_equal(sample.bboxes, [r.bbox for r in scene.refs])
        assert sample.meta["refs"][0]["shape"] == scene.refs[0].shape


def test_sample_does_not_depend_on_n(tmp_path):
    write_dataset(tmp_path / "small", 2, seed=9, heldout_frac=0.0)
    write_dataset(tmp_path / "large", 4, seed=9, heldout_frac=0.0)
    small, large = list(iter_shards(tmp_path / "small/train")), list(iter_shards(tmp_path / "large/train"))
    for a, b in zip(small, large[:2], strict=True):
        np.testing.assert_array_equal(a.scene, b.scene)


def test_truncated_or_corrupt_shards_are_one_line_errors_naming_file_and_sample(tmp_path):
    write_dataset(tmp_path / "a", 3, seed=2, heldout_frac=0.0)
    shard = tmp_path / "a/train/shard-000000.tar"
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:  # cut inside the last sample, after its scene.png: its json is missing
        last_scene = next(m for m in tar.getmembers() if m.name == "000002.scene.png")
    cut = tmp_path / "cut/train"
    cut.mkdir(parents=True)
    (cut / "shard-000000.tar").write_bytes(data[: last_scene.offset_data + last_scene.size + 512])
    with pytest.raises(MppError, match=r"shard-000000.tar: sample '000002' is incomplete or corrupt \(missing member"):
        list(iter_shards(cut))
    broken = tmp_path / "png/train"
    broken.mkdir(parents=True)
    with tarfile.open(shard) as src, tarfile.open(broken / "shard-000000.tar", "w") as dst:
        for member in src.getmembers():
            body = src.extractfile(member).read()
            if member.name == "000001.ref0.png":
                body = b"not a png"
            member.size = len(body)
            dst.addfile(member, io.BytesIO(body))
    samples = iter_shards(broken)
    assert next(samples).key == "000000"  # samples before the bad one still decode
    with pytest.raises(MppError, match="sample '000001' is incomplete or corrupt .*mpp prepare-data"):
        next(samples)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/shard-000000.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(MppError, match="shard-000000.tar: not a readable tar shard"):
        list(iter_shards(tmp_path / "junk"))


def test_samples_do_not_depend_on_the_shard_size(tmp_path):
    write_dataset(tmp_path / "one", 5, seed=3, heldout_frac=0.0)
    write_dataset(tmp_path / "many", 5, seed=3, heldout_frac=0.0, shard_size=2)
    assert len(list((tmp_path / "many/train").glob("shard-*.tar"))) == 3
    one, many = list(iter_shards(tmp_path / "one/train")), list(iter_shards(tmp_path / "many/train"))
    assert [s.key for s in one] == [s.key for s in many]
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a.scene, b.scene)
        assert a.meta == b.meta


def test_splits_are_disjoint(tmp_path):
    write_dataset(tmp_path, 20, seed=1, heldout_frac=0.25)
    hashes = {
        split: {hashlib.sha256(s.scene.tobytes()).hexdigest() for s in iter_shards(tmp_path / split)}
        for split in ("train", "heldout")
    }
    assert len(hashes["train"]) == 15 and len(hashes["heldout"]) == 5
    assert not hashes["train"] & hashes["heldout"]


def test_shards_load_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    write_dataset(tmp_path, 3, seed=2, heldout_frac=0.0)
    dataset = wds.WebDataset([str(tmp_path / "train/shard-000000.tar")], shardshuffle=False).decode("rgb8")
    samples = list(dataset)
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002"]
    assert samples[0]["scene.png"].shape == (128, 128, 3)
    np.testing.assert_array_equal(samples[1]["scene.png"], generate_scene(1, 2).image)
    assert samples[2]["json"]["refs"][0]["depth"] == "fg"


def test_interrupted_write_leaves_no_partial_shard(tmp_path):
    written = []

    def progress(k):
        written.append(k)
        if len(written) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, 6, heldout_frac=0.0, shard_size=2, progress=progress)
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["shard-000000.tar"]
    assert not (tmp_path / "manifest.json").exists()


def test_cli_prepare_data_and_overwrite_refusal(tmp_path):
    runner = CliRunner()
    out = tmp_path / "toy"
    args = ["prepare-data", "--out", str(out), "--n", "3", "--seed", "1", "--size", "64", "--shard-size", "2"]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "manifest.json").read_text())["config"]["size"] == 64

    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines() == [
        f"error: out: is not empty; pass --overwrite to replace its shards (got {str(out)!r})"
    ]
    (out / "notes.txt").write_text("keep me")
    again = runner.invoke(app, [*args[:3], "--n", "2", *args[5:], "--overwrite"])
    assert again.exit_code == 0, again.output
    assert (out / "notes.txt").exists()
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar"]  # stale shard removed

    bad = runner.invoke(app, ["prepare-data", "--out", str(tmp_path / "x"), "--n", "0"])
    assert bad.exit_code == 2 and "n: must be in [1, 10000000] (got 0)" in bad.output
