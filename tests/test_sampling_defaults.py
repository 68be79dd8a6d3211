"""A model dir's sampling defaults (`ModelDir.sampling_defaults`, docs/sampling.md) reach every path alike.

The same model dir and seed give the same pixels through `mpp` (the CLI), the Python API and the ComfyUI nodes
(called as ComfyUI calls them, under `torch.inference_mode()`), for compose, panorama (from a scene and from a
caption) and fill (with refs and with a prompt); and a dir that names a default samples exactly as passing that value
explicitly does, on every path. Precedence: an explicit argument > the model dir > the built-in value.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS
from moviepostproduction.compose.modules import ConditioningConfig
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.encoders import TextEncoder
from moviepostproduction.errors import ValidationError, WeightsError
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.fill.weights import write_fill_model_dir
from moviepostproduction.model_dir import ModelDir, SamplingDefaults
from moviepostproduction.panorama.pipeline import PanoramaPipeline, compose_panorama
from moviepostproduction.scene import load_scene
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import copy_with_index

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STEPS, SEED = 2, 3
CAPTION, PROMPT = "a neon city at night", "a red ring"
TUNED = {"ref_guidance_scale": 2.0, "noise_temperature": 0.7}  # what the "tuned" dir names, "short" does not
FLAGS = ["--ref-guidance", "2.0", "--noise-temperature", "0.7"]  # the same, as CLI options ...
WIDGETS = {"ref_guidance": 2.0, "noise_temperature": 0.7}  # ... and as node widgets
CASES = ("compose", "panorama-scene", "panorama-caption", "fill-refs", "fill-prompt")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Copies of a tiny random dir: "short" names only `max_text_tokens`, "tuned" names `TUNED` too; and the fill
    dirs derived from each ("short-fill", "tuned-fill")."""
    base = tmp_path_factory.mktemp("defaults")
    tiny = tiny_random_model_dir(tmp_path_factory.getbasetemp() / "shared-tiny")
    short = copy_with_index(tiny, base / "short", max_text_tokens=32)
    tuned = copy_with_index(tiny, base / "tuned", max_text_tokens=32, **TUNED)
    fills = {
        f"{name}-fill": write_fill_model_dir(md, base / f"{name}-fill")
        for name, md in (("short", short), ("tuned", tuned))
    }
    return {"short": short, "tuned": tuned, **fills}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Scene files for compose, panorama and fill, a 48 x 32 plate and its mask, next to the example refs."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copytree(EXAMPLES / "refs", folder / "refs")
    circle = {"image": "refs/red_circle.png", "depth": "fg", "caption": "a red circle"}
    scenes = {
        "compose": {"width": 64, "height": 48, "refs": [{**circle, "bbox": [0.1, 0.2, 0.5, 0.9]},
                    {"image": "refs/blue_square.png", "bbox": [0.5, 0.1, 0.9, 0.5], "depth": "bg"}]},
        "panorama": {"width": 64, "height": 32, "panorama": True, "refs": [{**circle, "bbox": [0.8, 0.2, 0.2, 0.8]}]},
        "fill": {"width": 48, "height": 32, "refs": [{**circle, "bbox": [0.5, 0.25, 1.0, 0.75]}]},
    }  # fmt: skip
    for name, scene in scenes.items():
        (folder / f"{name}.json").write_text(json.dumps({"caption": "a red circle in a city", **scene}))
    Image.open(EXAMPLES / "refs" / "blue_square.png").convert("RGB").resize((48, 32)).save(folder / "plate.png")
    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[8:24, 8:40] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def fill_dir(dirs: dict[str, Path], model_dir: Path) -> Path:
    return dirs[f"{model_dir.name}-fill"]


# ------------------------------------------------------------------------------------------------- the paths
@functools.cache
def api_compose(model_dir: Path) -> ComposePipeline:
    return ComposePipeline.from_model_dir(model_dir)


@functools.cache
def api_fill(fill_dir: Path, refs: bool) -> FillPipeline:
    return FillPipeline.from_model_dir(fill_dir, refs=refs)


def pixels(images: torch.Tensor) -> np.ndarray:
    """(1, H, W, 3) in [0, 1] -> (H, W, 3) uint8, as `mpp` writes the PNG."""
    return (images[0] * 255).round().to(torch.uint8).numpy()


def via_api(case: str, dirs: dict[str, Path], files: Path, model_dir: Path, **sampling) -> np.ndarray:
    """The Python API as docs/ shows it; `sampling`: explicit `ref_guidance_scale` / `noise_temperature`."""
    run = dict(num_inference_steps=STEPS, seed=SEED, **sampling)
    if case == "compose":
        return np.asarray(api_compose(model_dir)(load_scene(files / "compose.json"), **run).images[0])
    if case == "panorama-scene":
        out = compose_panorama(api_compose(model_dir), load_scene(files / "panorama.json"), **run)
        return pixels(out.images.permute(0, 2, 3, 1))
    if case == "panorama-caption":
        pipe = PanoramaPipeline.from_model_dir(model_dir)
        text = TextEncoder.load(model_dir).encode([CAPTION], pipe.defaults.max_text_tokens)
        out = pipe(prompt_embeds=text.t5, pooled_prompt_embeds=text.pooled, height=32, **run)
        return pixels(out.images.permute(0, 2, 3, 1))
    refs = case == "fill-refs"
    pipe = api_fill(fill_dir(dirs, model_dir), refs)
    if refs:
        out = pipe(files / "plate.png", scene=files / "fill.json", **run)
    else:
        out = pipe(files / "plate.png", files / "mask.png", prompt=PROMPT, **run)
    return np.asarray(out.images[0])


def via_cli(case: str, dirs: dict[str, Path], files: Path, model_dir: Path, *flags: str) -> np.ndarray:
    """`mpp ...` writing a PNG, read back."""
    out = files / f"{case}-{model_dir.name}.png"
    args = {
        "compose": ["compose", str(files / "compose.json")],
        "panorama-scene": ["panorama", "--scene", str(files / "panorama.json")],
        "panorama-caption": ["panorama", "--caption", CAPTION, "--height", "32"],
        "fill-refs": ["fill", "--image", str(files / "plate.png"), "--refs", str(files / "fill.json")],
        "fill-prompt": ["fill", "--image", str(files / "plate.png"), "--mask", str(files / "mask.png"),
                        "--prompt", PROMPT],
    }[case]  # fmt: skip
    model = fill_dir(dirs, model_dir) if case.startswith("fill") else model_dir
    common = ["-o", str(out), "--model", str(model), "--steps", str(STEPS), "--seed", str(SEED), *flags]
    result = CliRunner().invoke(app, [*args, *common])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out).convert("RGB"))


def node(key: str, **inputs) -> tuple:
    """What ComfyUI's executor does: a fresh instance, then its FUNCTION with keyword inputs, in inference mode."""
    cls = NODE_CLASS_MAPPINGS[key]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def node_scene(folder: Path, name: str):
    """MPP Load Scene reads from the input directory: outside ComfyUI, the current directory."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        return node("MPPLoadScene", scene_file=name, max_refs=50)[0]
    finally:
        os.chdir(cwd)


@functools.cache
def node_model(model_dir: Path):
    return node("MPPLoadModel", model_dir=str(model_dir), device="cpu", dtype="fp32")[0]


@functools.cache
def node_fill_model(fill_dir: Path):
    return node("MPPLoadFillModel", model_dir=str(fill_dir), device="cpu", dtype="fp32", refs=True)[0]


def via_node(case: str, dirs: dict[str, Path], files: Path, model_dir: Path, **widgets) -> np.ndarray:
    """The ComfyUI nodes; `widgets`: `ref_guidance` / `noise_temperature` (left out: -1, the model dir's)."""
    run = dict(steps=STEPS, seed=SEED, **widgets)
    if case == "compose":
        scene = node_scene(files, "compose.json")
        image = node("MPPCompose", model=node_model(model_dir), scene=scene, guidance=3.5, true_cfg=1.0, **run)[0]
    elif case.startswith("panorama"):
        panorama = dict(height=32, guidance=3.5, pad=1, pad_ids="opposite", periodic_rope=False, roll="off")
        if case == "panorama-scene":
            scene = node_scene(files, "panorama.json")
            panorama.update(caption="", scene=scene)
        else:
            panorama.update(caption=CAPTION)
        image = node("MPPPanorama", model=node_model(model_dir), circular_vae=True, **panorama, **run)[0]
    else:
        plate = torch.from_numpy(np.asarray(Image.open(files / "plate.png"), dtype=np.float32) / 255.0)[None]
        fill = dict(fill_model=node_fill_model(fill_dir(dirs, model_dir)), image=plate, guidance=30.0)
        if case == "fill-refs":
            scene = node_scene(files, "fill.json")
            fill.update(prompt="", scene=scene)
        else:
            mask = torch.from_numpy(np.asarray(Image.open(files / "mask.png"), dtype=np.float32) / 255.0)[None]
            fill.update(prompt=PROMPT, mask=mask)
        image = node("MPPFill", **fill, **run)[0]
    return pixels(image)


# ------------------------------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("case", CASES)
def test_the_same_model_dir_and_seed_give_the_same_image_through_cli_api_and_node(case, dirs, files):
    tuned = dirs["tuned"]  # names max_text_tokens, ref_guidance_scale and noise_temperature
    api = via_api(case, dirs, files, tuned)
    assert np.array_equal(via_cli(case, dirs, files, tuned), api)
    assert np.array_equal(via_node(case, dirs, files, tuned), api)


@pytest.mark.parametrize("case", CASES)
def test_a_default_the_model_dir_names_is_what_passing_it_explicitly_gives_on_every_path(case, dirs, files):
    named = via_api(case, dirs, files, dirs["tuned"])
    short = dirs["short"]
    assert not np.array_equal(via_api(case, dirs, files, short), named)  # the named defaults change the image
    assert np.array_equal(via_api(case, dirs, files, short, **TUNED), named)
    assert np.array_equal(via_cli(case, dirs, files, short, *FLAGS), named)
    assert np.array_equal(via_node(case, dirs, files, short, **WIDGETS), named)


def test_an_explicit_argument_wins_over_the_model_dir(dirs, files):
    plain = via_api("compose", dirs, files, dirs["short"])
    assert np.array_equal(
        via_api("compose", dirs, files, dirs["tuned"], ref_guidance_scale=1.0, noise_temperature=1.0), plain
    )
    assert np.array_equal(
        via_cli("compose", dirs, files, dirs["tuned"], "--ref-guidance", "1", "--noise-temperature", "1"), plain
    )
    assert np.array_equal(
        via_node("compose", dirs, files, dirs["tuned"], ref_guidance=1.0, noise_temperature=1.0), plain
    )


def test_the_model_dir_names_its_defaults_in_model_index_and_the_adapter_config(dirs):
    grounding = json.loads((dirs["tuned"] / "adapter" / "config.json").read_text())["grounding_ratio"]
    assert ModelDir.at(dirs["tuned"]).sampling_defaults() == SamplingDefaults(32, 2.0, 0.7, grounding)
    assert ModelDir.at(dirs["short"]).sampling_defaults() == SamplingDefaults(
        max_text_tokens=32, grounding_ratio=grounding
    )
    for pipe in (
        api_compose(dirs["tuned"]),
        PanoramaPipeline.from_model_dir(dirs["tuned"]),
        api_fill(dirs["tuned-fill"], False),
    ):
        assert pipe.defaults == SamplingDefaults(32, 2.0, 0.7, grounding)
    assert SamplingDefaults().grounding_ratio == ConditioningConfig().grounding_ratio  # an adapter config without it


@pytest.mark.parametrize(
    "file, key, value, message",
    [
        ("model_index.json", "max_text_tokens", 0, "must be an integer in [1, 4096]"),
        ("model_index.json", "ref_guidance_scale", "2", "must be a finite number >= 0"),
        ("model_index.json", "noise_temperature", -1, "must be a positive number"),
        ("adapter/config.json", "grounding_ratio", 1.5, "must be a number in [0, 1]"),
    ],
)
def test_a_bad_default_in_the_dir_is_one_line_naming_the_file_key_and_value(dirs, tmp_path, file, key, value, message):
    broken = shutil.copytree(dirs["short"], tmp_path / "broken")
    config = json.loads((broken / file).read_text())
    (broken / file).write_text(json.dumps({**config, key: value}))
    expected = f"model dir {broken}: {file} {key} {message} (got {value!r})"
    for load in (ComposePipeline.from_model_dir, PanoramaPipeline.from_model_dir, FillPipeline.from_model_dir):
        with pytest.raises(WeightsError) as err:
            load(broken)
        assert str(err.value) == expected
    result = CliRunner().invoke(app, ["panorama", "--caption", CAPTION, "--height", "32", "-o", str(tmp_path / "o.png"),
                                      "--model", str(broken)])  # fmt: skip
    assert result.exit_code == 2 and result.output.strip() == f"error: {expected}"


def test_a_bad_explicit_value_is_one_line_naming_the_argument(dirs, files):
    with pytest.raises(ValidationError, match=r"^noise_temperature: must be a positive number \(got 0\)$"):
        via_api("panorama-caption", dirs, files, dirs["short"], noise_temperature=0)
    with pytest.raises(ValidationError, match=r"^ref_guidance_scale: must be a finite number >= 0 \(got -0.5\)$"):
        via_api("fill-refs", dirs, files, dirs["short"], ref_guidance_scale=-0.5)
    with pytest.raises(ValidationError, match=r"^ref_guidance_scale: must be a finite number >= 0 \(got -0.5\)$"):
        via_node("panorama-scene", dirs, files, dirs["short"], ref_guidance=-0.5)  # only -1 means the model dir's
