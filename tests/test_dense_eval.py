"""`mpp eval --refs-per-scene` scoring (issue 44): known answers on the dense toy world's own targets."""

from __future__ import annotations

import numpy as np
import pytest

from moviepostproduction.encoders.frozen import ImageEncoder
from moviepostproduction.errors import ValidationError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.dense_eval import CountScore, dense_world, parse_counts, score_dense
from moviepostproduction.toyworld.dense_report import format_dense_table, plot_by_count, table_rows
from moviepostproduction.toyworld.metrics import locate_sprite, locate_sprite_near
from moviepostproduction.toyworld.sprites import render_sprite
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.tiny import tiny_random_model_dir


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return ImageEncoder.load(ModelDir.at(tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny")))


def test_counts_parse_and_bad_ones_are_one_line():
    assert parse_counts("16, 1,2,4,8,2") == [1, 2, 4, 8, 16]
    for bad in ("", "0", "17", "1,a", "-1"):
        with pytest.raises(ValidationError) as err:
            parse_counts(bad)
        assert str(err.value).startswith("--refs-per-scene: expected comma-separated counts in [1, 16], e.g. 1,2,4,8")


def test_a_sprite_is_located_near_its_box_not_where_its_colour_is_largest():
    canvas = np.full((128, 128, 3), 128.0, dtype=np.float32)
    for centre, radius in (((32, 32), 24), ((100, 100), 12)):  # a big red circle and a small one
        render_sprite("circle", "red", "solid", canvas_hw=(128, 128), centre=centre, radius=radius, angle_deg=0.0,
                      phase=(0.0, 0.0)).composite(canvas)  # fmt: skip
    image, ref = canvas.astype(np.uint8), canvas[8:56, 8:56].astype(np.uint8)
    small = (88 / 128, 88 / 128, 112 / 128, 112 / 128)
    assert locate_sprite(image, ref)[0] < 0.1  # the big one
    assert locate_sprite_near(image, ref, small) == pytest.approx(small, abs=1.5 / 128)


def test_targets_score_as_the_ceiling_and_a_blank_image_as_nothing(encoder):
    world = dense_world(ToyWorldConfig(), 8, 320)
    targets, blank = CountScore("targets", 8), CountScore("blank", 8)
    scenes = [generate_scene(i, 0, world, split="heldout") for i in range(3)]
    for toy in scenes:
        score_dense(targets, toy.image, toy, encoder, threshold=2.0)  # above every cosine: all collapse
        score_dense(blank, np.full_like(toy.image, 128), toy, encoder, threshold=-2.0)  # below every cosine: none
    assert len(targets.iou) == 24 == len(targets.samples)
    unoccluded = [iou for iou, s in zip(targets.iou, targets.samples, strict=True) if s["visible"] == 1.0]
    assert unoccluded and min(unoccluded) > 0.9
    assert targets.identity and all(targets.identity) and all(targets.collapsed)
    assert blank.row()["IoU"] == 0.0 and not any(blank.identity) and not any(blank.collapsed)
    judged = [s for s in targets.samples if s["judged"]]
    assert [s["DINO similarity"] for s in judged] == [round(x, 4) for x in targets.similarity]
    rows = table_rows({8: (targets, blank, None)})
    assert rows[0]["fg identity"] == 1.0 and rows[0]["targets: fg identity"] == 0.0
    assert format_dense_table(rows).splitlines()[2].startswith("| 8 | ")
    assert plot_by_count(rows).size == (560, 360)
