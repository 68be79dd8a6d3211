"""LoRA files as diffusers users expect (issue 41, item 5): the pipelines' load_lora_weights / set_adapters /
fuse_lora / unfuse_lora / unload_lora_weights give what diffusers' FluxPipeline gives with the same file, for
diffusers and kohya files; `--lora FILE:SCALE` is the API with that scale; bad files are one line; Assemble-Attn
stays right with LoRA layers on its projections."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.lora import FluxLoraMixin
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import MppError
from moviepostproduction.fill.model import FillFlux
from moviepostproduction.scene import load_scene, scene_from_dict
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import flux_inputs, invoke_cli, make_tiny_flux, random_refs, randomize_zero_inits

PROMPT = "a red square"
STEPS = 3
# kohya (sd-scripts) names of a FLUX double block -> the diffusers module and how many it stacks (q, k, v)
KOHYA_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", 3),
    "img_attn_proj": ("attn.to_out.0", 1),
    "img_mlp_0": ("ff.net.0.proj", 1),
    "img_mlp_2": ("ff.net.2", 1),
    "img_mod_lin": ("norm1.linear", 1),
    "txt_attn_qkv": ("attn.add_q_proj", 3),
    "txt_attn_proj": ("attn.to_add_out", 1),
    "txt_mlp_0": ("ff_context.net.0.proj", 1),
    "txt_mlp_2": ("ff_context.net.2", 1),
    "txt_mod_lin": ("norm1_context.linear", 1),
}
# single blocks: linear1 is left out, diffusers' converter splits it at FLUX.1's widths (3072 / 12288)
KOHYA_SINGLE = {"linear2": "proj_out", "modulation_lin": "norm.linear"}


class Holder(FluxLoraMixin):
    """The mixin on a bare model, as the pipelines carry it (they hold theirs as `model`)."""

    def __init__(self, model: nn.Module):
        self.model = model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_random_model_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """LoRA files the tests load: two diffusers files over every linear layer, a kohya file, bad ones."""
    folder = tmp_path_factory.mktemp("loras")
    transformer = ComposePipeline.from_model_dir(tiny).model.transformer
    linears = [name for name, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    paths = {
        "a": save(diffusers_lora(transformer, linears, seed=1), folder / "a.safetensors"),
        "b": save(diffusers_lora(transformer, linears[::2], seed=2), folder / "b.safetensors"),
        "kohya": save(kohya_lora(transformer, seed=3), folder / "kohya.safetensors"),
        "unknown": save({"foo.bar": torch.zeros(2, 2)}, folder / "unknown.safetensors"),
    }
    (folder / "a.bin").write_bytes(b"\x80\x04not read")
    return {**paths, "bin": folder / "a.bin", "missing": folder / "missing.safetensors"}


def save(state: dict, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def diffusers_lora(transformer: nn.Module, names: list[str], seed: int, rank: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in names:
        layer = transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.2
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=gen) * 0.2
    return state


def kohya_lora(transformer: nn.Module, seed: int, rank: int = 4, alpha: float = 2.0) -> dict:
    """A kohya file for this transformer's blocks: lora_down / lora_up / alpha per BFL-named layer."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for kohya, (module, stacked) in KOHYA_DOUBLE.items():
            layers[f"lora_unet_double_blocks_{i}_{kohya}"] = (block.get_submodule(module), stacked)
    for i, block in enumerate(transformer.single_transformer_blocks):
        for kohya, module in KOHYA_SINGLE.items():
            layers[f"lora_unet_single_blocks_{i}_{kohya}"] = (block.get_submodule(module), 1)
    state = {}
    for key, (layer, stacked) in layers.items():
        state[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=gen) * 0.2
        state[f"{key}.lora_up.weight"] = torch.randn(stacked * layer.out_features, rank, generator=gen) * 0.2
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def scene_file(tmp_path):
    path = tmp_path / "scene.json"
    path.write_text(json.dumps({"caption": PROMPT, "width": 64, "height": 64, "refs": []}))
    return path


def ours(pipe: ComposePipeline, latents: torch.Tensor) -> torch.Tensor:
    scene = scene_from_dict({"caption": PROMPT, "width": 64, "height": 64, "refs": []}, base_dir=".")
    return pipe(scene, num_inference_steps=STEPS, latents=latents, output_type="latent").images[0]


def theirs(flux: FluxPipeline, pipe: ComposePipeline, latents: torch.Tensor) -> torch.Tensor:
    out = flux(
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        latents=latents,
        output_type="latent",
        max_sequence_length=pipe.defaults.max_text_tokens,
    )
    return out.images


@pytest.fixture
def pipes(tiny):
    """Our ComposePipeline (0 refs) and diffusers' FluxPipeline from the same tiny dir, and starting latents."""
    latents = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))  # (1, N, 4C) packed
    return ComposePipeline.from_model_dir(tiny), FluxPipeline.from_pretrained(tiny, local_files_only=True), latents


def test_diffusers_lora_file_equals_flux_pipeline_with_it(pipes, files):
    pipe, flux, latents = pipes
    base = ours(pipe, latents)
    assert pipe.load_lora_weights(files["a"], adapter_name="a") == "a"
    flux.load_lora_weights(str(files["a"]), adapter_name="a")
    with_lora = ours(pipe, latents)
    assert (with_lora - base).abs().max() > 0.1  # the LoRA acts
    assert (with_lora - theirs(flux, pipe, latents)).abs().max() <= 1e-4
    assert pipe.get_active_adapters() == ["a"]


def test_kohya_lora_file_equals_flux_pipeline_with_it(pipes, files):
    pipe, flux, latents = pipes
    base = ours(pipe, latents)
    pipe.load_lora_weights(files["kohya"])  # default name: the first free lora_<i>
    flux.load_lora_weights(str(files["kohya"]))
    with_lora = ours(pipe, latents)
    assert pipe.get_active_adapters() == ["lora_0"]
    assert (with_lora - base).abs().max() > 0.1
    assert (with_lora - theirs(flux, pipe, latents)).abs().max() <= 1e-4


def test_two_adapters_with_weights_equal_diffusers_set_adapters(pipes, files):
    pipe, flux, latents = pipes
    for name in ("a", "b"):
        pipe.load_lora_weights(files[name], adapter_name=name)
        flux.load_lora_weights(str(files[name]), adapter_name=name)
    assert pipe.get_active_adapters() == ["b"]  # as in diffusers: the last file loaded is the active one
    assert (ours(pipe, latents) - theirs(flux, pipe, latents)).abs().max() <= 1e-4
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    flux.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    assert pipe.get_active_adapters() == ["a", "b"]
    assert (ours(pipe, latents) - theirs(flux, pipe, latents)).abs().max() <= 1e-4


def test_fuse_equals_unfused_and_unload_restores_the_base_output(tiny, pipes, files):
    pipe, _, latents = pipes
    base = ours(pipe, latents)
    pipe.load_lora_weights(files["a"], adapter_name="a")
    pipe.set_adapters("a", 0.8)
    unfused = ours(pipe, latents)
    pipe.fuse_lora()
    assert (ours(pipe, latents) - unfused).abs().max() <= 1e-4
    pipe.unfuse_lora()
    assert (ours(pipe, latents) - unfused).abs().max() <= 1e-5  # W + dW - dW: float rounding only
    pipe.unload_lora_weights()
    assert (ours(pipe, latents) - base).abs().max() <= 1e-5
    assert type(pipe.model.transformer.transformer_blocks[0].attn.to_q) is nn.Linear
    assert pipe.get_active_adapters() == []
    fresh = ComposePipeline.from_model_dir(tiny)  # a LoRA never fused: unloading gives the base back bit for bit
    fresh.load_lora_weights(files["b"])
    fresh.unload_lora_weights()
    assert torch.equal(ours(fresh, latents), ours(ComposePipeline.from_model_dir(tiny), latents))


def test_assemble_attn_with_refs_sees_lora_layers_and_fused_weights(tiny_cfg):
    """LoRA on to_q / to_k / to_v / to_out.0: the captured q/k/v and the output projection are the LoRA'd ones,
    unfused (peft wrappers), fused, and fused then unloaded (plain Linear again: Assemble-Attn's cached fused
    projection must be recomputed, though peft changed the weights without bumping their version)."""
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(tiny_cfg)).eval()
    randomize_zero_inits(model.adapter, std=0.2)
    grid, text = (8, 8), 6
    inputs = flux_inputs(1, grid, text)
    refs = random_refs(1, 3, tiny_cfg, seed=3, text_len=text)
    names = [f"transformer_blocks.{i}.attn.{p}" for i in range(len(model.transformer.transformer_blocks))
             for p in ("to_q", "to_k", "to_v", "to_out.0")]  # fmt: skip
    lora = diffusers_lora(model.transformer, names, seed=4)
    merged = copy.deepcopy(model)  # the reference: the same update written into plain weights by hand
    with torch.no_grad():
        for name in names:
            delta = lora[f"transformer.{name}.lora_B.weight"] @ lora[f"transformer.{name}.lora_A.weight"]
            merged.transformer.get_submodule(name).weight += delta
    holder = Holder(model)

    def run(m):
        with torch.no_grad():
            return m(**inputs, conditioning=m.prepare(refs, grid, text))

    base, reference = run(model), run(merged)
    assert any("_fused_out" in m.__dict__ for m in model.modules())  # the fused projection was cached
    assert (reference - base).abs().max() > 1e-2
    holder.load_lora_weights(lora, adapter_name="x")
    assert (run(model) - reference).abs().max() <= 1e-5
    holder.fuse_lora()
    assert (run(model) - reference).abs().max() <= 1e-5
    holder.unload_lora_weights()  # diffusers: a fused LoRA stays in the weights
    assert type(model.transformer.transformer_blocks[0].attn.to_out[0]) is nn.Linear
    assert (run(model) - reference).abs().max() <= 1e-5


def test_the_models_own_adapter_stays_active_and_is_never_unloaded():
    """A fill dir's fill/lora.safetensors (peft "default") is the model's: LoRA files join it, leave it alone."""
    transformer = make_tiny_flux(0)
    transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"], init_lora_weights=False))
    holder = Holder(FillFlux(transformer))
    inputs = flux_inputs(1, (4, 4), 5)
    with torch.no_grad():
        before = transformer(**inputs, return_dict=False)[0]
    lora = diffusers_lora(transformer, ["transformer_blocks.0.attn.to_k"], seed=5)
    holder.load_lora_weights(lora, adapter_name="x")
    assert sorted(transformer.active_adapters()) == ["default", "x"] and holder.get_active_adapters() == ["x"]
    holder.set_adapters("x", 0.5)
    assert sorted(transformer.active_adapters()) == ["default", "x"]
    with pytest.raises(MppError, match="^fuse_lora: this model has its own LoRA adapter"):
        holder.fuse_lora()
    with pytest.raises(MppError, match="^adapter_name: is already this model's own adapter"):
        holder.load_lora_weights(lora, adapter_name="default")
    holder.unload_lora_weights()
    assert list(transformer.peft_config) == ["default"] and transformer.active_adapters() == ["default"]
    with torch.no_grad():
        assert torch.equal(transformer(**inputs, return_dict=False)[0], before)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)}, "text-encoder LoRA"),
        ({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 32),
          "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
         "names no linear layer of this FLUX transformer (1 double, 1 single blocks)"),
        ({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 31),
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)},
         "has shape (4, 31), which does not fit transformer_blocks.0.attn.to_q (32 -> 32)"),
        ({"foo.bar": torch.zeros(2)}, "not a FLUX LoRA diffusers can read (key 'foo.bar'"),
        ({"lora_unet_double_blocks_0_img_attn_foo.lora_down.weight": torch.zeros(4, 32)},
         "not a FLUX LoRA diffusers can convert (Incompatible keys detected"),
    ],
)  # fmt: skip
def test_bad_lora_contents_are_one_line_and_load_nothing(pipes, state, message):
    pipe = pipes[0]
    with pytest.raises(MppError) as err:
        pipe.load_lora_weights(state)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not getattr(pipe.model.transformer, "peft_config", None)


def test_bad_lora_files_and_names_are_one_line(pipes, files, tmp_path):
    pipe = pipes[0]
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = {
        files["bin"]: "refusing a pickle checkpoint (.bin)",
        files["missing"]: "missing",
        corrupt: "truncated or corrupt safetensors file",
        tmp_path / "a.gguf": "not a .safetensors file",
    }
    for path, message in cases.items():
        with pytest.raises(MppError) as err:
            pipe.load_lora_weights(path)
        assert str(path) in str(err.value) and message in str(err.value) and "\n" not in str(err.value)
    pipe.load_lora_weights(files["a"], adapter_name="a")
    for name, message in (("a", "is already a loaded LoRA"), ("a.b", "must be 1-64 letters")):
        with pytest.raises(MppError, match=f"^adapter_name: {message}"):
            pipe.load_lora_weights(files["b"], adapter_name=name)
    with pytest.raises(MppError, match=r"^adapter_names: not a loaded LoRA \(loaded: a\)"):
        pipe.set_adapters(["zz"])
    with pytest.raises(MppError, match="^adapter_weights: must be a finite number"):
        pipe.set_adapters(["a"], [float("nan")])


def test_cli_lora_with_a_scale_equals_the_api_with_that_weight(tiny, files, tmp_path):
    scene, out = scene_file(tmp_path), tmp_path / "out.png"
    result = invoke_cli(["compose", str(scene), "-o", str(out), "--model", str(tiny), "--steps", "2",
                         "--lora", f"{files['a']}:0.5"])  # fmt: skip
    assert result.exit_code == 0, result.output
    pipe = ComposePipeline.from_model_dir(tiny)
    pipe.load_loras([(files["a"], 0.5)])
    api = pipe(load_scene(scene), num_inference_steps=2).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(api))
    pipe.set_adapters(pipe.get_active_adapters(), 1.0)
    assert not np.array_equal(np.asarray(pipe(load_scene(scene), num_inference_steps=2).images[0]), np.asarray(api))


@pytest.mark.parametrize(
    "value, message",
    [
        ("{missing}", "--lora: no such file"),
        ("{bin}", "--lora: must be a .safetensors file (pickles are never read)"),
        ("{a}:abc", "--lora: SCALE after the last ':' must be a finite number"),
        ("{a}:nan", "--lora: SCALE after the last ':' must be a finite number"),
        ("{unknown}", "not a FLUX LoRA diffusers can read (key 'foo.bar'"),
    ],
)
def test_cli_bad_lora_is_one_line_exit_2(tiny, files, tmp_path, value, message):
    lora = value.format(**{k: str(v) for k, v in files.items()})
    result = invoke_cli(["compose", str(scene_file(tmp_path)), "-o", str(tmp_path / "o.png"), "--model", str(tiny),
                         "--steps", "1", "--lora", lora])  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o.png").exists()


def test_load_model_node_takes_a_lora_from_comfyuis_loras_folder(tiny, files, tmp_path, monkeypatch):
    import shutil
    import sys
    import types

    from moviepostproduction.comfyui.loras import lora_path
    from moviepostproduction.comfyui.model import MppLoadModel

    folder = tmp_path / "comfy-loras"
    (folder / "styles").mkdir(parents=True)
    shutil.copy(files["a"], folder / "styles" / "a.safetensors")
    (tmp_path / "outside.safetensors").write_bytes(b"")
    folder_paths = types.ModuleType("folder_paths")  # ComfyUI's module, as a running ComfyUI provides it
    folder_paths.get_folder_paths = lambda name: [str(folder)] if name == "loras" else []
    monkeypatch.setitem(sys.modules, "folder_paths", folder_paths)

    assert MppLoadModel.INPUT_TYPES()["optional"]["lora"][0] == ["None", "styles/a.safetensors"]
    (model,) = MppLoadModel().load(str(tiny), "cpu", "fp32", lora="styles/a.safetensors", lora_strength=0.5)
    assert model.compose.get_active_adapters() == ["lora_0"]
    assert model.compose.model.transformer.transformer_blocks[0].attn.to_q.scaling["lora_0"] == 0.5
    (plain,) = MppLoadModel().load(str(tiny), "cpu", "fp32")
    assert plain.compose.get_active_adapters() == []
    with pytest.raises(MppError, match="^lora: must be one of None, styles/a.safetensors"):
        MppLoadModel().load(str(tiny), "cpu", "fp32", lora="../outside.safetensors")
    for name in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "styles/missing.safetensors"):
        with pytest.raises(MppError, match="^lora: must name a .safetensors file inside ComfyUI's loras folder"):
            lora_path(name)


@pytest.mark.parametrize(
    "command",
    [["panorama", "--caption", "a sky"], ["fill", "--image", "plate.png", "--prompt", "a cat"]],
)
def test_panorama_and_fill_take_lora_and_refuse_a_pickle_before_loading(files, tmp_path, command):
    result = invoke_cli([*command, "-o", str(tmp_path / "o.png"), "--lora", f"{files['bin']}:0.5"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    refusal = "error: --lora: must be a .safetensors file (pickles are never read)"
    assert len(lines) == 1 and lines[0].startswith(refusal)
