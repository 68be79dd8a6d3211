"""`mpp eval-fill --refs` (toyworld/fill_refs_eval.py): the held-out draw (the ref's colour is never in the plate,
the plate is the fill eval's held-out scene), the scorer on known answers (the ref painted at its box scores 1, the
plate itself 0, the outside of the mask is checked), the variants as the pipelines they claim to be (refs reach the
fill only through the adapter), and the command's files and one-line errors."""

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
from moviepostproduction.fill.inputs import bbox_mask
from moviepostproduction.toyworld.fill_eval import run_fill_eval, untrained_pipeline
from moviepostproduction.toyworld.fill_refs_eval import (
    DONOR_START,
    REFS_VARIANTS,
    RefsScore,
    build_refs_variants,
    generate,
    heldout_insertions,
    pasted,
    score_insertion,
)
from moviepostproduction.toyworld.sprites import COLOURS
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.toy_model import tiny_random_fill_dir
from moviepostproduction.toyworld.triptych import TriptychConfig, make_triptych

WORLD = ToyWorldConfig(size=128, ref_size=64, max_refs=3)  # the eval's default world
TINY = ToyWorldConfig(size=32, ref_size=16, max_refs=3)


@pytest.fixture(scope="module")
def fill_dir(tmp_path_factory) -> Path:
    return tiny_random_fill_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return heldout_insertions(40, WORLD, tmp_path_factory.mktemp("refs"))


# ------------------------------------------------------------------------------------------------ draw
def test_the_held_out_draw_never_puts_the_refs_colour_in_the_plate(items, tmp_path):
    donors = [it.donor.index for it in items]
    assert len(set(donors)) == len(items) and min(donors) >= DONOR_START  # a ref of its own per plate, never a plate
    for it in items:
        assert it.ref.colour not in {r.colour for r in it.plate.refs}, it.index
        assert it.ref.depth == "fg" and it.ref.visible == 1.0  # the donor's front sprite, nothing in front of it
        (ref,) = it.scene.refs
        assert ref.bbox == pytest.approx(it.ref.bbox) and ref.caption in it.scene.caption
        assert it.mask[it.ref.mask].all() and np.array_equal(it.mask, bbox_mask(it.scene, (128, 128)))
    for it in items[:3]:  # the plates are the fill eval's held-out scenes (the targets of its triptychs)
        assert np.array_equal(
            it.plate.image, make_triptych(it.index, 0, TriptychConfig(world=WORLD), split="heldout").target
        )
    later = heldout_insertions(2, WORLD, tmp_path, start=5)  # a plate's insertion does not depend on n or start
    assert [(it.index, it.donor.index) for it in later] == [(it.index, it.donor.index) for it in items[5:7]]
    assert items[0].scene.caption == "an orange dotted circle on a desert background"


# ------------------------------------------------------------------------------------------------ scorer
def test_the_ref_painted_at_its_box_scores_one_and_the_plate_itself_zero(items):
    ious = []
    for it in items[:10]:
        painted = it.plate.image.copy()
        painted[it.ref.mask] = COLOURS[it.ref.colour]  # the sprite's silhouette in its colour, exactly at its box
        got = score_insertion(painted, it, WORLD)
        assert got["IoU"] >= 0.98 and got["placed"] and got["identity"] and got["known error"] == 0, got
        ious.append(got["IoU"])
        plate = score_insertion(it.plate.image, it, WORLD)
        assert plate["IoU"] == 0.0 and not plate["placed"] and not plate["identity"] and not plate["colour kept"]
        assert plate["known error"] == 0
        ceiling = score_insertion(pasted(it), it, WORLD)  # the donor's own pixels: anti-aliased edges lower IoU a bit
        assert ceiling["IoU"] >= 0.9 and ceiling["identity"] and ceiling["known error"] == 0, ceiling
        outside = painted.copy()
        outside[~it.mask] = 255 - outside[~it.mask]
        assert score_insertion(outside, it, WORLD)["known error"] > 0  # the outside of the mask is checked
    # exactly 1 but on plate 8, where a plate sprite's anti-aliased edge pixel below the ring reads as its colour
    assert ious == [1.0] * 8 + [0.9831, 1.0]


def test_rows_pool_the_refs_and_nothing_to_judge_is_nan():
    a = {"IoU": 1.0, "placed": True, "centre error": 0.0, "identity": True, "colour kept": True, "shape kept": True,
         "known error": 0}  # fmt: skip
    b = {**a, "IoU": 0.0, "placed": False, "centre error": math.nan, "identity": False, "shape kept": False}
    row = RefsScore("x", [a, b, {**a, "IoU": 0.5, "placed": False, "centre error": 0.25}]).row()
    assert row["IoU"] == 0.5 and row["placed (IoU >= 0.6)"] == 1 / 3 and row["centre error"] == 0.125
    assert row["identity"] == 2 / 3 and row["colour"] == 1.0 and row["shape"] == 2 / 3 and row["refs"] == 3
    assert math.isnan(RefsScore("empty").row()["IoU"])


# ------------------------------------------------------------------------------------------------ variants
def test_refs_reach_the_fill_only_through_the_adapter(fill_dir, tmp_path):
    variants = {v.name: v for v in build_refs_variants(fill_dir, list(REFS_VARIANTS), untrained_pipeline)}
    model, untrained = variants["model"].pipe, variants["untrained"].pipe
    assert variants["caption-only"].pipe is model and not variants["caption-only"].use_refs
    assert variants["pasted"].pipe is None and untrained.model.transformer is not model.model.transformer
    assert untrained.model.adapter is model.model.adapter and untrained.image_encoder is model.image_encoder
    item = heldout_insertions(1, TINY, tmp_path)[0]

    def fills():
        return {name: generate(v, item, steps=2, seed=3) for name, v in variants.items()}

    at_init = fills()  # the tiny dir's adapter adds nothing at init: the refs variant is the caption-only one
    assert np.array_equal(at_init["model"], at_init["caption-only"])
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.model.adapter.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    opened = fills()
    assert not np.array_equal(opened["model"], opened["caption-only"])  # now the ref reaches the fill
    assert np.array_equal(opened["caption-only"], at_init["caption-only"])  # and without refs nothing changed
    for name, image in opened.items():
        assert np.array_equal(image[~item.mask], item.plate.image[~item.mask]), name  # paste-back


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_the_table_json_csv_and_grid(fill_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval-fill", "--refs", "--model", str(fill_dir), "--n", "2", "--steps", "1", "--size", "32",
            "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "held-out plates 0-1 (split heldout, toy-world seed 0, 32 px" in result.output
    report = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in report["rows"]] == list(REFS_VARIANTS) and report["refs"] and report["size"] == 32
    assert all(r["known-region error"] == 0 for r in report["rows"]) and report["ref_guidance"] == 1.0
    assert [i["plate"] for i in report["insertions"]] == [0, 1]
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(REFS_VARIANTS) and {r["model"] for r in rows} == set(REFS_VARIANTS)
    assert "| model | IoU | placed (IoU >= 0.6) |" in (out / "eval.md").read_text()
    assert Image.open(out / "grid.png").size == (3 * 32 * 2, 2 * len(REFS_VARIANTS) * 32 * 2)


def test_the_pasted_ceiling_alone_loads_no_model(tmp_path):
    lines = run_fill_eval(model=None, n=3, refs=True, variants="pasted", progress=False)
    assert "model none (pasted only)" in lines[0] and lines[1].splitlines()[2].startswith("| pasted | 0.9")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--variants", "model,no-map"], "--variants: expected some of model, caption-only, untrained, pasted"),
        (["--modes", "box"], "--modes: is not used with --refs (the mask is the ref's box)"),
        (["--n", "0"], "--n: must be an integer in [1, 100000]"),
        (["--steps", "0"], "--steps: must be an integer in [1,"),
    ],
)
def test_cli_bad_options_are_one_line_and_exit_2(extra, expected, fill_dir):
    result = CliRunner().invoke(app, ["eval-fill", "--refs", "--model", str(fill_dir), "--n", "1", *extra])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
