"""`mpp eval` scoring: known answers on the toy world's own ground truth, and the CLI contract."""

from __future__ import annotations

import numpy as np

from moviepostproduction.data.synthetic import ToyWorldConfig
from moviepostproduction.evaluation.compose_eval import VariantScore, format_table, heldout_scenes, score_image
from moviepostproduction.evaluation.sprite_match import identity_parts


def test_ground_truth_scenes_score_near_perfect_and_blank_images_score_zero(tmp_path):
    scenes = heldout_scenes(12, 0, ToyWorldConfig(max_refs=3), tmp_path)
    truth, blank = VariantScore("truth"), VariantScore("blank")
    for toy, scene in scenes:
        assert [r.bbox for r in scene.refs] == [tuple(r.bbox) for r in toy.refs]
        score_image(truth, toy.image, toy)
        score_image(blank, np.full_like(toy.image, 128), toy)
    row = truth.row()
    assert row["refs"] == sum(len(t.refs) for t, _ in scenes)
    assert row["IoU"] > 0.7 and row["fg identity"] >= 0.9  # occlusion makes some boxes partial
    assert blank.row()["IoU"] == 0.0 and blank.row()["fg identity"] == 0.0
    assert len(truth.colour) == len(truth.shape) == len(truth.identity) > 0
    assert truth.identity == [c and s for c, s in zip(truth.colour, truth.shape, strict=True)]
    assert row["fg colour"] >= row["fg identity"] and row["fg shape"] >= row["fg identity"]


def test_identity_parts_split_colour_from_shape():
    """A same-coloured different shape matches colour only; a recoloured same shape matches shape only."""
    from moviepostproduction.data.sprites import render_sprite

    def sprite(shape: str, colour: str) -> np.ndarray:
        canvas = np.full((64, 64, 3), 255.0, dtype=np.float32)
        render_sprite(shape, colour, "solid", canvas_hw=(64, 64), centre=(32, 32), radius=26, angle_deg=0.0,
                      phase=(0.0, 0.0)).composite(canvas)  # fmt: skip
        return canvas.astype(np.uint8)

    red_star, red_circle, blue_star = sprite("star", "red"), sprite("circle", "red"), sprite("star", "blue")
    assert identity_parts(red_star, red_star) == (True, True)
    assert identity_parts(red_star, red_circle) == (True, False)
    assert identity_parts(red_star, blue_star) == (False, True)
    assert identity_parts(red_star, np.full_like(red_star, 255)) == (False, False)


def test_table_has_one_row_per_model_and_an_iou_column():
    rows = [VariantScore("a", [0.5], [0.1], [True], [0.01]).row(), VariantScore("b", [0.0], [], [False]).row()]
    table = format_table(rows).splitlines()
    assert table[0].split("|")[2].strip() == "IoU"
    assert table[0].split("|")[4:7] == [" fg identity ", " fg colour ", " fg shape "]
    assert table[2].startswith("| a | 0.500 | 0.100 | 1.000 | nan | nan | 0.010 | 1 |")
    assert table[3].startswith("| b | 0.000 | nan |")
