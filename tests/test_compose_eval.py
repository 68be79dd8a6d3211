"""`mpp eval` scoring: known answers on the toy world's own ground truth, and the CLI contract."""

from __future__ import annotations

import numpy as np

from moviepostproduction.data.synthetic import ToyWorldConfig
from moviepostproduction.evaluation.compose_eval import VariantScore, format_table, heldout_scenes, score_image


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


def test_table_has_one_row_per_model_and_an_iou_column():
    rows = [VariantScore("a", [0.5], [0.1], [True], [0.01]).row(), VariantScore("b", [0.0], [], [False]).row()]
    table = format_table(rows).splitlines()
    assert table[0].split("|")[2].strip() == "IoU"
    assert table[2].startswith("| a | 0.500 | 0.100 | 1.000 | 0.010 | 1 |")
    assert table[3].startswith("| b | 0.000 | nan |")
