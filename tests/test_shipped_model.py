"""The embedded default model: shipped in the package, trained (not random), used by `mpp compose` by default."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.modules.occlusion import occlusion_priority
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import WeightsError
from moviepostproduction.model_dir import SHIPPED_MODEL_DIR, ModelDir, default_model_dir
from moviepostproduction.toyworld.compose_eval import VariantScore, evaluate, heldout_scenes
from moviepostproduction.toyworld.synthetic import ToyWorldConfig

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples"


def test_default_model_is_the_shipped_toy_model_and_small():
    md = ModelDir.at(default_model_dir())
    assert md.root == SHIPPED_MODEL_DIR
    md.check()
    assert not md.tiny_random and md.index["toy_world"] and md.index["max_text_tokens"] == 64
    assert md.index["trained_steps"] == 155000  # the dense model of issue 44: 149000 steps at 128 px + 6000 mixed
    assert md.index["toy_world_data"]["config"]["size"] == 128  # `mpp eval` scores the 1-3-ref world by default
    size = sum(f.stat().st_size for f in md.root.rglob("*") if f.is_file())
    assert size < 20 * 2**20  # "a few MB"


def test_missing_shipped_model_is_a_one_line_error_naming_the_path(monkeypatch, tmp_path):
    import moviepostproduction.model_dir as model_dir

    monkeypatch.setattr(model_dir, "SHIPPED_MODEL_DIR", tmp_path / "gone")
    with pytest.raises(WeightsError, match=r"shipped toy model is missing: .*gone/model_index.json"):
        model_dir.default_model_dir()


@pytest.fixture(scope="module")
def pipe():
    return ComposePipeline.from_model_dir(default_model_dir())


def test_shipped_model_names_the_sampling_defaults_of_the_readme_table(pipe):
    defaults = pipe.defaults  # docs/toy-model.md, picked on val scenes
    assert (defaults.ref_guidance_scale, defaults.noise_temperature, defaults.grounding_ratio) == (2.0, 0.8, 0.6)
    cfg = pipe.model.adapter.cfg  # the fg ref owns overlaps (weight e^3 against 1), layout over 60 % of the steps
    # 3.00048828125: a logit of 0.3 stored in fp16, times 10, while the priority was a Parameter (before issue 39)
    assert cfg.depth_priority == (3.00048828125, 0.0, 0.0) and cfg.grounding_ratio == 0.6
    assert cfg.order_priority == 3.0  # within a label the earlier ref owns an overlap, e^3 per place
    every = torch.ones(1, 3, dtype=torch.bool)
    for depth in ([[0, 1, 2]], [[0, 0, 1]]):  # fg, mg, bg; two fg refs and an mg one
        w = occlusion_priority(torch.tensor(depth), every, cfg.depth_priority, cfg.order_priority)
        torch.testing.assert_close(w / w[0, 0], torch.tensor([[1.0, math.exp(-3), math.exp(-3)]]), rtol=2e-3, atol=0)


def test_shipped_weights_are_trained_far_above_the_untrained_model(pipe, tmp_path):
    world = json.loads((SHIPPED_MODEL_DIR / "model_index.json").read_text())["toy_world_data"]
    scenes = heldout_scenes(6, int(world["seed"]), ToyWorldConfig.from_dict(world["config"]), tmp_path)
    scores, _ = evaluate(pipe, scenes, ("model", "untrained"), steps=12, leak_scenes=0, progress=False)
    trained, untrained = scores["model"].row(), scores["untrained"].row()
    assert isinstance(scores["model"], VariantScore)
    assert untrained["IoU"] < 0.1
    assert trained["IoU"] > untrained["IoU"] + 0.15


def test_mpp_compose_runs_the_example_on_the_shipped_model_by_default(tmp_path):
    out = tmp_path / "shot.png"
    result = CliRunner().invoke(
        app, ["compose", str(EXAMPLES / "scene.json"), "-o", str(out), "--overlay", "--steps", "8"]
    )
    assert result.exit_code == 0, result.output
    image = np.asarray(Image.open(out))
    assert image.shape == (128, 128, 3) and image.std() > 5  # a picture, not a flat fill
    assert (tmp_path / "shot.layout.png").is_file()
    assert "toy-world" in Image.open(out).text["mpp:model"] or "mpp train" in Image.open(out).text["mpp:model"]


def test_mpp_vary_runs_on_the_shipped_nanodit_by_default(tmp_path):
    info = json.loads((SHIPPED_MODEL_DIR / "nanodit" / "info.json").read_text())
    assert "steps" in info["label"] and info["validation"]["reconstruction_mse"] < 0.1
    out = tmp_path / "vary.png"
    args = ["vary", "--ref", str(EXAMPLES / "refs" / "red_circle.png"), "--caption", "a red striped circle"]
    result = CliRunner().invoke(app, [*args, "-o", str(out), "--steps", "8"])
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
