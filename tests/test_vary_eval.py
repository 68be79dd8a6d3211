"""`mpp eval-vary` (toyworld/vary_eval.py, vary_metrics.py): the metrics on known answers, the held-out draw, the
ablations' conditioning, and the files the command writes (tiny random model dir with a NanoDiT in it)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import moviepostproduction.cli.eval_vary  # noqa: F401 - registers `eval-vary` on the app
from moviepostproduction.cli import app
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.vary_eval import (
    GENERATED,
    HELDOUT_START,
    CellScore,
    generate_cell,
    heldout_refs,
    score_cell,
    vae_round_trip,
    variant_inputs,
)
from moviepostproduction.toyworld.vary_metrics import (
    cosine_similarity,
    feature_diversity,
    pixel_diversity,
    read_variation,
    sprite_box_on_white,
)
from moviepostproduction.vary.pipeline import VaryPipeline

from helpers import tiny_dir_with_nanodit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_dir_with_nanodit(tmp_path_factory.mktemp("model") / "tiny")


# ------------------------------------------------------------------------------------------------ metrics
def test_similarity_and_diversity_of_identical_and_orthogonal_variations():
    feats = np.array([[1.0, 2.0, 3.0]] * 3)
    assert cosine_similarity(feats, feats) == pytest.approx([1.0, 1.0, 1.0])
    assert feature_diversity(feats) == pytest.approx(0.0)  # S identical variations: no diversity
    assert feature_diversity(np.eye(3)) == pytest.approx(1.0)  # pairwise orthogonal: 1 - cos = 1
    assert feature_diversity(np.array([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    same = np.full((4, 8, 8, 3), 0.3)
    assert pixel_diversity(same) == 0.0
    black_white = np.stack([np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    assert pixel_diversity(black_white) == pytest.approx(1.0)  # RMS in [0, 1] units
    # three images at 0, 0, 1: pairs (0,0) -> 0, (0,1) and (0,1) -> 1, mean 2/3
    assert pixel_diversity(np.stack([np.zeros((2, 2, 3))] * 2 + [np.ones((2, 2, 3))])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 2 variations, got 1"):
        feature_diversity(feats[:1])


def test_reading_a_toy_ref_gives_its_labels_and_its_box():
    ref = generate_scene(3, 0, ToyWorldConfig(size=64, ref_size=64), split="heldout").refs[0]
    reading = read_variation(ref.image, ref.colour)
    assert reading.kept(ref.shape, ref.colour) == (True, True)
    box = sprite_box_on_white(ref.image)
    assert np.allclose(reading.box, box, atol=3 / 64)  # the colour region is the sprite, anti-aliased edges aside
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert read_variation(blank, ref.colour) == read_variation(blank, "red")
    assert (read_variation(blank, "red").colour, read_variation(blank, "red").box, sprite_box_on_white(blank)) == (
        None,
        None,
        None,
    )
    square = blank.copy()
    square[16:32, 8:40] = (255, 0, 0)
    assert sprite_box_on_white(square) == (8 / 64, 16 / 64, 40 / 64, 32 / 64)


def test_ceiling_rows_score_one_on_the_references_themselves():
    refs = heldout_refs(24, 64)
    images = np.stack([r.image for r in refs])[:, None]  # (N, 1, H, W, 3)
    cls = np.random.default_rng(0).normal(size=(24, 1, 8))
    row = score_cell(CellScore("references", None, None), refs, images, cls, cls[:, 0]).row()
    assert row["shape kept"] == 1.0 and row["colour kept"] == 1.0  # the reading rules on the refs: the ceiling
    assert row["DINO sim"] == pytest.approx(1.0) and np.isnan(row["diversity"])  # one image per ref: no pairs
    assert row["layout IoU"] > 0.85 and row["samples"] == 24


# -------------------------------------------------------------------------------------------- held-out draw
def test_heldout_refs_are_heldout_scenes_past_the_trainer_previews():
    refs = heldout_refs(3, 64, input="scene", caption="scene")
    world = ToyWorldConfig(size=64, ref_size=64)
    for k, ref in enumerate(refs):
        scene = generate_scene(HELDOUT_START + k, 0, world, split="heldout")
        assert ref.index == HELDOUT_START + k and np.array_equal(ref.image, scene.image)
        assert (ref.shape, ref.colour, ref.box, ref.caption) == (
            scene.refs[0].shape,
            scene.refs[0].colour,
            scene.refs[0].bbox,
            scene.caption,
        )
    sprite = heldout_refs(1, 64)[0]
    assert np.array_equal(sprite.image, generate_scene(HELDOUT_START, 0, world, split="heldout").refs[0].image)
    assert sprite.caption.endswith(sprite.shape) and sprite.box == sprite_box_on_white(sprite.image)
    assert heldout_refs(1, 64, caption="none")[0].caption is None


# ---------------------------------------------------------------------------------------------- ablations
def test_ablations_feed_exactly_the_conditioning_they_name(model_dir):
    pipe = VaryPipeline.from_model_dir(model_dir)
    refs = heldout_refs(2, 32, start=0)
    feats = pipe.encode([Image.fromarray(r.image) for r in refs], [r.caption for r in refs])
    null = pipe.model.patch_null.detach()
    got = {v: variant_inputs(v, feats, pipe.model) for v in GENERATED}
    assert all(torch.equal(got["model"][k], feats[k]) for k in feats)
    for v in ("no-patches", "cls-only"):  # the patches are the learned null of a dropped image, in every row
        assert all(torch.equal(p, null) for p in got[v]["image_patches"])
        assert torch.equal(got[v]["image_cls"], feats["image_cls"])
    assert torch.equal(got["image-only"]["image_patches"], feats["image_patches"])
    assert got["image-only"]["text_embeds"] is None and got["cls-only"]["text_embeds"] is None
    assert got["text-only"]["image_cls"] is None and torch.equal(got["text-only"]["text_embeds"], feats["text_embeds"])

    def run(variant: str, **change) -> np.ndarray:
        return generate_cell(pipe, refs, {**feats, **change}, variant, 4.0, 1.5, seeds=2, steps=2)

    other_patches = {"image_patches": feats["image_patches"].flip(0)}  # ref 0 gets ref 1's patches and back
    other_cls = {"image_cls": feats["image_cls"].flip(0)}
    assert run("model").shape == (2, 2, 32, 32, 3)
    assert not np.array_equal(run("model", **other_patches), run("model"))  # patches reach the full model
    assert np.array_equal(run("no-patches", **other_patches), run("no-patches"))  # ... and never the ablation
    assert not np.array_equal(run("no-patches", **other_cls), run("no-patches"))  # which still reads the CLS
    assert not np.array_equal(run("no-patches"), run("model"))
    other_text = {"text_embeds": feats["text_embeds"].flip(0), "text_mask": feats["text_mask"].flip(0)}
    assert np.array_equal(run("cls-only", **other_text, **other_patches), run("cls-only"))
    assert np.array_equal(run("text-only", **other_cls, **other_patches), run("text-only"))
    first, second = run("model"), generate_cell(pipe, refs, feats, "model", 4.0, 1.5, seeds=2, steps=2, chunk=1)
    assert np.array_equal(first, second)  # each (ref, seed) has its own noise: batching does not matter
    assert not np.array_equal(first[:, 0], first[:, 1])  # and the seeds differ


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_writes_the_tables_samples_and_grids(model_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval-vary", "--model", str(model_dir), "--n", "2", "--seeds", "2", "--steps", "2", "--out", str(out),
            "--text-scales", "1,4", "--image-scales", "1.5", "--device", "cpu", "--dtype", "fp32"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert {p.name for p in out.iterdir()} == {"eval.md", "eval.json", "samples.csv", "grid.png", "sweep.png"}
    report = json.loads((out / "eval.json").read_text())
    assert [r["variant"] for r in report["rows"]] == [*GENERATED, "references", "scenes", "vae-roundtrip"]
    assert [(r["s_T"], r["s_I"]) for r in report["sweep"]] == [(1.0, 1.5), (4.0, 1.5)]
    model_row = report["rows"][0]
    assert model_row == {**report["sweep"][1], "variant": "model"}  # the default cell is the model row
    assert [(r["s_T"], r["s_I"]) for r in report["rows"][2:]] == [(None, 1.5), (None, 1.5), (4.0, None),
                                                                  (None, None), (None, None), (None, None)]  # fmt: skip
    rows = list(csv.DictReader((out / "samples.csv").open()))
    assert len(rows) == 5 * 4 + 3 * 2 + 2 * 4  # variants x refs x seeds, ceilings once per ref, sweep cells
    assert "| model | 4 | 1.5 |" in (out / "eval.md").read_text() and "| references | - | - | 1.000 | 1.000" in (
        result.output
    )
    assert Image.open(out / "grid.png").size == (32 * 7, 32 * 2)  # input, scene, 5 variants; a row per ref
    assert Image.open(out / "sweep.png").size == (2 * 32 + 2 + 4, 3 * (32 + 4))


def test_ceilings_alone_sample_nothing(model_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval-vary", "--model", str(model_dir), "--n", "2", "--seeds", "2", "--out", str(out),
            "--variants", "references,vae-roundtrip"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    assert [r["variant"] for r in report["rows"]] == ["references", "vae-roundtrip"] and report["sweep"] == []
    assert report["rows"][0]["shape kept"] == 1.0 and report["rows"][1]["samples"] == 2
    assert {p.name for p in out.iterdir()} == {"eval.md", "eval.json", "samples.csv"}  # no generated rows: no grids


def test_the_vae_ceiling_is_the_model_dirs_own_round_trip(model_dir):
    from diffusers import AutoencoderKL

    from moviepostproduction.model_dir import as_model_dir

    md = as_model_dir(model_dir)
    scenes = np.stack([generate_scene(i, 0, ToyWorldConfig(size=32, ref_size=32)).image for i in range(3)])
    out = vae_round_trip(md, scenes)
    assert out.shape == scenes.shape and out.dtype == np.uint8
    vae = AutoencoderKL.from_pretrained(md.path("vae"), local_files_only=True).eval()
    with torch.no_grad():
        x = torch.from_numpy(scenes[1:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    expected = ((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()[0]
    assert np.abs(out[1].astype(int) - expected.astype(int)).max() <= 1  # one scene alone vs in a batch of three


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "model,bogus"], "error: --variants: expected some of model, no-patches"),
        (["--input", "photo"], "error: --input: expected one of sprite, scene (got 'photo')"),
        (["--text-scales", "1,x"], "error: --text-scales: expected 1 to 8 finite numbers"),
        (["--caption", "none"], "error: --variants: needs a caption (--caption sprite or scene) (got 'text-only')"),
        (["--n", "0"], "error: --n: must be an integer in [1, 10000] (got 0)"),
    ],
)
def test_cli_bad_options_are_one_line_and_exit_2_before_loading(tmp_path, extra, message):
    missing = tmp_path / "no-such-model"  # nothing loads: the options are refused first
    result = CliRunner().invoke(app, ["eval-vary", "--model", str(missing), "--device", "cpu", *extra])
    assert result.exit_code == 2 and result.output.startswith(message), result.output
    assert len(result.output.strip().splitlines()) == 1
