"""The ComfyUI node pack, called the way ComfyUI calls it (instantiate the class, then
`getattr(node, node.FUNCTION)(**inputs)`), without ComfyUI installed, on tiny random model dirs.

Contract checked on every output: a tuple as long as RETURN_TYPES; IMAGE (B, H, W, 3) float32 in [0, 1] on the
CPU; MASK (B, H, W); the custom types carry the package's own objects.
"""

from __future__ import annotations

import importlib.util
import inspect
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, MppModel
from moviepostproduction.comfyui.fill_node import MppFillModel
from moviepostproduction.errors import ValidationError, WeightsError
from moviepostproduction.scene import Scene
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.vary.nanodit import PRESETS, NanoDiT
from moviepostproduction.vary.nanodit_io import save_nanodit

ROOT = Path(__file__).resolve().parents[1]
REFS = ROOT / "examples" / "refs"


def run(key: str, **inputs) -> tuple:
    """What ComfyUI's executor does with a node: a fresh instance, then its FUNCTION with keyword inputs."""
    cls = NODE_CLASS_MAPPINGS[key]
    node = cls()
    out = getattr(node, node.FUNCTION)(**inputs)
    assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
    for value, kind in zip(out, cls.RETURN_TYPES, strict=True):
        check_output(kind, value)
    return out


def check_output(kind: str, value: object) -> None:
    if kind == "IMAGE":
        assert torch.is_tensor(value) and value.ndim == 4 and value.shape[-1] == 3
        assert value.dtype == torch.float32 and value.device.type == "cpu" and value.is_contiguous()
        assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    elif kind == "MPP_MODEL":
        assert isinstance(value, MppModel)
    elif kind == "MPP_SCENE":
        assert isinstance(value, Scene)
    elif kind == "MPP_FILL_MODEL":
        assert isinstance(value, MppFillModel)
    elif kind == "MASK":
        assert torch.is_tensor(value) and value.ndim == 3 and value.dtype == torch.float32
        assert set(value.unique().tolist()) <= {0.0, 1.0}
    else:
        assert isinstance(value, {"STRING": str, "FLOAT": float}[kind])


def ref_image(name: str, size: tuple[int, int] = (24, 20)) -> torch.Tensor:
    """An example reference as IMAGE (1, H, W, 3)."""
    img = Image.open(REFS / name).convert("RGB").resize(size)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


@pytest.fixture(autouse=True)
def ref_cache(tmp_path, monkeypatch) -> Path:
    """Reference PNGs of IMAGE inputs go under $MPP_CACHE outside ComfyUI."""
    monkeypatch.setenv("MPP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "moviepostproduction-refs"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_random_model_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


@pytest.fixture(scope="module")
def vary_checkpoint(tmp_path_factory) -> Path:
    """A NanoDiT whose widths fit the tiny encoders (T5 32, DINO 40 x 16 patches, 16 latent channels)."""
    torch.manual_seed(0)
    model = NanoDiT(PRESETS["toy"].with_(hidden_size=32, depth=1, num_heads=2))
    return save_nanodit(model, tmp_path_factory.mktemp("vary") / "nanodit.safetensors")


@pytest.fixture(scope="module")
def model(model_dir, vary_checkpoint) -> MppModel:
    (loaded,) = run("MPPLoadModel", model_dir=str(model_dir), device="cpu", dtype="fp32",
                    vary_checkpoint=str(vary_checkpoint))  # fmt: skip
    return loaded


def two_ref_scene(**extra) -> Scene:
    images = torch.cat([ref_image("red_circle.png"), ref_image("blue_square.png")])
    (scene,) = run("MPPScene", caption="a red circle and a blue square", width=64, height=48, panorama=False,
                   images=images, bboxes="[[0.1, 0.2, 0.5, 0.9], [0.5, 0.1, 0.9, 0.5]]", depths="fg, bg",
                   captions="a red circle\n", **extra)  # fmt: skip
    return scene


# ------------------------------------------------------------------------------------------------ contract
def input_specs(cls) -> dict[str, tuple]:
    spec = cls.INPUT_TYPES()
    assert set(spec) <= {"required", "optional", "hidden"} and "required" in spec
    return {**spec["required"], **spec.get("optional", {})}


@pytest.mark.parametrize("key", sorted(NODE_CLASS_MAPPINGS))
def test_every_node_declares_what_comfyui_reads(key):
    cls = NODE_CLASS_MAPPINGS[key]
    assert NODE_DISPLAY_NAME_MAPPINGS[key].startswith("MPP ")
    assert cls.CATEGORY == "moviepostproduction"
    assert isinstance(cls.RETURN_TYPES, tuple) and len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
    for name, spec in input_specs(cls).items():
        assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, name
        kind, options = spec[0], (spec[1] if len(spec) == 2 else {})
        if isinstance(kind, list):  # a combo: the default must be one of its entries
            assert options.get("default", kind[0]) in kind, name
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], name
        else:
            assert isinstance(kind, str) and kind.isupper(), name
    # The function takes exactly the declared inputs; optional ones (only) have defaults.
    params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    spec = cls.INPUT_TYPES()
    assert list(params)[1:] == [*spec["required"], *spec.get("optional", {})]
    for name in spec["required"]:
        assert params[name].default is inspect.Parameter.empty, name
    for name in spec.get("optional", {}):
        assert params[name].default is not inspect.Parameter.empty, name


def test_pack_imports_without_comfyui_or_the_model_libraries():
    code = ("import sys, moviepostproduction.comfyui as c; "
            "print(len(c.NODE_CLASS_MAPPINGS), sorted(m for m in ('comfy', 'folder_paths', 'diffusers', "
            "'transformers') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split(" ", 1)[1].strip() == "[]"


def test_custom_node_folder_loads_as_comfyui_loads_it():
    module_path = str(ROOT / "comfyui_node")  # as nodes.load_custom_node: keyed by path, registered before exec
    name = module_path.replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, Path(module_path) / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    assert module.NODE_CLASS_MAPPINGS is NODE_CLASS_MAPPINGS
    assert module.NODE_DISPLAY_NAME_MAPPINGS is NODE_DISPLAY_NAME_MAPPINGS


# ----------------------------------------------------------------------------------------------- loader
def test_loader_wraps_the_pipelines_of_the_dir(model, model_dir, vary_checkpoint):
    assert model.root == model_dir and model.device == "cpu"
    assert model.vary is not None and model.vary_path == vary_checkpoint
    assert next(model.compose.model.parameters()).dtype == torch.float32
    assert model.label.startswith("tiny-random")


def test_loader_errors_name_the_path(tmp_path, vary_checkpoint, model_dir):
    with pytest.raises(WeightsError, match=str(tmp_path / "nowhere")):
        run("MPPLoadModel", model_dir=str(tmp_path / "nowhere"), device="cpu", dtype="fp32")
    torch.manual_seed(0)
    wrong = save_nanodit(NanoDiT(PRESETS["tiny"]), tmp_path / "wrong.safetensors")
    with pytest.raises(WeightsError) as err:
        run("MPPLoadModel", model_dir=str(model_dir), device="cpu", dtype="fp32", vary_checkpoint=str(wrong))
    assert str(err.value).startswith(f"{wrong}: NanoDiT does not fit the encoders")
    assert "text_dim 16 (model dir: 32)" in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------- scenes
def test_scene_builder_and_chained_add_reference(ref_cache):
    scene = two_ref_scene()
    assert [r.bbox for r in scene.refs] == [(0.1, 0.2, 0.5, 0.9), (0.5, 0.1, 0.9, 0.5)]
    assert [r.depth for r in scene.refs] == ["fg", "bg"] and scene.refs[0].caption == "a red circle"
    green = ref_image("green_triangle.png")
    (scene3,) = run("MPPAddReference", scene=scene, image=green, x0=0.6, y0=0.6, x1=0.95, y1=0.95, depth="mg")
    assert len(scene3.refs) == 3 and scene3.refs[:2] == scene.refs and scene3.refs[2].depth == "mg"
    # The reference is stored losslessly as PNG, named by content: the same pixels give the same file.
    stored = np.asarray(Image.open(scene3.refs[2].image))
    assert np.array_equal(stored, (green[0].numpy() * 255).round().astype(np.uint8))
    assert scene3.refs[2].image.parent == ref_cache
    (again,) = run("MPPAddReference", scene=scene, image=green, x0=0.1, y0=0.1, x1=0.2, y1=0.2, depth="fg")
    assert again.refs[2].image == scene3.refs[2].image


def test_add_reference_mask_is_transparency_like_load_image():
    (scene,) = run("MPPScene", caption="a red circle", width=32, height=32, panorama=False)
    image = torch.zeros(1, 8, 8, 3)  # black
    mask = torch.zeros(1, 8, 8)
    mask[:, :, 4:] = 1.0  # right half masked (LoadImage: mask = 1 - alpha)
    (scene,) = run("MPPAddReference", scene=scene, image=image, x0=0.1, y0=0.1, x1=0.9, y1=0.9, depth="fg",
                   caption="a red circle", mask=mask)  # fmt: skip
    (rgb,) = scene.load_ref_images()  # transparent pixels are composited onto white
    arr = np.asarray(rgb)
    assert (arr[:, :4] == 0).all() and (arr[:, 4:] == 255).all()
    assert scene.refs[0].caption == "a red circle"


@pytest.mark.parametrize(
    "key, inputs, line",
    [
        ("MPPScene", dict(width=50), "width: must be a positive multiple of 16"),
        ("MPPScene", dict(bboxes="[[0.5, 0.1, 0.2, 0.9], [0, 0, 1, 1]]"), "refs[0].bbox: needs x0 < x1"),
        ("MPPScene", dict(bboxes="[[0.1, 0.1, 0.5, 0.5]] * 2", depths="fg bg"), "bboxes: cannot be parsed"),
        ("MPPScene", dict(bboxes="[[0, 0, 1, 1]]", depths="fg, bg, mg"), "depths: needs one entry per image"),
        ("MPPScene", dict(bboxes="[[0, 0, 1, 1]]", depths="fg top"), "refs[1].depth: must be one of"),
        ("MPPAddReference", dict(x0=0.9, x1=0.1), "refs[0].bbox: needs x0 < x1"),
        ("MPPAddReference", dict(image=torch.rand(2, 8, 8, 3)), "image: one reference per node"),
        ("MPPAddReference", dict(image=torch.full((1, 8, 8, 3), float("nan"))), "image: must be finite"),
        ("MPPAddReference", dict(image=torch.rand(8, 8, 3)), "image: must be a non-empty IMAGE tensor"),
        ("MPPAddReference", dict(mask=torch.ones(1, 4, 4)), "mask: must be a MASK (B, H, W) of the image's size"),
        ("MPPAddReference", dict(scene="a scene"), "scene: must be an MPP_SCENE"),
    ],
)
def test_scene_node_errors_are_one_line_naming_the_field(key, inputs, line):
    base = {
        "MPPScene": dict(caption="two refs", width=64, height=48, panorama=False,
                         images=torch.rand(2, 8, 8, 3), bboxes="[[0.1, 0.1, 0.5, 0.5]]", depths="fg"),
        "MPPAddReference": dict(scene=Scene(caption="one ref"), image=torch.rand(1, 8, 8, 3), x0=0.1, y0=0.1,
                                x1=0.5, y1=0.5, depth="fg"),
    }[key]  # fmt: skip
    with pytest.raises(ValidationError) as err:
        run(key, **{**base, **inputs})
    assert len(str(err.value).splitlines()) == 1
    assert str(err.value).startswith(line)


def test_load_scene_node_reads_a_scene_file(monkeypatch):
    monkeypatch.chdir(ROOT)  # outside ComfyUI the input directory is the current one
    assert {"examples/scene.json", "examples/scene.yaml"} <= set(input_specs(NODE_CLASS_MAPPINGS["MPPLoadScene"])
                                                                ["scene_file"][0])  # fmt: skip
    (scene,) = run("MPPLoadScene", scene_file="examples/scene.json", max_refs=50)
    assert scene.refs and all(r.image.is_file() for r in scene.refs)
    with pytest.raises(ValidationError, match=r"^examples/scene.json: refs: too many refs"):
        run("MPPLoadScene", scene_file="examples/scene.json", max_refs=0)


# ----------------------------------------------------------------------------------------------- samplers
def test_compose_node_is_the_python_api_in_comfyui_layout(model):
    scene = two_ref_scene()
    image, layout, alphas = run("MPPCompose", model=model, scene=scene, steps=2, seed=5, guidance=3.5, true_cfg=1.0)
    assert image.shape == layout.shape == (1, 48, 64, 3)
    expected = model.compose(scene, num_inference_steps=2, seed=5, output_type="pt").images  # (1, 3, H, W)
    assert torch.equal(image, expected.permute(0, 2, 3, 1))
    assert not torch.equal(layout, image)  # boxes and labels drawn on top
    assert alphas.splitlines() == ["ref 0 fg alpha 0.500 -> modulation", "ref 1 bg alpha 0.500 -> modulation"]
    again = run("MPPCompose", model=model, scene=scene, steps=2, seed=5, guidance=3.5, true_cfg=1.0)[0]
    other = run("MPPCompose", model=model, scene=scene, steps=2, seed=6, guidance=3.5, true_cfg=1.0)[0]
    assert torch.equal(again, image) and not torch.equal(other, image)


def panorama_inputs(model, **kw) -> dict:
    base = dict(model=model, caption="a neon city at night", height=32, steps=2, seed=0, guidance=3.5, pad=1,
                pad_ids="opposite", periodic_rope=False, roll="off", circular_vae=True)  # fmt: skip
    return {**base, **kw}


def test_panorama_node_from_a_caption_and_from_a_scene(model):
    image, seam = run("MPPPanorama", **panorama_inputs(model))
    assert image.shape == (1, 32, 64, 3) and seam > 0
    (scene,) = run("MPPScene", caption="a panorama", width=64, height=32, panorama=True)
    (scene,) = run("MPPAddReference", scene=scene, image=ref_image("red_circle.png"), x0=0.8, y0=0.2, x1=0.2,
                   y1=0.8, depth="fg")  # fmt: skip
    assert scene.refs[0].wraps
    image, _ = run("MPPPanorama", **panorama_inputs(model, caption="", height=16, scene=scene))
    assert image.shape == (1, 32, 64, 3)  # the scene's size wins over the height widget
    with pytest.raises(ValidationError, match="^caption: give a caption or connect a panorama scene"):
        run("MPPPanorama", **panorama_inputs(model, caption="  "))
    with pytest.raises(ValidationError, match="^height: must be a positive multiple of 16"):
        run("MPPPanorama", **panorama_inputs(model, height=40))


def test_vary_node_gives_one_variation_per_input_image(model, model_dir):
    refs = torch.cat([ref_image("red_circle.png", (32, 32)), ref_image("blue_square.png", (32, 32))])
    inputs = dict(model=model, image=refs, caption="a red circle", text_scale=4.0, image_scale=1.5, steps=2, seed=0,
                  width=32, height=16)  # fmt: skip
    (images,) = run("MPPVary", **inputs)
    assert images.shape == (2, 16, 32, 3)
    assert not torch.equal(images[0], images[1])  # each variation draws its own noise
    assert torch.equal(run("MPPVary", **inputs)[0], images)
    with pytest.raises(ValidationError, match=r"^width: must be a multiple of 8"):
        run("MPPVary", **{**inputs, "width": 36})
    (plain,) = run("MPPLoadModel", model_dir=str(model_dir), device="cpu", dtype="fp32")
    with pytest.raises(ValidationError, match="model: has no NanoDiT: set vary_checkpoint"):
        run("MPPVary", **{**inputs, "model": plain})


# ------------------------------------------------------------------------------------------- ComfyUI hooks
class Interrupted(Exception):
    pass


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """The parts of ComfyUI the pack uses, stubbed in sys.modules as a running ComfyUI would provide them."""
    events = {"progress": [], "checks": 0, "interrupt_after": None}

    class ProgressBar:
        def __init__(self, total):
            events["progress"].append(("total", total))

        def update(self, value):
            events["progress"].append(("update", value))

    def throw_exception_if_processing_interrupted():
        events["checks"] += 1
        if events["interrupt_after"] is not None and events["checks"] > events["interrupt_after"]:
            raise Interrupted()

    comfy = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_temp_directory = lambda: str(tmp_path / "comfy-temp")
    for name, module in [("comfy", comfy), ("comfy.utils", utils), ("comfy.model_management", mm),
                         ("folder_paths", folder_paths)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    return events


def test_inside_comfyui_progress_cancel_device_and_temp_folder(model, fake_comfy, tmp_path):
    scene = two_ref_scene()
    assert all(r.image.parent == tmp_path / "comfy-temp" / "moviepostproduction-refs" for r in scene.refs)
    run("MPPCompose", model=model, scene=scene, steps=3, seed=0, guidance=3.5, true_cfg=1.0)
    assert fake_comfy["progress"] == [("total", 3), ("update", 1), ("update", 1), ("update", 1)]
    assert fake_comfy["checks"] == 3
    fake_comfy["interrupt_after"] = 4  # Cancel pressed during the second step
    with pytest.raises(Interrupted):
        run("MPPCompose", model=model, scene=scene, steps=3, seed=0, guidance=3.5, true_cfg=1.0)
    from moviepostproduction.comfyui.host import default_device

    assert default_device() == "cpu"


# ------------------------------------------------------------------------------------------------ fill
@pytest.fixture(scope="module")
def fill_model(model_dir, tmp_path_factory):
    from moviepostproduction.toyworld.toy_model import tiny_random_fill_dir

    root = tiny_random_fill_dir(tmp_path_factory.getbasetemp() / "shared-tiny")
    (loaded,) = run("MPPLoadFillModel", model_dir=str(root), device="cpu", dtype="fp32", refs=True)
    return loaded


def plates(batch: int = 2, size: tuple[int, int] = (32, 48)) -> torch.Tensor:
    """Plates whose values are exact multiples of 1/255 (what a PNG loaded by ComfyUI holds)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, *size, 3), generator=gen).float() / 255.0


def test_fill_node_repaints_only_inside_the_mask(fill_model):
    image = plates()
    mask = torch.zeros(2, 32, 48)
    mask[0, 8:24, 8:24] = 1.0
    mask[1, :, 30:] = 0.7  # grey: binarised at 0.5, as FLUX-Fill
    semantic = torch.zeros(1, 32, 48, 3)
    semantic[..., 10:20, 10:20, 0] = 1.0
    out, used = run("MPPFill", fill_model=fill_model, image=image, prompt="a red ring", steps=2, seed=0,
                    guidance=30.0, mask=mask, semantic=semantic)  # fmt: skip
    assert out.shape == (2, 32, 48, 3) and used.shape == (2, 32, 48) and used.dtype == torch.float32
    assert torch.equal(used, (mask >= 0.5).float())
    keep = used == 0
    assert torch.equal(out[keep], image[keep])  # paste-back: bit-identical outside the mask
    assert not torch.equal(out[~keep], image[~keep])


def test_fill_node_inserts_scene_refs_at_their_boxes(fill_model):
    (scene,) = run("MPPScene", caption="a red circle", width=48, height=32, panorama=False)
    (scene,) = run("MPPAddReference", scene=scene, image=ref_image("red_circle.png"), x0=0.5, y0=0.25, x1=1.0,
                   y1=0.75, depth="fg")  # fmt: skip
    out, used = run("MPPFill", fill_model=fill_model, image=plates(1), prompt="", steps=2, seed=0, guidance=30.0,
                    scene=scene)  # fmt: skip
    expected = torch.zeros(1, 32, 48)
    expected[:, 8:24, 24:] = 1.0  # the union of the boxes is the mask
    assert torch.equal(used, expected)


@pytest.mark.parametrize(
    "inputs, line",
    [
        (dict(mask=torch.ones(1, 16, 16)), "mask: must be a MASK (B, H, W) of the image's size 32x48"),
        (dict(mask=torch.zeros(1, 32, 48)), "mask: marks no pixel to repaint"),
        (dict(mask=None), "mask: required (or give refs"),
        (dict(image=torch.full((1, 32, 48, 3), float("inf"))), "image: must be finite"),
        (dict(fill_model="x"), "fill_model: must be an MPP_FILL_MODEL"),
    ],
)
def test_fill_node_errors_are_one_line_naming_the_input(fill_model, inputs, line):
    base = dict(fill_model=fill_model, image=plates(1), prompt="", steps=1, seed=0, guidance=30.0,
                mask=torch.ones(1, 32, 48))  # fmt: skip
    with pytest.raises(ValidationError) as err:
        run("MPPFill", **{**base, **inputs})
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_loader_falls_back_to_the_dirs_nanodit_as_mpp_vary_does():
    from moviepostproduction.model_dir import default_model_dir

    (model,) = run("MPPLoadModel", model_dir="", device="cpu", dtype="fp32")
    assert model.vary_path == default_model_dir() / "nanodit" and model.vary is not None


def test_loader_takes_an_adapter_folder_beside_a_stock_flux_folder(tmp_path, model_dir):
    import shutil

    from moviepostproduction.compose.adapter_init import init_adapter

    stock = tmp_path / "flux"
    shutil.copytree(model_dir, stock, ignore=shutil.ignore_patterns("adapter", "image_encoders"))
    clip, dino = (model_dir / "image_encoders" / name for name in ("clip", "dino"))
    init_adapter(stock, out=tmp_path / "adapter", clip=clip, dino=dino)
    with pytest.raises(WeightsError, match="pass --adapter DIR"):
        run("MPPLoadModel", model_dir=str(stock), device="cpu", dtype="fp32")
    (model,) = run("MPPLoadModel", model_dir=str(stock), device="cpu", dtype="fp32", adapter=str(tmp_path / "adapter"))
    assert model.compose.image_encoder.clip_dim == model.compose.model.adapter.cfg.clip_dim
