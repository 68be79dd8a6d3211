"""MPP Load FLUX Files (comfyui/flux_files.py) in a stubbed ComfyUI, and every node run as ComfyUI's executor runs it.

The world: ComfyUI's model folders holding single files written from a tiny FLUX.1-dev replica (toyworld/replica.py)
in the forms ComfyUI users have them (T5 with its token embedding once as `shared`, CLIP-L under `text_model.`
beside a projection, the VAE in BFL's LDM keys; the transformer in diffusers keys, which diffusers' single-file
loader takes at any width: its BFL converter needs FLUX.1's width, tests/test_single_file.py), a fake `comfy`
package holding the replica's tokenizers where ComfyUI keeps its own, and an adapter made by `init_adapter` with
random (non-zero) weights so that references change the image. The package's configs are full-size, so the tests
point single_file.CONFIG_ROOT at the replica's configs laid out as the package's; the rest runs as in ComfyUI.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS, MppModel
from moviepostproduction.comfyui.flux_files import CLIP_TOKENIZER, T5_TOKENIZER, load_flux_files
from moviepostproduction.errors import MppError, ValidationError, WeightsError
from moviepostproduction.scene import Reference, Scene
from moviepostproduction.toyworld.replica import flux_replica
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from test_lora import diffusers_lora
from test_single_file import vae_to_ldm, write_gguf

from helpers import make_tiny_flux

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
FILES = {"diffusion_model": "flux1-dev.safetensors", "t5": "t5xxl_fp16.safetensors",
         "clip_l": "clip_l.safetensors", "vae": "ae.safetensors"}  # fmt: skip


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def write_comfy_package(replica: Path, site: Path) -> Path:
    """site/comfy/ with the replica's tokenizers where ComfyUI keeps its own: sd1_tokenizer/ as ComfyUI ships it
    (vocab.json + merges.txt, model_max_length 8192) and text_encoders/t5_tokenizer/ (tokenizer.json)."""
    from transformers import AutoTokenizer

    comfy = site / "comfy"
    shutil.copytree(replica / "tokenizer", comfy / CLIP_TOKENIZER)
    config = json.loads((comfy / CLIP_TOKENIZER / "tokenizer_config.json").read_text())
    (comfy / CLIP_TOKENIZER / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8192}))
    AutoTokenizer.from_pretrained(replica / "tokenizer_2").save_pretrained(comfy / T5_TOKENIZER)
    (comfy / T5_TOKENIZER / "spiece.model").unlink(missing_ok=True)
    (comfy / "__init__.py").write_text("")
    return comfy


def write_adapter(replica: Path, tiny: Path, out: Path) -> Path:
    """init_adapter's folder (naming the tiny dir's CLIP and DINOv2), its weights then randomised: refs matter."""
    from moviepostproduction.compose.adapter_init import init_adapter
    from moviepostproduction.compose.modules import CompositionAdapter

    clip, dino = (tiny / "image_encoders" / name for name in ("clip", "dino"))
    init_adapter(replica, out=out, clip=clip, dino=dino)
    adapter = CompositionAdapter.from_pretrained(out)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    from moviepostproduction.encoders import load_transformer

    shared = tmp_path_factory.getbasetemp() / "shared-tiny"
    replica, tiny = flux_replica(shared), tiny_random_model_dir(shared)
    base = tmp_path_factory.mktemp("flux-files")
    models = {name: base / "models" / name for name in ("diffusion_models", "text_encoders", "vae", "loras")}
    for folder in models.values():
        folder.mkdir(parents=True)
    save_file(tensors(replica / "transformer"), models["diffusion_models"] / FILES["diffusion_model"])
    fill = make_tiny_flux(in_channels=384, out_channels=64).state_dict()
    save_file(fill, models["diffusion_models"] / "flux1-fill-dev.safetensors")
    t5 = {k: v for k, v in tensors(replica / "text_encoder_2").items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, models["text_encoders"] / FILES["t5"])  # the token embedding once, as `shared`
    clip = {f"text_model.{k}": v for k, v in tensors(replica / "text_encoder").items()}  # as clip_l.safetensors
    clip["text_projection.weight"] = torch.zeros(8, 8)  # CLIPTextModelWithProjection's, not the text model's
    save_file(clip, models["text_encoders"] / FILES["clip_l"])
    levels = len(json.loads((replica / "vae" / "config.json").read_text())["block_out_channels"])
    vae = {k: v.contiguous() for k, v in vae_to_ldm(tensors(replica / "vae"), levels).items()}
    save_file(vae, models["vae"] / FILES["vae"])
    transformer = load_transformer(replica)
    linears = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    save_file(diffusers_lora(transformer, linears, seed=1), models["loras"] / "style.safetensors")
    schnell = {k: v for k, v in tensors(replica / "transformer").items() if "guidance_embedder" not in k}
    save_file(schnell, models["diffusion_models"] / "flux1-schnell.safetensors")
    configs = base / "configs"  # the replica's sizes where the package keeps FLUX.1-dev's and schnell's
    for variant, component in itertools.product(("flux1-dev", "flux1-schnell"), COMPONENTS):
        (configs / variant / component).mkdir(parents=True)
        shutil.copy(replica / component / "config.json", configs / variant / component / "config.json")
    config = json.loads((configs / "flux1-schnell" / "transformer" / "config.json").read_text())
    (configs / "flux1-schnell" / "transformer" / "config.json").write_text(
        json.dumps({**config, "guidance_embeds": False})
    )
    secrets, inp = base / "secrets", base / "input"
    secrets.mkdir()
    save_file(tensors(replica / "transformer"), secrets / "flux1-dev.safetensors")
    (models["diffusion_models"] / "link.safetensors").symlink_to(secrets / "flux1-dev.safetensors")
    (inp / "refs").mkdir(parents=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(inp / "refs" / "red.png")
    ref = {"image": "refs/red.png", "bbox": [0.1, 0.1, 0.8, 0.9]}
    scene = {"caption": "a red square", "width": 32, "height": 32, "refs": [ref]}
    (inp / "scene.json").write_text(json.dumps(scene))
    return {
        **models,
        "replica": replica,
        "adapter": write_adapter(replica, tiny, base / "adapter"),
        "comfy": write_comfy_package(replica, base / "site"),
        "configs": configs,
        "secrets": secrets,
        "input": inp,
        "temp": base / "temp",
    }


@pytest.fixture
def comfy(world, monkeypatch):
    """A running ComfyUI as far as the pack sees one: folder_paths (with the legacy "unet" / "clip" names mapped
    as ComfyUI maps them), an importable `comfy` package, and the replica's configs as the package's."""
    from moviepostproduction.encoders import single_file

    folders = {"diffusion_models": "diffusion_models", "unet": "diffusion_models", "text_encoders": "text_encoders",
               "clip": "text_encoders", "vae": "vae", "loras": "loras"}  # fmt: skip
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda name: [str(world[folders[name]])]  # KeyError for others, as ComfyUI's
    folder_paths.get_input_directory = lambda: str(world["input"])
    folder_paths.get_temp_directory = lambda: str(world["temp"])
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)
    monkeypatch.syspath_prepend(str(world["comfy"].parent))
    monkeypatch.setattr(single_file, "CONFIG_ROOT", world["configs"])
    yield world
    if getattr(sys.modules.get("comfy"), "__file__", None) == str(world["comfy"] / "__init__.py"):
        del sys.modules["comfy"]  # host.py imported the fake package looking for comfy.model_management


def run(key: str, **inputs) -> tuple:
    """What ComfyUI's executor does with a node: a fresh instance, its FUNCTION with keyword inputs, inference mode."""
    cls = NODE_CLASS_MAPPINGS[key]
    with torch.inference_mode():
        return getattr(cls(), cls.FUNCTION)(**inputs)


def load_files(**changes) -> MppModel:
    inputs = {**FILES, "adapter": "", "device": "cpu", "dtype": "fp32", **changes}
    return run("MPPLoadFluxFiles", **inputs)[0]


def red_scene(world) -> Scene:
    ref = Reference(image=world["input"] / "refs" / "red.png", bbox=(0.1, 0.1, 0.8, 0.9), caption="a red square")
    return Scene(caption="a red square on a table", width=32, height=48, refs=[ref])


def compose(model: MppModel, scene: Scene) -> torch.Tensor:
    return run("MPPCompose", model=model, scene=scene, steps=2, seed=3, guidance=3.5, true_cfg=1.0)[0]


# ------------------------------------------------------------------------------------------------ equivalence
def test_the_node_composes_as_the_same_model_loaded_from_its_flux_folder(comfy):
    files = load_files(adapter=str(comfy["adapter"]))
    folder = run("MPPLoadModel", model_dir=str(comfy["replica"]), device="cpu", dtype="fp32",
                 adapter=str(comfy["adapter"]))[0]  # fmt: skip
    assert files.root == comfy["diffusion_models"] / FILES["diffusion_model"]
    scene = red_scene(comfy)
    got, want = compose(files, scene), compose(folder, scene)
    assert got.shape == (1, 48, 32, 3)
    assert (got - want).abs().max() <= 1e-5
    empty = Scene(caption="a red square on a table", width=32, height=48)  # the refs changed the image
    assert (compose(files, empty) - got).abs().max() > 1e-3


def test_a_lora_from_comfyuis_loras_folder_applies_as_on_mpp_load_model(comfy):
    lora = dict(lora="style.safetensors", lora_strength=0.7)
    files = load_files(adapter=str(comfy["adapter"]), **lora)
    folder = run("MPPLoadModel", model_dir=str(comfy["replica"]), device="cpu", dtype="fp32",
                 adapter=str(comfy["adapter"]), **lora)[0]  # fmt: skip
    scene = red_scene(comfy)
    got = compose(files, scene)
    assert (got - compose(folder, scene)).abs().max() <= 1e-5
    assert (got - compose(load_files(adapter=str(comfy["adapter"])), scene)).abs().max() > 1e-3


def test_the_python_api_takes_a_tokenizer_folder_and_a_config_folder(world, monkeypatch):
    from moviepostproduction.compose.pipeline import ComposePipeline

    monkeypatch.delitem(sys.modules, "folder_paths", raising=False)
    folders = {"diffusion_model": "diffusion_models", "t5": "text_encoders", "clip_l": "text_encoders", "vae": "vae"}
    paths = {name: world[folder] / FILES[name] for name, folder in folders.items()}
    pipe = load_flux_files(**paths, adapter=world["adapter"], tokenizers=world["comfy"], config=world["replica"])
    reference = ComposePipeline.from_model_dir(world["replica"], adapter=world["adapter"])
    assert pipe.defaults == reference.defaults
    scene = red_scene(world)
    with torch.inference_mode():
        got, want = (p(scene, num_inference_steps=2, seed=5, output_type="pt").images for p in (pipe, reference))
    assert (got - want).abs().max() <= 1e-5


def test_files_are_listed_from_comfyuis_folders_with_likely_defaults_first(comfy):
    spec = NODE_CLASS_MAPPINGS["MPPLoadFluxFiles"].INPUT_TYPES()["required"]
    diffusion_models = ["flux1-dev", "flux1-fill-dev", "flux1-schnell", "link"]
    assert spec["diffusion_model"][0] == [f"{name}.safetensors" for name in diffusion_models]
    assert spec["t5"][0] == ["t5xxl_fp16.safetensors", "clip_l.safetensors"]
    assert spec["clip_l"][0] == ["clip_l.safetensors", "t5xxl_fp16.safetensors"]
    assert spec["vae"][0] == ["ae.safetensors"]


def test_a_schnell_file_samples_on_schnells_linear_schedule(comfy):
    from moviepostproduction.sampling_defaults import FlowShift

    dev, schnell = (
        load_files(diffusion_model=f"flux1-{v}.safetensors", adapter=str(comfy["adapter"])) for v in ("dev", "schnell")
    )
    assert schnell.compose.defaults.flow_shift == FlowShift(dynamic=False, shift=1.0)
    assert schnell.compose.defaults.timesteps(4, 64).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert dev.compose.defaults.flow_shift == FlowShift()  # FLUX.1-dev's dynamic shift
    assert not schnell.compose.model.transformer.config.guidance_embeds
    assert compose(schnell, red_scene(comfy)).shape == (1, 48, 32, 3)


def test_a_gguf_in_the_legacy_unet_folder_loads_and_stays_quantized(comfy, tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    unet = tmp_path / "unet"  # ComfyUI lists models/unet under diffusion_models too
    unet.mkdir()
    write_gguf(tensors(comfy["replica"] / "transformer"), unet / "flux1-dev-Q8_0.gguf")
    folder_paths = sys.modules["folder_paths"]
    own = folder_paths.get_folder_paths
    paths = {"diffusion_models": [*own("diffusion_models"), str(unet)], "unet": [*own("diffusion_models"), str(unet)]}
    monkeypatch.setattr(folder_paths, "get_folder_paths", lambda name: paths.get(name) or own(name))
    assert (
        "flux1-dev-Q8_0.gguf" in NODE_CLASS_MAPPINGS["MPPLoadFluxFiles"].INPUT_TYPES()["required"]["diffusion_model"][0]
    )
    model = load_files(diffusion_model="flux1-dev-Q8_0.gguf", adapter=str(comfy["adapter"]))
    weight = model.compose.model.transformer.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.dtype == torch.uint8
    full = load_files(adapter=str(comfy["adapter"]))
    scene = red_scene(comfy)
    got, want = compose(model, scene), compose(full, scene)
    assert got.shape == want.shape and 0 < (got - want).abs().max() <= 0.05  # Q8_0 rounding only


# --------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("diffusion_model", "../../secrets/flux1-dev.safetensors"),
        ("diffusion_model", "{secrets}/flux1-dev.safetensors"),
        ("diffusion_model", "link.safetensors"),  # a link out of the folder
        ("diffusion_model", "missing.safetensors"),
        ("t5", "../vae/ae.safetensors"),
        ("vae", "~/ae.safetensors"),
        ("clip_l", ""),
    ],
)
def test_a_file_name_outside_its_folder_is_one_line_naming_the_input(comfy, name, value):
    value = value.format(secrets=comfy["secrets"])
    cls = NODE_CLASS_MAPPINGS["MPPLoadFluxFiles"]
    with pytest.raises(ValidationError) as err:
        load_files(**{name: value, "adapter": str(comfy["adapter"])})
    folder = {"diffusion_model": "diffusion_models", "vae": "vae"}.get(name, "text_encoders")
    assert str(err.value).startswith(f"{name}: must name a ") and f"inside ComfyUI's {folder} folder" in str(err.value)
    assert "\n" not in str(err.value) and cls.VALIDATE_INPUTS(**{**FILES, name: value}) == str(err.value)


@pytest.mark.parametrize(
    ("changes", "line"),
    [
        ({"diffusion_model": "flux1-fill-dev.safetensors"}, "a flux1-fill-dev transformer; composing takes FLUX.1-dev"),
        ({"t5": "clip_l.safetensors"}, "20 tensors T5EncoderModel does not have (encoder.layers.0."),
        ({"adapter": ""}, "adapter: must name an adapter folder (mpp init-adapter"),
        ({"adapter": "/nonexistent-adapter"}, "adapter '/nonexistent-adapter': not a directory"),
        ({"lora": "../x.safetensors"}, "lora: must be one of None, style.safetensors (got '../x.safetensors')"),
    ],
)
def test_a_wrong_file_or_adapter_is_one_line(comfy, changes, line):
    with pytest.raises(MppError) as err:
        load_files(**{"adapter": str(comfy["adapter"]), **changes})
    assert line in str(err.value) and "\n" not in str(err.value)


def test_missing_tokenizers_are_one_line(world, tmp_path, monkeypatch):
    folders = {"diffusion_model": "diffusion_models", "t5": "text_encoders", "clip_l": "text_encoders", "vae": "vae"}
    paths = {name: world[folder] / FILES[name] for name, folder in folders.items()}
    monkeypatch.delitem(sys.modules, "comfy", raising=False)  # no ComfyUI: no `comfy` package to find
    with pytest.raises(WeightsError, match=r"^tokenizers: .*`comfy` package is not importable; pass tokenizers="):
        load_flux_files(**paths, adapter=world["adapter"], config=world["replica"])
    (tmp_path / "comfy" / CLIP_TOKENIZER).mkdir(parents=True)
    with pytest.raises(WeightsError, match=rf"^tokenizers: no T5 tokenizer folder .*comfy/{T5_TOKENIZER} "):
        load_flux_files(**paths, adapter=world["adapter"], config=world["replica"], tokenizers=tmp_path / "comfy")


# --------------------------------------------------------------------------------- every node, as ComfyUI runs it
PRIMITIVE = {"INT", "FLOAT", "STRING", "BOOLEAN"}
PLAIN = PRIMITIVE | {"IMAGE", "MASK"}  # given a value; the other types are links to another node's output
SMALL = {"steps": 1, "width": 32, "height": 32}  # the declared type, at a size a CPU test affords
TEXT = {"caption": "a red square", "prompt": "a red square"}
NEEDED = {"MPPFill": ("mask",)}  # optional inputs of which a node needs one (fill: a mask, or scene refs)


def check_output(kind: str, value: object) -> None:
    """An output as ComfyUI expects it: IMAGE (B, H, W, 3) float in [0, 1]; MASK (B, H, W); the pack's objects."""
    from moviepostproduction.comfyui.fill_node import MppFillModel

    if kind in ("IMAGE", "MASK"):
        assert torch.is_tensor(value) and value.dtype == torch.float32 and value.device.type == "cpu"
        assert value.ndim == (4 if kind == "IMAGE" else 3) and (kind == "MASK" or value.shape[-1] == 3)
        assert float(value.min()) >= 0.0 and float(value.max()) <= 1.0
    else:
        kinds = {"MPP_MODEL": MppModel, "MPP_SCENE": Scene, "MPP_FILL_MODEL": MppFillModel, "STRING": str}
        assert isinstance(value, {**kinds, "FLOAT": float}[kind]), (kind, type(value))


def declared_value(name: str, spec: tuple, world: dict[str, Path]) -> object:
    """A value of the declared type: a combo's first option, a number's default (small sizes), a STRING's default
    (an adapter folder and a caption where empty is no value), an IMAGE / MASK tensor."""
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    if isinstance(kind, list):
        return kind[0]
    if kind in PRIMITIVE:
        fallback = {"adapter": str(world["adapter"]), **TEXT}.get(name, options.get("default"))
        return SMALL.get(name, fallback) if kind != "STRING" else (options.get("default") or fallback)
    if kind == "IMAGE":
        return torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    if kind == "MASK":
        return torch.ones(1, 32, 32)
    raise KeyError(kind)  # a link type: chained


def queue_run(world: dict[str, Path]) -> dict[str, list]:
    """One queue run over every registered node, in link order (a node runs once no other pending node makes a type
    it takes), each consumer once per combination of the values its link inputs can take. Returns the outputs."""
    made: dict[str, list] = {}
    outputs: dict[str, list] = {}
    pending = list(NODE_CLASS_MAPPINGS)

    def links(key: str) -> dict[str, str]:
        required = NODE_CLASS_MAPPINGS[key].INPUT_TYPES()["required"]
        return {n: s[0] for n, s in required.items() if not isinstance(s[0], list) and s[0] not in PLAIN}

    while pending:
        makers = {k: set(NODE_CLASS_MAPPINGS[k].RETURN_TYPES) for k in pending}
        key = next(k for k in pending if not any(set(links(k).values()) & makers[o] for o in pending if o != k))
        cls, spec = NODE_CLASS_MAPPINGS[key], NODE_CLASS_MAPPINGS[key].INPUT_TYPES()
        required = {**spec["required"], **{n: spec["optional"][n] for n in NEEDED.get(key, ())}}
        plain = {n: declared_value(n, s, world) for n, s in required.items() if n not in links(key)}
        for combo in itertools.product(*(list(made[kind]) for kind in links(key).values())):
            inputs = {**plain, **dict(zip(links(key), combo, strict=True))}
            if key == "MPPVary" and inputs["model"].vary is None:  # FLUX files carry no NanoDiT: refused
                with pytest.raises(ValidationError, match="^model: .*has no NanoDiT"):
                    run(key, **inputs)
                continue
            out = run(key, **inputs)
            assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES), key
            for kind, value in zip(cls.RETURN_TYPES, out, strict=True):
                check_output(kind, value)
                if kind.startswith("MPP_"):
                    made.setdefault(kind, []).append(value)
            outputs.setdefault(key, []).append(out)
        pending.remove(key)
    return outputs


def test_every_registered_node_runs_as_comfyuis_executor_runs_it(comfy):
    first, second = queue_run(comfy), queue_run(comfy)  # a fresh instance per call, per queue run
    assert set(first) == set(NODE_CLASS_MAPPINGS)
    assert len(first["MPPCompose"]) == 2 * 4  # both loaders' models x 4 scenes (Add Reference on the other two)
    for key in ("MPPCompose", "MPPPanorama", "MPPVary", "MPPFill"):
        for a, b in zip(first[key], second[key], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True) if torch.is_tensor(x)), key
    image = first["MPPCompose"][0][0]
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image.numpy()).all()
