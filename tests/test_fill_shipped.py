"""The shipped toy-world fill model (issue 43): the package holds only fill/ and model_index.json
(assets/toy-fill); `default_fill_model_dir` assembles them over the shipped toy model into the cache once, and it is
what `mpp fill` and the Python API use without a model dir."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import WeightsError
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.fill.weights import write_fill_model_dir
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.toyworld.toy_model import (
    SHIPPED_FILL_ASSETS,
    assemble_fill_model_dir,
    default_fill_model_dir,
)


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out |= load_file(file)
    return out


def test_assembly_gives_back_the_fill_dir_it_was_cut_from(tmp_path):
    base = tiny_random_model_dir(tmp_path / "cache")
    full = write_fill_model_dir(base, tmp_path / "full", layout="diptych", seed=3)
    assets = tmp_path / "assets"
    (assets / "fill").mkdir(parents=True)
    for file in (full / "fill").iterdir():
        (assets / "fill" / file.name).write_bytes(file.read_bytes())
    (assets / "model_index.json").write_bytes((full / "model_index.json").read_bytes())

    out = assemble_fill_model_dir(base, assets, tmp_path / "out")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        p.relative_to(full).as_posix() for p in full.rglob("*")
    )
    for file in (full / "fill").iterdir():
        assert (out / "fill" / file.name).read_bytes() == file.read_bytes()
    got, want = tensors(out / "transformer"), tensors(full / "transformer")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "transformer" / "config.json").read_text())["in_channels"] == 384


def test_assembly_over_a_newer_base_takes_the_fill_models_own_base_parts(tmp_path):
    """assets/base/ (the transformer and adapter the fill model was trained on) replace the base dir's before the
    widening: the dir assembled over another model has the fill export's transformer, adapter and fill/; the base's
    other folders (encoders, VAE) are the base's."""
    trained_on = tiny_random_model_dir(tmp_path / "a", seed=0)
    newer = tiny_random_model_dir(tmp_path / "b", seed=1)
    full = write_fill_model_dir(trained_on, tmp_path / "full", layout="diptych", seed=3)
    assets = tmp_path / "assets"
    shutil.copytree(full / "fill", assets / "fill")
    shutil.copy2(full / "model_index.json", assets / "model_index.json")
    for part in ("transformer", "adapter"):
        shutil.copytree(trained_on / part, assets / "base" / part)

    out = assemble_fill_model_dir(newer, assets, tmp_path / "out")
    for part in ("transformer", "adapter", "fill"):
        got, want = tensors(out / part), tensors(full / part)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), part
    got, want = tensors(out / "vae"), tensors(newer / "vae")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    theirs, ours = tensors(newer / "adapter"), tensors(trained_on / "adapter")
    assert any(not torch.equal(theirs[k], ours[k]) for k in ours)  # the base's adapter was another one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "assets", "b", "full", "out"]  # no work dir left


def test_default_fill_model_is_the_shipped_one_built_once(tmp_path):
    first = default_fill_model_dir(tmp_path)
    assert first.parent == tmp_path and first.name.startswith("toy-fill-")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert default_fill_model_dir(tmp_path) == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp  # not rebuilt
    shipped = json.loads((SHIPPED_FILL_ASSETS / "model_index.json").read_text())
    pipe = FillPipeline.from_model_dir(first, semantic=True)
    assert pipe.label == shipped["label"] and pipe.label.startswith("fill model")
    assert pipe.layout == "diptych" and pipe.model.semantic is not None
    assert float(pipe.model.semantic.gate) != 0.0  # trained, not the zero-gate init
    assert pipe.model.transformer.config.in_channels == 384


def test_shipped_fill_model_runs_on_the_backbone_it_was_trained_on(tmp_path):
    """The fill model was trained on the 149000-step toy model; the package now ships a later one (issue 44), so
    assets/toy-fill/base/ holds the old transformer and adapter and the assembled dir is built on them, not on the
    shipped toy model's (every transformer tensor but the widened x_embedder is base/'s)."""
    base = SHIPPED_FILL_ASSETS / "base"
    assert sorted(p.name for p in base.iterdir()) == ["adapter", "transformer"]
    fill = default_fill_model_dir(tmp_path)
    theirs, ours = tensors(base / "transformer"), tensors(fill / "transformer")
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours if not k.startswith("x_embedder."))
    theirs, ours = tensors(base / "adapter"), tensors(fill / "adapter")
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_a_missing_shipped_asset_is_one_line_naming_it(tmp_path):
    (tmp_path / "assets").mkdir()
    with pytest.raises(WeightsError) as err:
        default_fill_model_dir(tmp_path / "cache", assets=tmp_path / "assets")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "assets" / "model_index.json") in message
    assert not (tmp_path / "cache").exists()  # nothing built


def test_mpp_fill_without_model_uses_the_shipped_fill_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MPP_CACHE", str(tmp_path / "cache"))
    plate = np.full((64, 64, 3), 200, dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(plate).save(tmp_path / "plate.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    args = ["fill", "--image", str(tmp_path / "plate.png"), "--mask", str(tmp_path / "mask.png"), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--prompt", "a red circle", "--steps", "2"])
    assert result.exit_code == 0, result.output
    label = json.loads((SHIPPED_FILL_ASSETS / "model_index.json").read_text())["label"]
    assert f"[{label}]" in result.output and "noise" not in result.output
    got = np.asarray(Image.open(out))
    assert np.array_equal(got[mask == 0], plate[mask == 0])


def test_comfyui_fill_nodes_default_to_the_shipped_fill_model(tmp_path, monkeypatch):
    from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS

    monkeypatch.setenv("MPP_CACHE", str(tmp_path / "cache"))
    with torch.inference_mode():  # as ComfyUI runs nodes
        loader = NODE_CLASS_MAPPINGS["MPPLoadFillModel"]()
        (model,) = loader.load(model_dir="", device="cpu", dtype="fp32", refs=True)
        assert model.root == default_fill_model_dir(tmp_path / "cache")
        assert model.pipe.label == json.loads((SHIPPED_FILL_ASSETS / "model_index.json").read_text())["label"]
        image = torch.full((1, 64, 64, 3), 0.8)
        mask = torch.zeros(1, 64, 64)
        mask[:, 16:48, 16:48] = 1.0
        fill = NODE_CLASS_MAPPINGS["MPPFill"]()
        out, used = getattr(fill, fill.FUNCTION)(
            fill_model=model, image=image, prompt="a red circle", steps=2, seed=0, guidance=30.0, mask=mask
        )
    assert out.shape == (1, 64, 64, 3) and torch.equal(out[used == 0], image[used == 0])
