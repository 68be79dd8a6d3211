"""`mpp eval-fill` (toyworld/fill_eval.py, fill_eval_metrics.py): the scores on cases whose answer is known (the
targets score the ceiling, a fill of the wrong class scores 0, hand-made edges), the variants as the pipelines they
claim to be (zeroing the semantic gate is exactly dropping the map), and the command's files and one-line errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import moviepostproduction.cli.eval_fill  # noqa: F401  (registers `eval-fill` on the app)
from moviepostproduction.cli.common import app
from moviepostproduction.files import load_safetensors, save_safetensors
from moviepostproduction.fill.weights import write_fill_model_dir
from moviepostproduction.toyworld.fill_eval import FILL_VARIANTS, build_variants, generate, heldout_triptychs
from moviepostproduction.toyworld.fill_eval_metrics import (
    BACKGROUND,
    NO_CLASS,
    FillScore,
    edge_jump,
    map_classes,
    pixel_classes,
    score_fill,
    void_band,
)
from moviepostproduction.toyworld.sprite_match import colour_index_map
from moviepostproduction.toyworld.sprites import COLOURS, SEMANTIC_COLOURS, SHAPES
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.toyworld.triptych import TriptychConfig

TOY = TriptychConfig(world=ToyWorldConfig(size=32, ref_size=16, max_refs=3))
WORLD = TriptychConfig(world=ToyWorldConfig(size=128, ref_size=64, max_refs=3))  # the eval's default world


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "plain", seed=0)


@pytest.fixture(scope="module")
def open_gate_dir(tiny_dir, tmp_path_factory) -> Path:
    """A fill dir whose semantic attention gate is open (1.0): the only part that is not at init."""
    out = write_fill_model_dir(tiny_dir, tmp_path_factory.mktemp("fill") / "fill", seed=0)
    file = out / "fill" / "semantic_attention.safetensors"
    state = load_safetensors(file)
    state["gate"] = torch.ones_like(state["gate"])
    save_safetensors(state, file)
    return out


def record(image, item) -> dict:
    tri = item.triptych
    return {"mode": tri.mode, **score_fill(image, tri.target, tri.semantic, tri.mask, item.scene)}


# ------------------------------------------------------------------------------------------------ metrics
def test_the_targets_score_the_ceiling_and_the_map_reads_back_from_their_colours():
    items = heldout_triptychs(24, WORLD)
    score = FillScore("targets", [record(it.triptych.target, it) for it in items])
    row = score.row()
    assert row["class acc"] >= 0.99 and row["background acc"] == 1.0
    assert row["boundary error"] == 0.0 and row["known-region error"] == 0 and row["samples"] == 24
    assert row["class px"] > 10_000  # the holes do cover sprites
    assert {it.triptych.mode for it in items} == {"sprites", "box", "extend"}
    for it in items[:4]:  # outside the void band the colour rule gives back the map on every pixel of the image
        truth = map_classes(it.triptych.semantic)
        keep = ~void_band(truth)
        agree = (pixel_classes(it.triptych.target, it.scene) == truth)[keep].mean()
        assert agree >= 0.99, it.index


def test_a_fill_of_the_wrong_class_scores_zero_and_leaving_the_hole_grey_too():
    def wrong_sprite(item):  # a sprite of the scene whose class the map shows nowhere in the hole
        shown = set(map_classes(item.triptych.semantic)[item.triptych.mask].tolist())
        return next((r for r in item.scene.refs if SHAPES.index(r.shape) + 1 not in shown), None)

    item = next(it for it in heldout_triptychs(40, WORLD) if it.triptych.mode == "sprites" and wrong_sprite(it))
    tri = item.triptych
    sprite_px = tri.mask & (colour_index_map(tri.target) >= 0)
    absent = next(c for c in COLOURS if c not in {r.colour for r in item.scene.refs})
    for colour in (wrong_sprite(item).colour, absent):  # the right silhouettes in another sprite's / no sprite's colour
        wrong = tri.target.copy()
        wrong[sprite_px] = COLOURS[colour]
        row = FillScore("wrong", [record(wrong, item)]).row()
        assert row["class acc"] == 0.0 and row["background acc"] == 1.0 and row["known-region error"] == 0
    assert FillScore("right", [record(tri.target, item)]).row()["class acc"] == 1.0
    grey = FillScore("grey", [record(tri.visible, item)]).row()
    assert grey["class acc"] == 0.0 and grey["boundary error"] > 0.1


def test_pixel_classes_map_colours_to_the_scenes_shapes():
    item = heldout_triptychs(1, WORLD)[0]
    ref = item.scene.refs[0]
    absent = next(c for c in COLOURS if c not in {r.colour for r in item.scene.refs})
    image = np.full((2, 3, 3), 128, np.uint8)  # grey: background
    image[0, 0], image[1, 2] = COLOURS[ref.colour], COLOURS[absent]
    got = pixel_classes(image, item.scene)
    assert got[0, 0] == SHAPES.index(ref.shape) + 1 and got[1, 2] == NO_CLASS
    assert (got[[0, 0, 1, 1], [1, 2, 0, 1]] == BACKGROUND).all()
    sem = np.zeros((1, 2, 3), np.uint8)
    sem[0, 1] = SEMANTIC_COLOURS["star"]
    assert map_classes(sem).tolist() == [[0, SHAPES.index("star") + 1]]


def test_edge_jump_and_void_band_on_hand_made_cases():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:, 2:] = 255
    mask = np.zeros((4, 4), bool)
    mask[:, :2] = True
    assert edge_jump(image, mask) == (4.0, 4)  # 4 crossing pairs, each black | white
    mask[:2, 2] = True  # rows 0-1: white | white at the edge; rows 2-3: black | white; one white / white vertical
    assert edge_jump(image, mask) == (2.0, 5)
    labels = np.zeros((7, 7), int)
    labels[2:5, 2:5] = 2
    band = void_band(labels)  # the square's outer ring (8) and the background ring around it (16)
    assert band.sum() == 24 and band[2, 2] and band[1, 1] and not band[3, 3] and not band[0, 0]


def test_rows_pool_pixels_and_a_mode_without_samples_is_nan():
    a = {"mode": "box", "class px": 10, "class right": 9, "background px": 4, "background right": 4,
         "edge pairs": 2, "edge jump sum": 1.0, "target edge jump sum": 0.5, "known error": 0}  # fmt: skip
    b = {**a, "mode": "sprites", "class px": 30, "class right": 3, "edge pairs": 3, "edge jump sum": 0.0}
    row = FillScore("x", [a, b]).row()
    assert row["class acc"] == 12 / 40 and row["class acc (box)"] == 0.9 and row["class acc (sprites)"] == 0.1
    assert math.isnan(row["class acc (extend)"]) and row["boundary error"] == (1.0 - 0.5 + 0.0 - 0.5) / 5


# ------------------------------------------------------------------------------------------------ variants
def test_zeroed_equals_no_map_exactly_and_untrained_is_the_init(open_gate_dir):
    variants = {v.name: v for v in build_variants(open_gate_dir, list(FILL_VARIANTS))}
    assert [v.use_map for v in variants.values()] == [True, False, True, True, False]
    assert variants["targets"].pipe is None and variants["model"].pipe is variants["no-map"].pipe
    assert variants["model"].pipe.model.semantic.gate.item() == 1.0  # zeroing copied, the model is untouched
    assert variants["zeroed"].pipe.model.semantic.gate.item() == 0.0
    assert variants["untrained"].pipe.model.semantic.gate.item() == 0.0
    assert variants["untrained"].pipe.model.transformer is not variants["model"].pipe.model.transformer
    item = heldout_triptychs(1, TOY)[0]
    fills = {name: generate(v, item, steps=2, seed=5) for name, v in variants.items()}
    assert not np.array_equal(fills["model"], fills["no-map"])  # the open gate lets the map in
    assert np.array_equal(fills["zeroed"], fills["no-map"])  # a zero gate is exactly no map
    assert np.array_equal(fills["untrained"], fills["no-map"])  # only the gate was trained: at init it is closed
    assert np.array_equal(fills["targets"], item.triptych.target)
    mask = item.triptych.mask
    for name, fill in fills.items():
        assert np.array_equal(fill[~mask], item.triptych.target[~mask]), name  # paste-back


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_the_table_json_csv_and_grid(open_gate_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval-fill", "--model", str(open_gate_dir), "--n", "2", "--steps", "1", "--size", "32", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out triptychs 0-1 (split heldout, toy-world seed 0, 32 px" in result.output
    report = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in report["rows"]] == list(FILL_VARIANTS) and report["size"] == 32
    assert all(r["known-region error"] == 0 for r in report["rows"])
    assert report["rows"][-1]["boundary error"] == 0.0
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(FILL_VARIANTS) and {r["model"] for r in rows} == set(FILL_VARIANTS)
    assert "| model | class acc |" in (out / "eval.md").read_text()
    assert Image.open(out / "grid.png").size == (4 * 32 * 2, 2 * len(FILL_VARIANTS) * 32 * 2)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--variants", "model,bogus"], "--variants: expected some of model, no-map"),
        (["--modes", "ring"], "--modes: expected some of sprites, box, extend"),
        (["--n", "0"], "--n: must be an integer in [1, 100000]"),
        (["--size", "8"], "--size: must be an integer in [32, 4096]"),
        (["--plain"], "in_channels=64"),
    ],
)
def test_cli_bad_options_are_one_line_and_exit_2(extra, expected, open_gate_dir, tiny_dir, tmp_path):
    model = tiny_dir if extra == ["--plain"] else open_gate_dir
    extra = [] if extra == ["--plain"] else extra
    result = CliRunner().invoke(app, ["eval-fill", "--model", str(model), "--steps", "1", "--n", "1", *extra])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_mpp_eval_task_fill_is_mpp_eval_fill_and_an_unknown_task_or_compose_option_is_one_line(tmp_path):
    same = ["--variants", "targets", "--n", "3", "--steps", "1"]
    via_eval = CliRunner().invoke(app, ["eval", "--task", "fill", *same, "--out", str(tmp_path / "a")])
    direct = CliRunner().invoke(app, ["eval-fill", *same, "--out", str(tmp_path / "b")])
    assert via_eval.exit_code == direct.exit_code == 0, via_eval.output
    assert (tmp_path / "a" / "eval.md").read_text() == (tmp_path / "b" / "eval.md").read_text()
    refs = ["--refs", "--variants", "pasted", "--n", "2", "--steps", "1"]
    via_eval = CliRunner().invoke(app, ["eval", "--task", "fill", *refs, "--out", str(tmp_path / "c")])
    direct = CliRunner().invoke(app, ["eval-fill", *refs, "--out", str(tmp_path / "d")])
    assert via_eval.exit_code == direct.exit_code == 0, via_eval.output
    assert (tmp_path / "c" / "eval.md").read_text() == (tmp_path / "d" / "eval.md").read_text()
    assert "| pasted |" in (tmp_path / "c" / "eval.md").read_text()
    for args, expected in (
        (["--task", "vary-ish"], "--task: expected one of compose, fill, vary"),
        (["--task", "vary", "--refs"], "--refs: is an option of --task fill only (got True)"),
        (["--refs"], "--refs: is an option of --task fill only (got True)"),
        (["--task", "fill", "--leak-scenes", "3"], "--leak-scenes: is not an option of --task fill"),
    ):
        result = CliRunner().invoke(app, ["eval", *args])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
