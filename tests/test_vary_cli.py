"""`mpp vary` and `VaryPipeline.from_model_dir`: NanoDiT read from DIR/nanodit/, encoders and VAE from DIR."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import MppError, WeightsError
from moviepostproduction.vary.nanodit import NanoDiT, VaryConditioning
from moviepostproduction.vary.nanodit_io import load_nanodit_dir, save_nanodit_dir
from moviepostproduction.vary.pipeline import VaryPipeline, guided_velocity

from helpers import TINY_DIR_NANODIT, randomize_zero_inits, tiny_dir_with_nanodit

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_dir_with_nanodit(tmp_path_factory.mktemp("model") / "tiny")


def vary(model_dir: Path, out: Path, *extra: str) -> object:
    ref = EXAMPLES / "refs" / "red_circle.png"
    args = ["vary", "--ref", str(ref), "-o", str(out), "--model", str(model_dir), "--steps", "2", *extra]
    return CliRunner().invoke(app, args)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_nanodit_dir_round_trips_config_and_weights(model_dir):
    loaded = load_nanodit_dir(model_dir / "nanodit")
    assert loaded.config == TINY_DIR_NANODIT and not loaded.training
    assert json.loads((model_dir / "nanodit" / "config.json").read_text())["dino_patches"] == 16
    torch.manual_seed(0)
    fresh = NanoDiT(TINY_DIR_NANODIT)
    randomize_zero_inits(fresh, std=0.2)
    expected = fresh.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())


def test_cli_vary_writes_a_seeded_variation_of_the_model_size(model_dir, tmp_path):
    runs = {name: tmp_path / f"{name}.png" for name in ("a", "again", "seed1", "no_caption", "unit_scales")}
    for name, extra in {
        "a": ["--caption", "a red circle", "--seed", "0"],
        "again": ["--caption", "a red circle", "--seed", "0"],
        "seed1": ["--caption", "a red circle", "--seed", "1"],
        "no_caption": ["--seed", "0"],
        "unit_scales": ["--caption", "a red circle", "--seed", "0", "--text-scale", "1", "--image-scale", "1"],
    }.items():
        result = vary(model_dir, runs[name], *extra)
        assert result.exit_code == 0, result.output
        assert f"wrote {runs[name]} (32x32)" in result.output  # sample_size 4 latents x VAE 8x
    image = Image.open(runs["a"])
    assert image.text["mpp:caption"] == "a red circle" and image.text["mpp:reference"].endswith("red_circle.png")
    a = pixels(runs["a"])
    assert np.array_equal(a, pixels(runs["again"]))
    for other in ("seed1", "no_caption", "unit_scales"):
        assert not np.array_equal(a, pixels(runs[other])), other


def test_cli_vary_missing_nanodit_names_the_path(model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("nanodit"))
    result = vary(bare, tmp_path / "out.png")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert str(bare / "nanodit" / "config.json") in lines[0] and "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "ref, message",
    [("missing.png", "--ref: no such file"), ("garbage.png", "--ref: cannot be read as an image")],
)
def test_cli_vary_bad_reference_exits_2_before_loading_weights(tmp_path, ref, message):
    (tmp_path / "garbage.png").write_text("not a png")
    args = ["vary", "--ref", str(tmp_path / ref), "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "none")]
    result = CliRunner().invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_nanodit_sizes_must_match_the_model_dir_encoders(model_dir, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(model_dir, odd, ignore=shutil.ignore_patterns("nanodit"))
    save_nanodit_dir(NanoDiT(TINY_DIR_NANODIT.with_(dino_dim=24)), odd / "nanodit")
    with pytest.raises(MppError, match=r"nanodit/config.json: dino_dim: does not match the model dir's DINO width"):
        VaryPipeline.from_model_dir(odd)
    (odd / "nanodit" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="missing .*nanodit/model.safetensors"):
        VaryPipeline.from_model_dir(odd)


def test_one_condition_guidance_and_text_only_sampling(model_dir):
    pipe = VaryPipeline.from_model_dir(model_dir)
    inputs = pipe.encode([Image.open(EXAMPLES / "refs" / "red_circle.png")], ["a red circle"])
    model, x, t = pipe.model, torch.randn(1, 16, 4, 4), torch.full((1,), 0.5)
    cond = VaryConditioning(inputs["text_embeds"], inputs["text_mask"], inputs["image_cls"], inputs["image_patches"])
    drop, keep = torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool)

    def v(drop_text, drop_image):
        args = dict(text=cond.text, text_mask=cond.text_mask, cls=cond.cls, patches=cond.patches)
        return model(x, t, **args, drop_text=drop_text, drop_image=drop_image)

    with torch.no_grad():
        u, txt, img = v(drop, drop), v(keep, drop), v(drop, keep)
        text_guided = guided_velocity(model, cond, 3.0, 9.9, use_image=False)(x, t)
        image_guided = guided_velocity(model, cond, 9.9, 2.0, use_text=False)(x, t)
    assert torch.allclose(text_guided, u + 3.0 * (txt - u), atol=1e-5)
    assert torch.allclose(image_guided, u + 2.0 * (img - u), atol=1e-5)
    words = pipe(text_embeds=inputs["text_embeds"], text_mask=inputs["text_mask"], image_cls=None,
                 image_patches=None, num_inference_steps=2, seed=0).images  # fmt: skip
    both = pipe(**inputs, num_inference_steps=2, seed=0).images
    assert words.shape == both.shape == (1, 16, 4, 4) and not torch.allclose(words, both)
    with pytest.raises(MppError, match="text_embeds: give a caption"):
        pipe(text_embeds=None, image_cls=None, image_patches=None, num_inference_steps=1, seed=0)
