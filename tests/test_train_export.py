"""Every training stage exports something `mpp compose` loads (issue 42 item 5): stages 1-3 on a stock FLUX folder (a
tiny hub-layout replica, no adapter or image encoders in it) write an adapter folder, the trained transformer LoRA in
diffusers' file format inside, which `mpp compose --model REPLICA --adapter OUT` and
`ComposePipeline.from_pretrained(REPLICA, adapter=OUT)` load; `mpp train` creates the adapter it starts from
(`init_adapter:`) or starts from `mpp init-adapter`'s folder or a stage's export."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.files import default_file_mode, load_safetensors
from moviepostproduction.toyworld.replica import write_flux_replica
from moviepostproduction.toyworld.shards import write_dataset
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import example_scene, invoke_cli

MAX_REFS, TEXT, RANK = 2, 32, 4
SQUARE = ("refs/blue_square.png", (0.25, 0.25, 0.75, 0.75), "fg", "a blue square")


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """replica/: FLUX.1-dev as downloaded (tiny); clip/, dino/: image encoders as downloaded; data/: 6 shards'
    samples; stage1/: `mpp train` stage 1 for 2 steps from an adapter the recipe creates (adapter/), exported."""
    root = tmp_path_factory.mktemp("train-export")
    replica = write_flux_replica(tmp_path_factory.getbasetemp() / "replicas")
    tiny = tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny")
    clip = shutil.copytree(tiny / "image_encoders" / "clip", root / "clip")
    dino = shutil.copytree(tiny / "image_encoders" / "dino", root / "dino")
    write_dataset(root / "data", 6, 3, ToyWorldConfig(size=64, ref_size=32, max_refs=MAX_REFS), shard_size=3)
    create = {"clip": str(clip), "dino": str(dino)}  # mpp init-adapter's arguments
    recipe = stage_recipe(root, "stage1", adapter_dir=str(root / "adapter"), init_adapter=create)
    result = train(root, recipe)
    assert result.exit_code == 0, result.output
    return root, replica, recipe


def stage_recipe(root, name: str, stage: str = "1", steps: int = 2, **fields) -> dict:
    return {
        "model": str(write_flux_replica(root.parent / "replicas")),
        "data": str(root / "data"),
        "out": str(root / f"run-{name}"),
        "stage": stage,
        "max_refs": MAX_REFS,
        "max_text_tokens": TEXT,
        "export": str(root / name),
        "export_dtype": "fp32",
        "ref_guidance": 1.5,
        "trainer": {"max_steps": steps, "lr_scale": 100.0, "progress": False, "tensorboard": False},
        "compose": {"batch_size": 2, "sample_steps": 1, "num_preview": 1, "lora_rank": RANK},
        **fields,
    }


def train(root, recipe: dict, name: str = "r.yaml"):
    (root / name).write_text(yaml.safe_dump(recipe))
    return invoke_cli(["train", str(root / name)])


def compose_latents(replica, adapter) -> torch.Tensor:
    pipe = ComposePipeline.from_pretrained(replica, adapter=adapter)
    scene = example_scene("a blue square", (64, 64), [SQUARE])
    return pipe(scene, num_inference_steps=2, seed=3, output_type="latent").images[0]


def test_stage_1_exports_an_adapter_folder_with_its_lora_in_diffusers_format(real):
    root, replica, recipe = real
    out = root / "stage1"
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_index.json",
        "config.json",
        "model.safetensors",
        "transformer_lora",
    ]
    assert (root / "adapter" / "config.json").is_file()  # created from init_adapter before training
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~(0o666 & ~default_file_mode()))  # readable as umask says
    index = json.loads((out / "adapter_index.json").read_text())
    assert index["image_encoders"] == {"clip": str((root / "clip").resolve()), "dino": str((root / "dino").resolve())}
    assert index["sampling"] == {"max_text_tokens": TEXT, "ref_guidance_scale": 1.5, "noise_temperature": 1.0}
    lora_file = out / "transformer_lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(lora_file), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["transformer.r"] == RANK and config["transformer.lora_alpha"] == RANK
    lora = load_safetensors(lora_file)
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k) for k in lora)
    # The exported tensors are the trained ones of the last checkpoint, bit for bit (export_dtype fp32).
    (last,) = (root / "run-stage1" / "checkpoints").glob("step-000002")
    trained = load_safetensors(last / "trainable.safetensors")
    as_saved = {k.replace(".default.weight", ".weight"): v for k, v in trained.items() if ".lora_" in k}
    assert as_saved.keys() == lora.keys()
    assert all(torch.equal(as_saved[k], lora[k]) for k in lora)
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained away from peft's zero B
    adapter = load_safetensors(out / "model.safetensors")
    trained_adapter = {k.removeprefix("adapter."): v for k, v in trained.items() if k.startswith("adapter.")}
    assert trained_adapter and all(torch.equal(adapter[k], v) for k, v in trained_adapter.items())


def test_mpp_compose_loads_the_export_and_equals_from_pretrained_with_the_lora_on(real, tmp_path):
    root, replica, _ = real
    out = root / "stage1"
    scene_file = tmp_path / "scene.json"
    ref = {"image": str(shutil.copy(example_png(), tmp_path / "sq.png")), "bbox": list(SQUARE[1]), "depth": "fg"}
    scene = {"caption": "a blue square", "width": 64, "height": 64, "refs": [{**ref, "caption": SQUARE[3]}]}
    scene_file.write_text(json.dumps(scene))
    png = tmp_path / "o.png"
    args = ["compose", str(scene_file), "-o", str(png), "--model", str(replica), "--adapter", str(out), "--steps", "2"]
    result = invoke_cli([*args, "--device", "cpu", "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    pipe = ComposePipeline.from_pretrained(replica, adapter=out)
    assert pipe.model.transformer.peft_config["mpp_adapter"].r == RANK  # the LoRA as trained: rank and alpha
    assert pipe.model.transformer.peft_config["mpp_adapter"].lora_alpha == RANK
    assert pipe.defaults.ref_guidance_scale == 1.5  # the recipe's, via adapter_index.json
    from moviepostproduction.scene import load_scene

    image = pipe(load_scene(scene_file), num_inference_steps=2).images[0]
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(image))
    trained, untrained = compose_latents(replica, out), compose_latents(replica, root / "adapter")
    assert (trained - untrained).abs().max() > 1e-4  # the trained adapter and LoRA act


def example_png():
    from helpers import EXAMPLES

    return EXAMPLES / SQUARE[0]


def test_stage_2_goes_on_from_stage_1s_export_or_starts_from_init_adapters_folder(real):
    root, replica, _ = real
    stage1_lora = load_safetensors(root / "stage1" / "transformer_lora" / "pytorch_lora_weights.safetensors")
    two = stage_recipe(root, "stage2", stage="2", steps=1, adapter_dir=str(root / "stage1"))
    two["trainer"]["lr_scale"] = 1e-3  # a step that barely moves the LoRA: it started from stage 1's
    result = train(root, two, "two.yaml")
    assert result.exit_code == 0, result.output
    lora = load_safetensors(root / "stage2" / "transformer_lora" / "pytorch_lora_weights.safetensors")
    assert lora.keys() == stage1_lora.keys()
    assert all(torch.allclose(lora[k], stage1_lora[k], atol=1e-6) for k in lora)
    assert not all(torch.equal(lora[k], stage1_lora[k]) for k in lora)  # and trained on

    fresh = root / "fresh"
    args = ["init-adapter", "--model", str(replica), "--clip", str(root / "clip"), "--dino", str(root / "dino")]
    assert invoke_cli([*args, "-o", str(fresh)]).exit_code == 0
    result = train(root, stage_recipe(root, "from-init", stage="2", steps=1, adapter_dir=str(fresh)), "init.yaml")
    assert result.exit_code == 0, result.output
    assert (fresh / "config.json").is_file() and not (fresh / "transformer_lora").exists()  # the start is kept
    lora = load_safetensors(root / "from-init" / "transformer_lora" / "pytorch_lora_weights.safetensors")
    assert lora.keys() == stage1_lora.keys()  # a fresh LoRA of the same modules and rank
    assert compose_latents(replica, root / "from-init").shape == compose_latents(replica, fresh).shape


@pytest.mark.parametrize("backbone", [torch.float32, torch.bfloat16])
def test_a_started_lora_is_exported_unchanged_as_stage_3_carries_it(real, tmp_path, backbone):
    """Stage 3 trains the feedback bridge only: the LoRA it started from (a stage's export) is carried bit for bit,
    on a bf16 backbone (`backbone_dtype: bf16`) too."""
    from types import SimpleNamespace

    from moviepostproduction.compose.flux import ConditionedFlux
    from moviepostproduction.compose.modules import CompositionAdapter
    from moviepostproduction.encoders import load_transformer
    from moviepostproduction.model_dir import ModelDir
    from moviepostproduction.training.adapter_export import export_adapter_dir
    from moviepostproduction.training.adapter_start import start_lora
    from moviepostproduction.training.recipe import Recipe

    root, replica, recipe = real
    md = ModelDir.at(replica, root / "stage1")
    transformer = load_transformer(md, dtype=backbone)
    start_lora(transformer, md.adapter.lora)
    model = ConditionedFlux(transformer, CompositionAdapter.from_pretrained(md.adapter.root))
    carried = Recipe(**{**recipe, "stage": "3", "export": str(tmp_path / "stage3"), "init_adapter": None})
    out = export_adapter_dir(carried, SimpleNamespace(model=model), md)
    name = "transformer_lora/pytorch_lora_weights.safetensors"
    before, after = load_safetensors(root / "stage1" / name), load_safetensors(out / name)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with safe_open(str(root / "stage1" / name), "pt") as a, safe_open(str(out / name), "pt") as b:
        assert a.metadata() == b.metadata()
    assert (out / "model.safetensors").read_bytes() == (root / "stage1" / "model.safetensors").read_bytes()


def test_a_bad_export_path_is_refused_before_training(real):
    root, replica, _ = real
    onto_model = stage_recipe(root, "unused", adapter_dir=str(root / "stage1"))
    onto_model["export"] = str(replica)  # a LoRA stage's export would replace the FLUX folder
    result = train(root, onto_model, "bad.yaml")
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: {root / 'bad.yaml'}: export: exists and is a model dir; an export replaces only")
    assert not (root / "run-unused").exists()  # nothing cached, nothing trained


def test_diffusers_fluxpipeline_loads_the_exported_lora_as_trained(real):
    from diffusers import FluxPipeline

    root, replica, _ = real
    pipe = FluxPipeline.from_pretrained(replica, local_files_only=True)
    pipe.load_lora_weights(root / "stage1" / "transformer_lora", adapter_name="trained")
    config = pipe.transformer.peft_config["trained"]
    assert (config.r, config.lora_alpha) == (RANK, RANK)
    exported = load_safetensors(root / "stage1" / "transformer_lora" / "pytorch_lora_weights.safetensors")
    for key, value in exported.items():
        module, part = key.removeprefix("transformer.").rsplit(".lora_", 1)
        layer = pipe.transformer.get_submodule(module)
        loaded = getattr(layer, f"lora_{part[0]}")["trained"].weight
        assert torch.equal(loaded, value)


def test_a_bf16_backbone_trains_fp32_lora_and_adapter_weights_close_to_the_fp32_run(real):
    """`backbone_dtype: bf16` (with bf16 autocast) halves the frozen FLUX weights; the LoRA peft adds to that
    backbone and the adapter train in fp32, and the first step's loss stays close to the fp32 run's."""
    from moviepostproduction.training.recipe import Recipe, build_compose_task

    root, _, _ = real
    recipe = stage_recipe(root, "bf16", adapter_dir=str(root / "adapter"), backbone_dtype="bf16")
    recipe["trainer"] |= {"mixed_precision": "bf16"}
    result = train(root, recipe)
    assert result.exit_code == 0, result.output
    trained = load_safetensors(root / "run-bf16" / "checkpoints" / "step-000002" / "trainable.safetensors")
    assert {v.dtype for v in trained.values()} == {torch.float32}
    assert any(".lora_" in k for k in trained) and any(k.startswith("adapter.") for k in trained)
    losses = {run: json.loads((root / run / "losses.json").read_text()) for run in ("run-stage1", "run-bf16")}
    assert losses["run-bf16"][0] == pytest.approx(losses["run-stage1"][0], rel=0.02)
    task, _ = build_compose_task(Recipe(**{**recipe, "out": str(root / "run-bf16")}))  # the cache exists: no encoders
    task.param_groups("1")
    dtypes = {n: p.dtype for n, p in task.model.transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"stage": "toy", "trainer": {"mixed_precision": "bf16"}}, "only stages 1-3 of a compose recipe"),
        ({"stage": "1"}, "needs trainer.mixed_precision: bf16, which is 'no'"),
    ],
)
def test_a_bf16_backbone_outside_frozen_stages_or_autocast_is_one_line(tmp_path, fields, expected):
    recipe = {"model": "m", "data": "d", "out": "o", "backbone_dtype": "bf16", **fields}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke_cli(["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "backbone_dtype" in lines[0] and expected in lines[0], result.output
