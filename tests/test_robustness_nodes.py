"""The ComfyUI nodes under hostile input (issue 40): every input kind of every node, the input directory, secrets.

Nodes run as ComfyUI runs them: a fresh instance, then its FUNCTION with keyword inputs, under
`torch.inference_mode()`, inside a stubbed ComfyUI whose input directory is a temporary folder. Beside that folder
lie a credentials file, an image and a scene (the secrets); links and `..` paths inside the input directory point
at them. Properties:
- a refused input is an `MppError` of one line per problem naming the input; nothing else escapes;
- no message shows a secret value, and no file outside the input directory is opened (an audit hook sees every
  `open` of the process);
- a refused scene file name gives the same line whether the file is missing, outside, a link out, a FIFO ...;
- every out-of-spec value of every INT / FLOAT / BOOLEAN / STRING / combo / IMAGE / MASK / link input of every node
  is refused before the transformer runs.
Hypothesis runs derandomized (the same examples in CI every run; MPP_FUZZ_RANDOM=1 explores new ones).
"""

from __future__ import annotations

import json
import math
import os
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS, MppModel
from moviepostproduction.comfyui.inputs import MAX_TEXT
from moviepostproduction.comfyui.scene_nodes import NOT_A_SCENE_FILE
from moviepostproduction.errors import MppError, ValidationError, shown
from moviepostproduction.scene import Scene
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.vary.nanodit import PRESETS, NanoDiT
from moviepostproduction.vary.nanodit_io import save_nanodit

from helpers import fuzz

SECRET_KEY = "sk-live-51HxQ2fLk8Jw0aZ7e9s3Tq4Xv6B1nM2cR5pY8uW0"
SECRET_PASSWORD = "db-hunter2-Zq9x7-correct-horse-battery-staple"
SECRETS = (SECRET_KEY, SECRET_PASSWORD)
CREDENTIALS = {"api_key": SECRET_KEY, "db_password": SECRET_PASSWORD}
REFUSED_IMAGE = "refs[0].image: must be a relative path to an image file inside the input directory"


# --------------------------------------------------------------------------------------- opened files
_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _opened is not None and isinstance(args[0], str | bytes | os.PathLike):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # process-wide and permanent; it records only inside `opened()`


@contextmanager
def opened():
    """Every file the process opens inside the block (resolved paths)."""
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


# ------------------------------------------------------------------------------------------ the world
def png(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def scene_data(image: str) -> dict:
    return {"caption": "a red square", "width": 32, "height": 32, "refs": [{"image": image, "bbox": [0, 0, 1, 1]}]}


ESCAPES = {  # scene files in the input directory whose one image leads out of it
    "dotdot": "../secrets/secret.png",
    "dotdot-missing": "../secrets/nothing.png",
    "deep": "refs/../../secrets/secret.png",
    "absolute": "{secrets}/secret.png",
    "link": "img_link.png",
    "dir-link": "outside/secret.png",
    "tilde": "~/secret.png",
    "tilde-user": "~nobody_here/secret.png",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """input/ (ComfyUI's input directory) and secrets/ beside it; links, escapes and a FIFO inside input/."""
    base = tmp_path_factory.mktemp("world")
    secrets, inp = base / "secrets", base / "input"
    secrets.mkdir()
    (secrets / "credentials.json").write_text(json.dumps(CREDENTIALS))
    png(secrets / "secret.png", (1, 2, 3))
    (secrets / "scene.json").write_text(json.dumps(scene_data("secret.png")))
    png(inp / "refs" / "red.png", (255, 0, 0))
    (inp / "scene.json").write_text(json.dumps(scene_data("refs/red.png")))
    (inp / "shots").mkdir()
    (inp / "shots" / "shot.yaml").write_text(yaml.safe_dump(scene_data("../refs/red.png")))
    (inp / "credentials.json").write_text(json.dumps(CREDENTIALS))
    (inp / "credentials.yaml").write_text(yaml.safe_dump({"caption": "x", **CREDENTIALS}))
    (inp / "link.json").symlink_to(secrets / "credentials.json")
    (inp / "link_scene.json").symlink_to("../secrets/scene.json")
    (inp / "outside").symlink_to(secrets, target_is_directory=True)
    (inp / "img_link.png").symlink_to(secrets / "secret.png")
    (inp / "loop.json").symlink_to("loop.json")
    os.mkfifo(inp / "fifo.json")
    for name, image in ESCAPES.items():
        (inp / f"escape-{name}.json").write_text(json.dumps(scene_data(image.format(secrets=secrets))))
    for folder, name in (
        ("diffusion_models", "flux1-dev.safetensors"),
        ("text_encoders", "t5xxl_fp16.safetensors"),
        ("text_encoders", "clip_l.safetensors"),
        ("vae", "ae.safetensors"),
    ):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / name).write_bytes(b"")  # never read: every fuzzed call is refused first
    return {"base": base, "secrets": secrets, "input": inp, "temp": base / "temp"}


@pytest.fixture
def comfy(world, monkeypatch) -> Path:
    """A running ComfyUI as far as the pack sees one: its folder_paths module."""
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_input_directory = lambda: str(world["input"])
    folder_paths.get_temp_directory = lambda: str(world["temp"])
    folder_paths.get_folder_paths = lambda name: [str(world["base"] / "models" / name)]
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    return world["input"]


def run(key: str, **inputs) -> tuple:
    """What ComfyUI's executor does with a node: a fresh instance, its FUNCTION with keyword inputs, inference mode."""
    cls = NODE_CLASS_MAPPINGS[key]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def check_refusal(err: BaseException, world: dict[str, Path], opened_paths: list[str]) -> list[str]:
    """The contract of a refusal; returns its lines."""
    assert isinstance(err, MppError), f"{type(err).__name__}: {err}"
    lines = str(err).splitlines()
    assert lines and all(line.strip() for line in lines)
    if isinstance(err, ValidationError):
        assert len(lines) == len(err.problems)
    else:
        assert len(lines) == 1
    check_no_leak(str(err), world, opened_paths)
    return lines


def check_no_leak(message: str, world: dict[str, Path], opened_paths: list[str]) -> None:
    assert not any(secret[:12] in message for secret in SECRETS), message
    assert not [p for p in opened_paths if Path(p).is_relative_to(world["secrets"])]


def load(name: str, world: dict[str, Path], max_refs: int = 50) -> tuple[Scene | None, BaseException | None]:
    with opened() as paths:
        try:
            (scene,) = run("MPPLoadScene", scene_file=name, max_refs=max_refs)
        except Exception as err:  # noqa: BLE001 - the property is what escapes
            check_refusal(err, world, paths)
            return None, err
    check_no_leak("", world, paths)
    assert all(ref.image.is_relative_to(world["input"]) for ref in scene.refs)
    return scene, None


# ------------------------------------------------------------------------------- the input directory
def test_scene_files_are_listed_and_loaded_from_the_input_directory(comfy, world):
    listed = NODE_CLASS_MAPPINGS["MPPLoadScene"].INPUT_TYPES()["required"]["scene_file"][0]
    assert {"scene.json", "shots/shot.yaml", "credentials.json", "escape-link.json"} <= set(listed)
    for name in ("scene.json", "shots/shot.yaml", " scene.json "):
        scene, err = load(name, world)
        assert err is None and scene.refs[0].image == world["input"] / "refs" / "red.png"
    assert NODE_CLASS_MAPPINGS["MPPLoadScene"].VALIDATE_INPUTS("shots/shot.yaml") is True
    assert NODE_CLASS_MAPPINGS["MPPLoadScene"].IS_CHANGED("scene.json", 50) != ""


REFUSED_NAMES = [
    "missing.json", "../secrets/credentials.json", "../secrets/missing.json", "{secrets}/credentials.json",
    "{input}/scene.json", "link.json", "link_scene.json", "outside/credentials.json", "outside/missing.json",
    "~/credentials.json", "~nobody_here/x.json", "loop.json", "fifo.json", "refs", "refs/red.png", "", "   ",
    "scene.json\x00", "a" * 5000 + ".json", "shots/../../secrets/scene.json", "./../secrets/scene.json",
    "scene.txt", "shots/",
]  # fmt: skip


@pytest.mark.parametrize("name", REFUSED_NAMES, ids=range(len(REFUSED_NAMES)))
def test_a_refused_scene_file_is_one_line_that_does_not_tell_whether_it_exists(comfy, world, name):
    name = name.format(secrets=world["secrets"], input=world["input"])
    _, err = load(name, world)
    expected = f"scene_file: {NOT_A_SCENE_FILE} (got {shown(name)})"
    assert isinstance(err, ValidationError) and str(err) == expected
    cls = NODE_CLASS_MAPPINGS["MPPLoadScene"]
    assert cls.VALIDATE_INPUTS(name) == expected and cls.IS_CHANGED(name, 50) == ""


def test_a_scene_file_name_that_is_not_text_is_refused_as_any_string_input(comfy, world):
    _, err = load("\ud800.json", world)
    assert str(err) == "scene_file: has a lone surrogate at character 0 (got '\\ud800')"
    assert NODE_CLASS_MAPPINGS["MPPLoadScene"].VALIDATE_INPUTS(5).startswith("scene_file: must name")


@pytest.mark.parametrize("escape", sorted(ESCAPES))
def test_scene_images_must_resolve_inside_the_input_directory(comfy, world, escape):
    _, err = load(f"escape-{escape}.json", world)
    shown_image = shown(ESCAPES[escape].format(secrets=world["secrets"]))
    assert str(err) == f"escape-{escape}.json: {REFUSED_IMAGE} (got {shown_image})"


def test_credentials_in_the_input_directory_name_their_keys_never_their_values(comfy, world):
    for name in ("credentials.json", "credentials.yaml"):
        _, err = load(name, world)
        lines = str(err).splitlines()
        assert any(line.startswith(f"{name}: api_key: unknown key") for line in lines)
        assert any(line.startswith(f"{name}: db_password: unknown key") for line in lines)
        assert all("(got" not in line for line in lines if "unknown key" in line)


def test_echoed_values_are_cut_to_a_few_dozen_characters(comfy, world):
    long = "A" * 500 + SECRET_KEY
    (world["input"] / "long.json").write_text(json.dumps({"caption": long, "width": long, "seed": [long] * 50}))
    _, err = load("long.json", world)
    lines = str(err).splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["width", "seed"]
    assert all(len(line) < 160 and line.endswith("...)") for line in lines)


def test_errors_name_the_scene_file_as_the_user_chose_it(comfy, world):
    (world["input"] / "latin1.json").write_bytes(b'{"caption": "caf\xe9"}')
    (world["input"] / "syntax.yaml").write_text("caption: [unclosed\n")
    for name in ("latin1.json", "syntax.yaml", "escape-dotdot.json"):
        _, err = load(name, world)
        assert str(err).startswith(f"{name}: ") and str(world["base"]) not in str(err)


def test_outside_comfyui_the_input_directory_is_the_current_one(world, monkeypatch):
    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    monkeypatch.chdir(world["input"])
    scene, _ = load("shots/shot.yaml", world)
    assert scene.refs[0].image == world["input"] / "refs" / "red.png"
    assert str(load("../secrets/scene.json", world)[1]).startswith("scene_file: must name")
    monkeypatch.chdir(world["input"] / "shots")  # now ../refs/red.png leaves the input directory
    assert str(load("shot.yaml", world)[1]) == f"shot.yaml: {REFUSED_IMAGE} (got '../refs/red.png')"


NAME_PARTS = [
    *["..", ".", "", "refs", "shots", "outside", "scene.json", "shot.yaml", "credentials.json", "link.json"],
    *["link_scene.json", "loop.json", "fifo.json", "red.png", "~", "secrets", "\n", "\x00"],
]


@fuzz(200)
@given(
    parts=st.lists(st.sampled_from(NAME_PARTS) | st.text(max_size=8), min_size=1, max_size=5),
    prefix=st.sampled_from(["", "/", "~/", "{secrets}/", "{input}/"]),
)
def test_fuzzed_scene_file_names_never_leave_the_input_directory(comfy, world, parts, prefix):
    name = prefix.format(secrets=world["secrets"], input=world["input"]) + "/".join(parts)
    load(name, world)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
IMAGES = st.sampled_from([*ESCAPES.values(), "refs/red.png", "../input/refs/red.png", "refs/missing.png", "refs",
                          "fifo.json", "loop.json", ""]) | st.text(max_size=12) | JSON  # fmt: skip


@fuzz(150)
@given(
    image=IMAGES,
    bbox=st.just([0.1, 0.1, 0.9, 0.9]) | JSON,
    extra=st.dictionaries(
        st.sampled_from(["api_key", "db_password", "token", "captoin"]), st.sampled_from(SECRETS), max_size=3
    ),  # fmt: skip
    top=st.dictionaries(st.sampled_from(["caption", "width", "height", "seed", "panorama"]), JSON, max_size=2),
    as_yaml=st.booleans(),
)
def test_fuzzed_scene_files_in_the_input_directory(comfy, world, image, bbox, extra, top, as_yaml):
    image = image.replace("{secrets}", str(world["secrets"])) if isinstance(image, str) else image
    data = {**scene_data("x"), **top, **extra}
    data["refs"] = [{"image": image, "bbox": bbox}, *({"image": image, "bbox": bbox, **extra} for _ in extra)]
    name = "fuzz.yaml" if as_yaml else "fuzz.json"
    text = yaml.safe_dump(data) if as_yaml else json.dumps(data)
    (world["input"] / name).write_text(text, encoding="utf-8")
    load(name, world)


# --------------------------------------------------------------------------------- every node input
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from moviepostproduction.toyworld.toy_model import tiny_random_fill_dir

    shared = tmp_path_factory.getbasetemp() / "shared-tiny"
    torch.manual_seed(0)
    nanodit = NanoDiT(PRESETS["toy"].with_(hidden_size=32, depth=1, num_heads=2))
    vary = save_nanodit(nanodit, tmp_path_factory.mktemp("vary") / "nanodit.safetensors")
    (model,) = run("MPPLoadModel", model_dir=str(tiny_random_model_dir(shared)), device="cpu", dtype="fp32",
                   vary_checkpoint=str(vary))  # fmt: skip
    (fill,) = run("MPPLoadFillModel", model_dir=str(tiny_random_fill_dir(shared)), device="cpu", dtype="fp32",
                  refs=True)  # fmt: skip
    forwards = []
    for module in (model.compose.model.transformer, model.vary, fill.pipe.model.transformer):
        module.register_forward_pre_hook(lambda *_: forwards.append(1))
    return {"model": model, "fill": fill, "forwards": forwards}


def base_inputs(key: str, models: dict) -> dict:
    """Valid, cheap inputs of every node (one denoising step, 32 x 32)."""
    model, image = models["model"], torch.rand(1, 8, 8, 3)
    scene = Scene(caption="a red square")
    pano = Scene(caption="a panorama", width=64, height=32, panorama=True)
    sample = dict(steps=1, seed=0)
    return {
        "MPPLoadModel": dict(model_dir="/nonexistent-mpp-model", device="cpu", dtype="fp32", vary_checkpoint=""),
        "MPPLoadFluxFiles": dict(diffusion_model="flux1-dev.safetensors", t5="t5xxl_fp16.safetensors",
                                 clip_l="clip_l.safetensors", vae="ae.safetensors", adapter="/nonexistent-mpp-adapter",
                                 device="cpu", dtype="fp32"),
        "MPPScene": dict(caption="a red square", width=32, height=32, panorama=False, images=image,
                         bboxes="[[0.1, 0.1, 0.9, 0.9]]", depths="fg", captions="a red square"),
        "MPPAddReference": dict(scene=scene, image=image, x0=0.1, y0=0.1, x1=0.9, y1=0.9, depth="fg", caption="",
                                mask=torch.zeros(1, 8, 8)),
        "MPPLoadScene": dict(scene_file="scene.json", max_refs=50),
        "MPPCompose": dict(model=model, scene=scene, guidance=3.5, true_cfg=1.0, negative="", ref_guidance=-1.0,
                           noise_temperature=-1.0, **sample),
        "MPPPanorama": dict(model=model, caption="a panorama", height=16, guidance=3.5, pad=1, pad_ids="opposite",
                            periodic_rope=False, roll="off", circular_vae=True, scene=pano, ref_guidance=-1.0,
                            noise_temperature=-1.0, **sample),
        "MPPVary": dict(model=model, image=image, caption="a red square", text_scale=4.0, image_scale=1.5, width=16,
                        height=16, **sample),
        "MPPLoadFillModel": dict(model_dir="/nonexistent-mpp-model", device="cpu", dtype="fp32", refs=False),
        "MPPFill": dict(fill_model=models["fill"], image=torch.rand(2, 32, 32, 3), prompt="a red square",
                        guidance=30.0, mask=torch.ones(1, 32, 32), semantic=torch.rand(1, 32, 32, 3), scene=None,
                        ref_guidance=-1.0, noise_temperature=-1.0, **sample),
    }[key]  # fmt: skip


WRONG = st.sampled_from([None, b"1", [1], {"a": 1}, object(), torch.ones(1)])
NAN = [math.nan, math.inf, -math.inf]


def tensors(max_rank: int, bad_shapes: list[torch.Tensor]) -> st.SearchStrategy:
    """Tensors that are no IMAGE / MASK of any node: of any small shape with an integer or complex dtype or NaN /
    Inf values, or float tensors of the `bad_shapes`."""

    def build(shape, dtype, fill):
        dtype = torch.int64 if fill is None and dtype.is_floating_point else dtype
        return torch.full(shape, 1.0 if fill is None else fill).to(dtype)

    shape = st.lists(st.integers(0, 5), max_size=max_rank).map(tuple)
    dtype = st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.complex64])
    return st.builds(build, shape, dtype, st.sampled_from([None, *NAN])) | st.sampled_from(bad_shapes)


def bad_values(spec: tuple, optional: bool) -> st.SearchStrategy:
    """Values outside an input's spec: wrong types, out of range, non-finite, unencodable, malformed tensors."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    low, high = options.get("min"), options.get("max")
    if isinstance(kind, list):
        return st.text(max_size=8).filter(lambda v: v not in kind) | st.integers() | WRONG
    if kind == "INT":
        out = st.integers(max_value=low - 1) | st.integers(min_value=high + 1) | st.sampled_from([2**64, -(2**70)])
        return out | st.sampled_from([True, False, 1.5, *NAN, "1", 10**5000]) | WRONG
    if kind == "FLOAT":
        out = st.floats(max_value=low, exclude_max=True) | st.floats(min_value=high, exclude_min=True)
        return out | st.sampled_from([*NAN, True, "1.0", 10**400]) | WRONG
    if kind == "BOOLEAN":
        return st.integers() | st.sampled_from(["true", 1.0]) | WRONG
    if kind == "STRING":
        surrogate = st.text(max_size=5).map(lambda s: s + "\udcff")
        return surrogate | st.just("x" * (MAX_TEXT + 1)) | st.integers() | WRONG
    unconnected = WRONG.filter(lambda v: v is not None or not optional)  # None: an optional link left out
    if kind == "IMAGE":
        shapes = [torch.rand(8, 8, 3), torch.rand(1, 8, 8, 2), torch.rand(1, 0, 8, 3), torch.zeros(1, 16385, 1, 3)]
        return tensors(5, shapes) | unconnected
    if kind == "MASK":
        shapes = [torch.rand(8), torch.rand(1, 3, 3), torch.rand(3, 8, 8), torch.rand(1, 1, 8, 8)]
        return tensors(4, shapes) | unconnected
    return st.sampled_from(["MPP_SCENE", 0, torch.ones(1), Scene(caption="x") if kind != "MPP_SCENE" else 1.0])


def declared(key: str) -> dict[str, tuple[tuple, bool]]:
    spec = NODE_CLASS_MAPPINGS[key].INPUT_TYPES()
    return {name: (s, name in spec.get("optional", {})) for part in spec.values() for name, s in part.items()}


@pytest.mark.parametrize("key", sorted(NODE_CLASS_MAPPINGS))
@fuzz(100)
@given(data=st.data())
def test_every_bad_input_of_every_node_is_one_line_before_any_work(comfy, world, models, key, data):
    inputs = dict(base_inputs(key, models))
    spec = declared(key)
    names = data.draw(st.lists(st.sampled_from(sorted(spec)), min_size=1, max_size=3, unique=True))
    for name in names:
        inputs[name] = data.draw(bad_values(*spec[name]), label=name)
    before = len(models["forwards"])
    with opened() as paths, pytest.raises(Exception) as err:  # noqa: PT011 - the contract is checked below
        run(key, **inputs)
    lines = check_refusal(err.value, world, paths)
    assert {line.split(":")[0] for line in lines} <= set(names), lines
    assert len(models["forwards"]) == before


@fuzz(150)
@given(
    caption=st.text(max_size=30),
    bboxes=st.text(max_size=40) | st.sampled_from(["[[0, 0, 1, 1]]", "[0.1, 0.1, 0.5, 0.5]", "[[0,0,1,1]] * 2",
                                                   "[" * 50, "- - - - [1]", "&a [1, *a]", "{a: [1, 2]}"]),
    depths=st.text(alphabet="fgmb ,x", max_size=12),
    captions=st.text(max_size=20),
    batch=st.integers(1, 3),
    panorama=st.booleans(),
    size=st.sampled_from([16, 32, 48, 64]),
)  # fmt: skip
def test_fuzzed_text_inputs_of_the_scene_builder(comfy, world, caption, bboxes, depths, captions, batch, panorama,
                                                 size):  # fmt: skip
    inputs = dict(caption=caption, width=size, height=32, panorama=panorama, images=torch.rand(batch, 4, 4, 3),
                  bboxes=bboxes, depths=depths, captions=captions)  # fmt: skip
    with opened() as paths:
        try:
            (scene,) = run("MPPScene", **inputs)
        except Exception as err:  # noqa: BLE001 - the property is what escapes
            check_refusal(err, world, paths)
            return
    assert len(scene.refs) == batch and scene.caption == caption.strip()


def test_every_node_runs_under_inference_mode_from_the_input_directory(comfy, world, models):
    (scene,) = run("MPPLoadScene", scene_file="scene.json", max_refs=50)
    (scene,) = run("MPPAddReference", **{**base_inputs("MPPAddReference", models), "scene": scene})
    image, layout, _ = run("MPPCompose", **{**base_inputs("MPPCompose", models), "scene": scene})
    assert image.shape == layout.shape == (1, 32, 32, 3)
    assert run("MPPPanorama", **base_inputs("MPPPanorama", models))[0].shape == (1, 32, 64, 3)
    assert run("MPPVary", **base_inputs("MPPVary", models))[0].shape == (1, 16, 16, 3)
    fill = {**base_inputs("MPPFill", models), "seed": 2**64 - 1}  # plate 1 takes the next seed, wrapped to 0
    out, mask = run("MPPFill", **fill)
    assert out.shape == (2, 32, 32, 3) and mask.shape == (2, 32, 32)
    (added,) = run("MPPScene", **base_inputs("MPPScene", models))
    assert added.refs[0].image.is_relative_to(world["temp"])
    (model,) = run("MPPLoadModel", **{**base_inputs("MPPLoadModel", models),
                                      "model_dir": str(models["model"].root)})  # fmt: skip
    assert isinstance(model, MppModel)
