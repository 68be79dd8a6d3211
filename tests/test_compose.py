"""ComposePipeline and `mpp compose` end to end on tiny random models written in the real on-disk layout."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import MppError, ValidationError, WeightsError
from moviepostproduction.noise import draw_packed, seeded_generator
from moviepostproduction.scene import load_scene
from moviepostproduction.toyworld.tiny import write_tiny_model_dir

from helpers import copy_with_index

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(model_dir) -> ComposePipeline:
    return ComposePipeline.from_model_dir(model_dir)


def write_scene(folder: Path, width: int = 64, height: int = 48, refs=None, **extra) -> Path:
    shutil.copytree(EXAMPLES / "refs", folder / "refs", dirs_exist_ok=True)
    refs = refs or [
        {"image": "refs/red_circle.png", "bbox": [0.1, 0.2, 0.5, 0.9], "depth": "fg", "caption": "a red circle"},
        {"image": "refs/blue_square.png", "bbox": [0.5, 0.1, 0.9, 0.5], "depth": "bg"},
    ]
    data = {"caption": "a red circle and a blue square", "width": width, "height": height, "seed": 3, "refs": refs}
    path = folder / "scene.json"
    path.write_text(json.dumps({**data, **extra}))
    return path


def test_output_size_equals_scene_size_and_alphas_per_ref(pipe, tmp_path):
    scene = load_scene(write_scene(tmp_path))
    out = pipe(scene, num_inference_steps=2)
    assert out.images[0].size == (64, 48)
    assert len(out.alphas) == 1 and out.alphas[0] == [0.5, 0.5]  # untrained alpha predictor
    assert out.label.startswith("tiny-random")


def test_same_seed_same_image_and_different_seed_differs(pipe, tmp_path):
    scene = load_scene(write_scene(tmp_path))
    a = pipe(scene, num_inference_steps=2, output_type="pt", seed=1).images
    b = pipe(scene, num_inference_steps=2, output_type="pt", seed=1).images
    c = pipe(scene, num_inference_steps=2, output_type="pt", seed=2).images
    assert a.shape == (1, 3, 48, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_storyboard_encodes_each_shared_reference_once(model_dir, tmp_path):
    pipe = ComposePipeline.from_model_dir(model_dir)
    first = load_scene(write_scene(tmp_path / "a"))
    refs = [{"image": "refs/red_circle.png", "bbox": [0.5, 0.5, 0.9, 0.9], "depth": "fg"}]
    second = load_scene(write_scene(tmp_path / "a", refs=refs, caption="the red circle again"))
    encoded = []
    original = pipe.image_encoder.encode
    pipe.image_encoder.encode = lambda images: encoded.append(len(images)) or original(images)
    out = pipe([first, second], num_inference_steps=1)
    assert len(out.images) == 2 and [len(a) for a in out.alphas] == [2, 1]
    assert encoded == [2]  # the red circle of scene 2 came from the cache


def test_conditioning_is_prepared_once_for_all_steps(model_dir, tmp_path):
    pipe = ComposePipeline.from_model_dir(model_dir)
    scene = load_scene(write_scene(tmp_path))
    calls, steps = [], []
    pipe.model.adapter.instance_encoder.register_forward_hook(lambda *a: calls.append(1))
    pipe(scene, num_inference_steps=5, callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    assert steps == [0, 1, 2, 3, 4]
    assert len(calls) == 1


def test_true_cfg_runs_a_negative_branch_and_img2img_skips_early_steps(model_dir, tmp_path):
    pipe = ComposePipeline.from_model_dir(model_dir)
    scene = load_scene(write_scene(tmp_path))
    forwards = []
    pipe.model.transformer.x_embedder.register_forward_hook(lambda *a: forwards.append(1))
    pipe(scene, num_inference_steps=3, true_cfg_scale=2.0, negative_prompt="blurry")
    assert len(forwards) == 6
    forwards.clear()
    steps = []
    init = Image.new("RGB", (64, 48), (200, 30, 30))
    pipe(
        scene,
        num_inference_steps=4,
        image=init,
        strength=0.5,
        callback_on_step_end=lambda p, i, t, kw: steps.append(t) or {},
    )
    assert 0 < len(steps) < 4 and len(forwards) == len(steps)


def test_non_finite_latents_are_rejected(pipe, tmp_path):
    scene = load_scene(write_scene(tmp_path))
    bad = torch.full((1, 12, 64), float("nan"))
    with pytest.raises(MppError, match="latents"):
        pipe(scene, num_inference_steps=1, latents=bad)


def test_missing_adapter_names_the_path(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(WeightsError, match=str(broken / "adapter" / "config.json")):
        ComposePipeline.from_model_dir(broken)


def test_cli_compose_writes_image_and_layout_overlay(model_dir, tmp_path):
    scene = write_scene(tmp_path)
    out = tmp_path / "out" / "shot.png"
    result = CliRunner().invoke(
        app, ["compose", str(scene), "-o", str(out), "--model", str(model_dir), "--steps", "2", "--overlay"]
    )
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (64, 48)
    layout = out.with_suffix(".layout.png")
    assert Image.open(layout).size == (64, 48)
    assert "ref 0 fg alpha 0.500" in result.output


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"refs": [{"image": "refs/red_circle.png", "bbox": [0.5, 0.1, 0.2, 0.9], "depth": "fg"}]}, "refs[0].bbox"),
        ({"refs": [{"image": "refs/nope.png", "bbox": [0.1, 0.1, 0.2, 0.9], "depth": "fg"}]}, "refs[0].image"),
        ({"refs": [{"image": "refs/red_circle.png", "bbox": [0.1, 0.1, 0.2, 0.9], "depth": "top"}]}, "refs[0].depth"),
    ],
)
def test_cli_compose_bad_scene_exits_2_before_loading_weights(tmp_path, patch, field):
    scene = write_scene(tmp_path, **patch)
    out = tmp_path / "out.png"
    result = CliRunner().invoke(app, ["compose", str(scene), "-o", str(out), "--model", str(tmp_path / "no-model")])
    assert result.exit_code == 2
    assert field in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_cli_compose_missing_model_dir_exits_2(tmp_path):
    scene = write_scene(tmp_path)
    result = CliRunner().invoke(
        app, ["compose", str(scene), "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "x")]
    )
    assert result.exit_code == 2
    assert str(tmp_path / "x") in result.output and "Traceback" not in result.output


def test_ref_guidance_extrapolates_from_the_caption_alone(model_dir, tmp_path):
    """v = v_caption + s (v_scene - v_caption): one more forward per step, without any conditioning."""
    pipe = ComposePipeline.from_model_dir(model_dir)
    assert pipe.defaults.ref_guidance_scale == 1.0  # no ref_guidance_scale in this model_index.json: off
    scene = load_scene(write_scene(tmp_path))
    prepared = pipe.prepare(scene)
    x, t = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7])
    seen = []
    original = pipe.model.forward
    pipe.model.forward = lambda *a, conditioning=None, **k: seen.append(conditioning) or original(
        *a, conditioning=conditioning, **k
    )
    scene_v = pipe.velocity_fn(prepared, 3.5, 1.0, 0)(x, t)
    guided = pipe.velocity_fn(prepared, 3.5, 1.0, 0, ref_guidance_scale=2.5)(x, t)
    pipe.model.forward = original
    assert seen[0] is prepared.conditioning and seen[1] is prepared.conditioning and seen[2] is None
    caption_v = pipe.velocity_fn(replace(prepared, conditioning=None), 3.5, 1.0, 0)(x, t)
    torch.testing.assert_close(guided, caption_v + 2.5 * (scene_v - caption_v), rtol=0, atol=1e-5)
    out = pipe(scene, num_inference_steps=2, output_type="pt", ref_guidance_scale=1.0).images
    assert torch.equal(out, pipe(scene, num_inference_steps=2, output_type="pt").images)  # 1 is exactly off
    with pytest.raises(ValidationError, match=r"^ref_guidance_scale: must be a finite number >= 0 \(got nan\)$"):
        pipe(scene, num_inference_steps=1, ref_guidance_scale=float("nan"))


def test_a_model_dir_with_interpolated_image_positions_is_refused(model_dir, tmp_path):
    """The image tokens' RoPE ids are FLUX's (`image_position_scale` was a removed experiment): 1.0 loads as before,
    anything else is a one-line error naming the key."""
    assert ComposePipeline.from_model_dir(copy_with_index(model_dir, tmp_path / "flux", image_position_scale=1.0))
    for value in (0.5, "half"):
        scaled = copy_with_index(model_dir, tmp_path / f"scaled-{value}", image_position_scale=value)
        with pytest.raises(WeightsError, match=rf"image_position_scale {value!r} is not supported \(removed; "):
            ComposePipeline.from_model_dir(scaled)


def test_noise_temperature_scales_the_starting_noise_and_the_model_dir_names_its_default(model_dir, tmp_path):
    """The starting noise, drawn or given, is multiplied by the temperature; 1 (no model_index.json entry) leaves
    it as is; a model dir may name its own default."""
    pipe = ComposePipeline.from_model_dir(model_dir)
    assert pipe.defaults.noise_temperature == 1.0
    scene = load_scene(write_scene(tmp_path))
    h, w = scene.height // 16, scene.width // 16
    noise = draw_packed(1, pipe.vae.latent_channels, (2 * h, 2 * w), seeded_generator(scene.seed))

    def latents(**kwargs) -> torch.Tensor:
        return pipe(scene, num_inference_steps=2, output_type="latent", **kwargs).images[0]

    drawn = latents()
    assert torch.equal(drawn, latents(latents=noise)) and torch.equal(drawn, latents(noise_temperature=1.0))
    cool = latents(noise_temperature=0.6)
    assert torch.equal(cool, latents(latents=noise * 0.6)) and not torch.equal(cool, drawn)
    assert torch.equal(cool, latents(latents=noise, noise_temperature=0.6))  # given latents are scaled too
    tuned = ComposePipeline.from_model_dir(copy_with_index(model_dir, tmp_path / "cool", noise_temperature=0.6))
    assert tuned.defaults.noise_temperature == 0.6
    tuned_out = tuned(scene, num_inference_steps=2, output_type="latent").images[0]
    assert torch.equal(tuned_out, cool)
    assert torch.equal(
        tuned(scene, num_inference_steps=2, output_type="latent", noise_temperature=1.0).images[0], drawn
    )
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValidationError, match=rf"^noise_temperature: must be a positive number \(got {bad}\)$"):
            pipe(scene, num_inference_steps=1, noise_temperature=bad)
    broken = copy_with_index(model_dir, tmp_path / "broken", noise_temperature=0)
    with pytest.raises(WeightsError, match=r"model_index.json noise_temperature must be a positive number \(got 0\)$"):
        ComposePipeline.from_model_dir(broken)
    result = CliRunner().invoke(
        app, ["compose", str(write_scene(tmp_path)), "-o", str(tmp_path / "o.png"), "--model", str(model_dir),
              "--steps", "1", "--noise-temperature", "-2"]
    )  # fmt: skip
    assert result.exit_code == 2 and "--noise-temperature: must be a positive number (got -2.0)" in result.output
    assert "Traceback" not in result.output


def test_model_dir_names_its_default_ref_guidance(model_dir, tmp_path):
    tuned = copy_with_index(model_dir, tmp_path / "tuned", ref_guidance_scale=2.5)
    pipe = ComposePipeline.from_model_dir(tuned)
    assert pipe.defaults.ref_guidance_scale == 2.5
    scene = load_scene(write_scene(tmp_path))
    forwards = []
    pipe.model.transformer.x_embedder.register_forward_hook(lambda *a: forwards.append(1))
    default = pipe(scene, num_inference_steps=2, output_type="pt").images
    assert len(forwards) == 4  # two forwards per step: guided by default
    assert torch.equal(default, pipe(scene, num_inference_steps=2, output_type="pt", ref_guidance_scale=2.5).images)
    result = CliRunner().invoke(
        app, ["compose", str(write_scene(tmp_path)), "-o", str(tmp_path / "o.png"), "--model", str(tuned),
              "--steps", "1", "--ref-guidance", "1"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
