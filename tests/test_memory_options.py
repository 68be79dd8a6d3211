"""The memory switches as users reach them (issue 41 item 4): `from_pretrained(..., quantize=, offload=,
vae_tiling=)`, diffusers' `enable_model_cpu_offload` / `enable_vae_tiling` methods, and `--quantize`, `--offload`,
`--vae-tiling` in the CLI. The hooks themselves are tested in tests/test_memory.py."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import ValidationError
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import example_scene

SQUARE = ("refs/blue_square.png", (0.25, 0.25, 0.75, 0.75), "fg", "a blue square")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny")


def latents(pipe: ComposePipeline) -> torch.Tensor:
    scene = example_scene("a blue square", (64, 64), [SQUARE])
    return pipe(scene, num_inference_steps=2, seed=3, output_type="latent").images[0]


def test_model_offload_keyword_and_method_give_the_same_latents_and_release_after_the_call(tiny):
    plain = latents(ComposePipeline.from_pretrained(tiny))
    offloaded = ComposePipeline.from_pretrained(tiny, offload="model", device="cpu")
    assert offloaded._offload is not None and offloaded._offload.mode == "model"
    torch.testing.assert_close(latents(offloaded), plain, rtol=0, atol=0)
    assert offloaded._offload.resident() == []  # maybe_free_model_hooks ran at the end of __call__
    by_method = ComposePipeline.from_pretrained(tiny)
    by_method.enable_sequential_cpu_offload("cpu")
    torch.testing.assert_close(latents(by_method), plain, rtol=0, atol=1e-5)


def test_int8_weights_with_refs_stay_close_to_fp32(tiny):
    pytest.importorskip("torchao")
    plain = latents(ComposePipeline.from_pretrained(tiny))
    int8 = ComposePipeline.from_pretrained(tiny, quantize="int8")
    got = latents(int8)
    assert torch.isfinite(got).all()
    assert ((got - plain).norm() / plain.norm()).item() < 0.05


def test_vae_tiling_leaves_images_below_the_tile_size_unchanged(tiny):
    pipe = ComposePipeline.from_pretrained(tiny)
    scene = example_scene("a blue square", (64, 64), [SQUARE])
    before = pipe(scene, num_inference_steps=2, seed=1, output_type="pt").images
    pipe.enable_vae_tiling()
    assert pipe.vae.model.use_tiling
    torch.testing.assert_close(pipe(scene, num_inference_steps=2, seed=1, output_type="pt").images, before)


def test_bad_keywords_are_one_line(tiny):
    with pytest.raises(ValidationError) as err:
        ComposePipeline.from_pretrained(tiny, offload="disk")
    assert str(err.value) == "offload: must be one of model, sequential (got 'disk')"


@pytest.fixture
def scene(tmp_path):
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    ref = {"image": "blue.png", "bbox": [0.25, 0.25, 0.75, 0.75], "depth": "fg"}
    path = tmp_path / "scene.json"
    path.write_text(json.dumps({"caption": "a blue square", "width": 64, "height": 64, "refs": [ref], "seed": 2}))
    return path


def test_cli_offload_writes_the_same_png(tiny, scene, tmp_path):
    args = ["compose", str(scene), "--model", str(tiny), "--steps", "2"]
    assert CliRunner().invoke(app, [*args, "-o", str(tmp_path / "a.png")]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "b.png"), "--offload", "model", "--vae-tiling"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--offload", "disk"], "error: --offload: must be one of model, sequential (got 'disk')"),
        (["--quantize", "int4"], "error: --quantize: must be one of nf4, int8, fp8 (got 'int4')"),
    ],
)
def test_cli_bad_memory_flags_are_one_line_before_loading(tiny, scene, tmp_path, flags, line):
    result = CliRunner().invoke(
        app, ["compose", str(scene), "--model", str(tiny), "-o", str(tmp_path / "o.png"), *flags]
    )
    assert result.exit_code == 2 and result.output.strip() == line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_nf4_on_the_cpu_says_what_to_use(tiny, scene, tmp_path):
    cmd = ["compose", str(scene), "--model", str(tiny), "-o", str(tmp_path / "o.png"), "--quantize", "nf4"]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 2 and result.output.startswith("error: --quantize: needs a CUDA device"), result.output
