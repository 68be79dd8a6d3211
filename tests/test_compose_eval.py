"""`mpp eval` scoring: known answers on the toy world's own ground truth, and the CLI contract."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.files import load_safetensors, save_safetensors
from moviepostproduction.toyworld.compose_eval import (
    VariantScore,
    eval_grid,
    evaluate,
    format_table,
    heldout_scenes,
    samples_csv,
    score_image,
)
from moviepostproduction.toyworld.sprite_match import identity_parts
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import tiny_random_model_dir


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
    from moviepostproduction.toyworld.sprites import render_sprite

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
    rows = [
        VariantScore("a", [0.5], [0.1], [True], [0.01], unseen=[True]).row(),
        VariantScore("b", [0.0], [], [False], unseen=[False]).row(),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split("|")[2].strip() == "IoU"
    assert table[0].split("|")[4:9] == [
        " fg identity ", " fg colour ", " fg shape ", " fg identity (seen pairs) ", " fg identity (unseen pairs) "
    ]  # fmt: skip
    assert table[2].startswith("| a | 0.500 | 0.100 | 1.000 | nan | nan | nan | 1.000 | 0.010 | 1 |")
    assert table[3].startswith("| b | 0.000 | nan | 0.000 | nan | nan | 0.000 | nan |")


def test_fg_identity_is_split_by_whether_the_shape_colour_pair_was_held_out_of_training(tmp_path):
    """Seen + unseen refs = all judged refs, and the two means weight back to the overall fg identity."""
    cfg = ToyWorldConfig(max_refs=3)
    scenes = heldout_scenes(12, 0, cfg, tmp_path)
    score, all_seen = VariantScore("half blank"), VariantScore("no pair held out")
    for k, (toy, _) in enumerate(scenes):
        image = toy.image if k % 2 == 0 else np.full_like(toy.image, 128)
        score_image(score, image, toy, cfg.heldout_combos)
        score_image(all_seen, image, toy, heldout_combos=())
    fg = [r for toy, _ in scenes for r in toy.refs if r.depth == "fg" and r.visible >= 0.9]
    assert score.unseen == [(r.shape, r.colour) in cfg.heldout_combos for r in fg]
    row = score.row()
    seen, unseen = row["fg refs (seen pairs)"], row["fg refs (unseen pairs)"]
    assert seen > 0 and unseen > 0 and seen + unseen == len(score.identity)
    weighted = (seen * row["fg identity (seen pairs)"] + unseen * row["fg identity (unseen pairs)"]) / (seen + unseen)
    assert abs(weighted - row["fg identity"]) < 1e-12
    assert all_seen.row()["fg refs (unseen pairs)"] == 0 and np.isnan(all_seen.row()["fg identity (unseen pairs)"])
    assert all_seen.row()["fg identity (seen pairs)"] == row["fg identity"]


def test_scores_of_several_seeds_pool_and_are_listed_per_seed(tmp_path):
    scenes = heldout_scenes(8, 0, ToyWorldConfig(max_refs=3), tmp_path)
    truth, pooled = VariantScore("truth"), VariantScore("pooled")
    for toy, _ in scenes:
        score_image(truth, toy.image, toy)
        score_image(pooled, toy.image, toy, seed=0)
        score_image(pooled, np.full_like(toy.image, 128), toy, seed=1)  # a blank "second seed"
    row = pooled.row()
    assert row["fg identity per seed"] == [truth.row()["fg identity"], 0.0]
    assert (
        row["fg identity"] == pytest.approx(truth.row()["fg identity"] / 2) and row["refs"] == 2 * truth.row()["refs"]
    )
    assert truth.row()["fg identity per seed"] == [truth.row()["fg identity"]]


def test_every_ref_and_seed_is_kept_as_a_sample_record_and_the_csv_lists_them(tmp_path):
    """One record per (scene, ref, seed) in the table's order; the judged ones carry the crop's reading and agree
    with the pooled lists the table is made from."""
    scenes = heldout_scenes(6, 0, ToyWorldConfig(max_refs=3), tmp_path)
    score = VariantScore("m")
    for toy, _ in scenes:
        score_image(score, toy.image, toy, seed=0)
        score_image(score, np.full_like(toy.image, 128), toy, seed=1)  # blank: found nowhere, read as nothing
    refs = [(toy.index, r, ref) for toy, _ in scenes for r, ref in enumerate(toy.refs)]
    assert len(score.samples) == 2 * len(refs) == len(score.iou)
    assert [s["IoU"] for s in score.samples] == [round(x, 4) for x in score.iou]
    judged = [s for s in score.samples if s["judged"]]
    assert [s["identity"] for s in judged] == score.identity and len(judged) == len(score.identity)
    truth = [s for s in judged if s["seed"] == 0]
    assert truth and all(s["read shape"] == s["shape"] and s["read colour"] == s["colour"] for s in truth)
    assert all(s["read shape"] == "" and s["identity"] is False for s in judged if s["seed"] == 1)
    assert all(s["identity"] == "" for s in score.samples if not s["judged"])
    rows = list(csv.DictReader(io.StringIO(samples_csv([score, VariantScore("empty")]))))
    assert len(rows) == len(score.samples) and {r["model"] for r in rows} == {"m"}
    assert [(int(r["scene"]), int(r["ref"])) for r in rows[:2]] == [(i, r) for i, r, _ in refs[:2]]
    assert list(rows[0])[:4] == ["model", "scene", "ref", "seed"]


@pytest.fixture(scope="module")
def toy_tiny(tmp_path_factory):
    """A tiny random model dir that names a toy world (64 px, <= 2 refs), and a second adapter folder for it: the
    tiny dir's own adapter with 0.05 added to every weight (its zero-init branches open), so it samples otherwise."""
    root = tmp_path_factory.mktemp("toy-tiny")
    model = shutil.copytree(tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny"), root / "model")
    index = json.loads((model / "model_index.json").read_text())
    world = ToyWorldConfig(size=64, ref_size=32, max_refs=2)
    index["toy_world_data"] = {"seed": 0, "config": world.to_dict(), "generator_version": "1"}
    (model / "model_index.json").write_text(json.dumps(index))
    other = shutil.copytree(model / "adapter", root / "other-adapter")
    weights = load_safetensors(other / "model.safetensors")
    opened = {k: v + 0.05 if v.is_floating_point() else v for k, v in weights.items()}
    save_safetensors(opened, other / "model.safetensors")
    return model, other


def test_eval_adapter_scores_the_model_with_that_adapter_folder(toy_tiny, tmp_path):
    """`mpp eval --adapter DIR` = the Python API's `run_eval(adapter=DIR)` = evaluating
    `ComposePipeline.from_pretrained(model, adapter=DIR)` sample for sample; the copy of the model's own adapter
    elsewhere scores exactly as no --adapter."""
    model, other = toy_tiny
    base = ["eval", "--model", str(model), "--n", "2", "--steps", "2", "--variants", "model", "--leak-scenes", "0"]

    def rows(*extra: str, out: str) -> list[dict]:
        result = CliRunner().invoke(app, [*base, *extra, "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "eval.json").read_text())

    plain, scaled = rows(out="plain"), rows("--adapter", str(other), out="scaled")
    same = rows("--adapter", str(shutil.copytree(model / "adapter", tmp_path / "copy")), out="copy")
    assert plain["adapter"] is None and scaled["adapter"] == str(other)
    grid = {name: np.asarray(Image.open(tmp_path / name / "grid.png")) for name in ("plain", "scaled", "copy")}
    assert same["rows"] == plain["rows"] and np.array_equal(grid["copy"], grid["plain"])
    assert not np.array_equal(grid["scaled"], grid["plain"])  # another adapter, other samples

    pipe = ComposePipeline.from_pretrained(model, adapter=other)
    scenes = heldout_scenes(2, 0, ToyWorldConfig(size=64, ref_size=32, max_refs=2), tmp_path / "scenes")
    direct, images = evaluate(pipe, scenes, ("model",), steps=2, leak_scenes=0, progress=False)
    assert json.dumps(direct["model"].row()) == json.dumps(scaled["rows"][0])  # nan-safe
    assert np.array_equal(np.asarray(eval_grid(scenes, images)), grid["scaled"])


def test_eval_adapter_that_is_no_folder_is_one_line_and_exit_2(toy_tiny, tmp_path):
    model, _ = toy_tiny
    result = CliRunner().invoke(app, ["eval", "--model", str(model), "--adapter", str(tmp_path / "nowhere")])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: adapter {tmp_path / 'nowhere'}: not a directory (expected an adapter folder: mpp init-adapter)"
    ]


def test_eval_refs_per_scene_writes_a_row_per_count_the_plot_and_every_sample(toy_tiny, tmp_path):
    model, _ = toy_tiny
    args = ["eval", "--model", str(model), "--n", "1", "--steps", "1", "--canvas", "64", "--refs-per-scene", "2,1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "d" / "eval.json").read_text())
    assert [(r["refs per scene"], r["refs"]) for r in report["rows"]] == [(1, 1), (2, 2)]
    assert report["canvas"] == 64 and report["collapse calibration"]["right"] > 0
    assert report["rows"][0]["targets: IoU"] > 0.9  # the target of a 1-ref scene
    with open(tmp_path / "d" / "samples.csv", newline="") as f:
        samples = list(csv.DictReader(f))
    assert [(s["model"], s["refs per scene"]) for s in samples] == [("model", "1"), ("targets", "1")] + [
        ("model", "2"), ("model", "2"), ("targets", "2"), ("targets", "2")
    ]  # fmt: skip
    assert Image.open(tmp_path / "d" / "refs.png").size == (560, 360)
    assert Image.open(tmp_path / "d" / "grid.png").size == (2 * 64, 2 * 64)  # target + sample, one row per count
    assert "| refs per scene | IoU |" in (tmp_path / "d" / "eval.md").read_text()
    refused = CliRunner().invoke(app, [*args, "--seeds", "2"])
    assert refused.exit_code == 2 and refused.output.splitlines() == [
        "error: --seeds: is not used with --refs-per-scene (held-out dense scenes, the model variant, one seed) (got 2)"
    ]
    bad = CliRunner().invoke(app, ["eval", "--model", str(model), "--refs-per-scene", "1,32"])
    assert bad.exit_code == 2 and bad.output.startswith("error: --refs-per-scene: expected comma-separated counts")
    odd = CliRunner().invoke(app, ["eval", "--model", str(model), "--canvas", "100", "--refs-per-scene", "1"])
    assert odd.exit_code == 2 and odd.output == "error: --canvas: must be a multiple of 16 in [64, 2048] (got 100)\n"
    alone = CliRunner().invoke(app, ["eval", "--model", str(model), "--canvas", "320"])
    assert alone.exit_code == 2
    assert (
        alone.output == "error: --canvas: is for --refs-per-scene (the toy world's own size is the model's) (got 320)\n"
    )
