"""`mpp init-adapter`: a stock FLUX folder gets an `adapter/` sized from its own configs, and then composes exactly
as stock FLUX would (every new branch starts at zero) until trained (issue 41: nothing made `adapter/` before)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import example_scene


@pytest.fixture
def stock(tmp_path_factory):
    """A tiny FLUX folder as a user has it: no adapter/."""
    root = tmp_path_factory.mktemp("stock") / "flux"
    shutil.copytree(tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny"), root)
    shutil.rmtree(root / "adapter")
    return root


def init(stock, *more: str):
    return CliRunner().invoke(app, ["init-adapter", "--model", str(stock), "-o", str(stock / "adapter"), *more])


def test_init_adapter_sizes_it_from_the_folder_and_compose_then_runs(stock):
    result = init(stock)
    assert result.exit_code == 0 and result.output.startswith(f"wrote {stock / 'adapter'}"), result.output
    cfg = json.loads((stock / "adapter" / "config.json").read_text())
    tr = json.loads((stock / "transformer" / "config.json").read_text())
    assert cfg["hidden_dim"] == tr["num_attention_heads"] * tr["attention_head_dim"]
    assert (cfg["num_double_blocks"], cfg["num_single_blocks"]) == (tr["num_layers"], tr["num_single_layers"])
    assert cfg["clip_dim"] == json.loads((stock / "image_encoders/clip/config.json").read_text())["projection_dim"]
    assert cfg["dino_dim"] == json.loads((stock / "image_encoders/dino/config.json").read_text())["hidden_size"]
    pipe = ComposePipeline.from_model_dir(stock)
    square = ("refs/blue_square.png", (0.25, 0.25, 0.75, 0.75), "fg", "a blue square")
    with_refs = pipe(example_scene("a blue square", (64, 64), [square]), num_inference_steps=2, output_type="latent")
    plain = pipe(example_scene("a blue square", (64, 64), []), num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(with_refs.images[0], plain.images[0], rtol=0, atol=1e-6)  # untrained: stock FLUX


def test_init_adapter_keeps_an_existing_adapter_unless_told(stock, tmp_path):
    assert init(stock).exit_code == 0
    before = (stock / "adapter" / "model.safetensors").read_bytes()
    again = init(stock, "--seed", "3")
    assert again.exit_code == 2 and again.output.strip().splitlines() == [
        f"error: {stock / 'adapter'} exists; pass --overwrite to replace it with a fresh, untrained adapter"
    ]
    assert (stock / "adapter" / "model.safetensors").read_bytes() == before
    replaced = init(stock, "--seed", "3", "--overwrite")
    assert replaced.exit_code == 0 and (stock / "adapter" / "model.safetensors").read_bytes() != before
    assert [p.name for p in stock.iterdir() if p.name.startswith(".")] == []  # no staging folder left


def test_init_adapter_names_a_bad_config_in_one_line(stock):
    path = stock / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attention_head_dim": "x"}))
    result = init(stock)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "attention_head_dim" in lines[0], result.output
    assert not (stock / "adapter").exists()
