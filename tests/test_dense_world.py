"""Dense toy scenes (issue 44): up to 16 refs, colours repeating, heavy overlaps, small boxes; the 1-4-ref world
that the shipped model and every existing dataset were made from stays bit for bit as it was."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from moviepostproduction.errors import ValidationError
from moviepostproduction.toyworld.compose_eval import heldout_scenes
from moviepostproduction.toyworld.shards import ToySample
from moviepostproduction.toyworld.synthetic import GENERATOR_VERSION, ToyWorldConfig, generate_scene


def _digest(cfg: ToyWorldConfig, split: str, n: int = 30) -> str:
    h = hashlib.sha256()
    for i in range(n):
        s = generate_scene(i, 0, cfg, split=split)
        h.update(json.dumps(s.meta(), sort_keys=True).encode())
        for a in [s.image, s.semantic, s.labels, *(x for r in s.refs for x in (r.image, r.mask, r.visible_mask))]:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


@pytest.mark.parametrize(
    ("cfg", "split", "digest"),
    [
        (ToyWorldConfig(), "train", "3fb35a19ae69c302"),
        (ToyWorldConfig(max_refs=3), "heldout", "e65219aea6a67abf"),  # the shipped model's data
        (ToyWorldConfig(size=64, ref_size=32, max_refs=7), "train", "e0bae66a0160abf3"),
    ],
)
def test_the_default_world_is_unchanged_bit_for_bit(cfg, split, digest):
    """Digests taken before the dense options existed: pixels, masks and labels of scenes 0-29."""
    assert GENERATOR_VERSION == "1" and _digest(cfg, split) == digest


def test_a_default_config_writes_the_manifest_it_always_wrote_and_a_dense_one_round_trips():
    before = ["size", "ref_size", "min_refs", "max_refs", "supersample", "min_visible", "rotation_deg",
              "heldout_combos", "heldout_combo_prob"]  # fmt: skip
    assert list(ToyWorldConfig().to_dict()) == before
    dense = ToyWorldConfig.dense(min_refs=2)
    assert ToyWorldConfig.from_dict(json.loads(json.dumps(dense.to_dict()))) == dense


@pytest.mark.parametrize("count", [1, 8, 16])
def test_dense_scenes_have_the_asked_count_with_distinct_shape_colour_pairs(count):
    cfg = ToyWorldConfig.dense(min_refs=count, max_refs=count)
    for i in range(4):
        scene = generate_scene(i, 0, cfg, split="heldout")
        pairs = [(r.shape, r.colour) for r in scene.refs]
        assert len(pairs) == count == len(set(pairs)) and scene.image.shape == (320, 320, 3)
        assert scene.refs[0].depth == "fg" and set(np.unique(scene.labels)) <= set(range(count + 1))
        if count == 16:
            assert max(Counter(c for _, c in pairs).values()) >= 3  # 16 refs, 7 colours
    with pytest.raises(ValidationError, match=r"max_refs: must be <= 7 \(one colour per ref; colour_repeats: 16\)"):
        ToyWorldConfig(max_refs=16)
    with pytest.raises(ValidationError, match=r"max_refs: must be <= 16 \(one \(shape, colour\) pair per ref\)"):
        ToyWorldConfig.dense(max_refs=17)


def test_overlap_prob_hides_farther_sprites_under_nearer_ones():
    """Share of refs less than half visible, 8 refs per scene: rare with the 0.5 placement rule, most with every
    ref placed over a farther one."""

    def hidden(p: float) -> float:
        cfg = ToyWorldConfig.dense(min_refs=8, max_refs=8, overlap_prob=p, small_prob=0.0)
        return float(np.mean([r.visible < 0.5 for i in range(20) for r in generate_scene(i, 0, cfg).refs]))

    assert hidden(0.0) < 0.05 and hidden(1.0) > 0.6


def test_small_boxes_are_below_every_depth_box_and_never_the_first_sprite():
    def longer_sides(small_prob: float) -> list[list[float]]:
        cfg = ToyWorldConfig.dense(min_refs=8, max_refs=8, small_prob=small_prob, overlap_prob=0.0)
        scenes = [generate_scene(i, 0, cfg) for i in range(15)]
        return [[max(r.bbox[2] - r.bbox[0], r.bbox[3] - r.bbox[1]) for r in s.refs] for s in scenes]

    small = longer_sides(1.0)
    assert all(sum(side <= 0.1 + 2 / 320 for side in s) == 7 for s in small)  # all but the full-size fg one
    assert min(side for s in small for side in s) >= 0.06  # a rotated triangle or diamond: 0.75 of the diameter
    assert min(side for s in longer_sides(0.0) for side in s) > 0.075


def test_dense_scenes_are_deterministic_and_captions_name_the_nearest_four(tmp_path):
    cfg = ToyWorldConfig.dense(min_refs=12, max_refs=12)
    a, b = generate_scene(3, 5, cfg, split="heldout"), generate_scene(3, 5, cfg, split="heldout")
    assert a.meta() == b.meta() and np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, generate_scene(4, 5, cfg, split="heldout").image)
    assert [r.caption in a.caption for r in a.refs] == [True] * 4 + [False] * 8
    (_, scene), *_ = heldout_scenes(1, 5, cfg, tmp_path, start=3)
    assert [r.caption for r in scene.refs] == [r.caption for r in a.refs[:4]] + [None] * 8
    # training (the cache build) reads the same: a phrase for the refs the caption names, none for the others
    sample = ToySample("k", a.image, [r.image for r in a.refs], a.image, a.image[..., 0], a.meta())
    assert sample.ref_captions == [r.caption for r in a.refs[:4]] + [None] * 8
    plain = generate_scene(3, 5, ToyWorldConfig(), split="heldout")  # the default world names every ref
    assert ToySample("k", plain.image, [], plain.image, plain.image[..., 0], plain.meta()).ref_captions == [
        r.caption for r in plain.refs
    ]


def test_prepare_data_dense_writes_the_dense_world_and_is_toy_only(tmp_path):
    from typer.testing import CliRunner

    from moviepostproduction.cli import app
    from moviepostproduction.toyworld.shards import iter_shards, read_manifest

    args = ["prepare-data", "--out", str(tmp_path / "d"), "--n", "4", "--dense", "--size", "160", "--ref-size", "32"]
    assert CliRunner().invoke(app, args).exit_code == 0
    manifest = read_manifest(tmp_path / "d")
    assert ToyWorldConfig.from_dict(manifest["config"]) == ToyWorldConfig.dense(size=160, ref_size=32)
    first = next(iter_shards(tmp_path / "d" / "train"))
    truth = generate_scene(0, 0, ToyWorldConfig.dense(size=160, ref_size=32))
    assert first.meta["refs"] == truth.meta()["refs"] and np.array_equal(first.scene, truth.image)
    coco = ["prepare-data", "--out", str(tmp_path / "c"), "--from-coco", "x.json", "--dense"]
    refused = CliRunner().invoke(app, coco)
    assert refused.exit_code == 2 and refused.output == "error: --dense: is for the toy world only (got True)\n"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("size_scale", 2.0, "size_scale: must be in [0.25, 1] (got 2.0)"),
        ("overlap_prob", -0.1, "overlap_prob: must be in [0, 1] (got -0.1)"),
        ("small_diameter", 5, "small_diameter: must be (low, high) with 0.02 <= low <= high <= 0.5 (got 5)"),
        ("small_diameter", (0.2, 0.1), "small_diameter: must be (low, high) with 0.02 <= low <= high <= 0.5"),
        ("caption_refs", 0, "caption_refs: must be >= 1 (or None: all) (got 0)"),
        ("overlap_min_visible", 0.9, "overlap_min_visible: must be in [0, min_visible] (got 0.9)"),
    ],
)
def test_bad_dense_fields_are_one_line_naming_the_field(field, value, message):
    with pytest.raises(ValidationError) as err:
        ToyWorldConfig.dense(**{field: value})
    assert str(err.value).startswith(f"ToyWorldConfig: {message}") and "\n" not in str(err.value)
