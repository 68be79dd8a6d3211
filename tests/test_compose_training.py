"""Compose training on tiny real models: feature cache, stages, the four losses, exact resume."""

from __future__ import annotations

import csv
import io
import math
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae, load_transformer
from moviepostproduction.errors import MppError, WeightsError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.shards import write_dataset
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.training.cache_encoders import CacheEncoders
from moviepostproduction.training.compose_task import ComposeTask, ComposeTaskConfig
from moviepostproduction.training.feature_cache import build_cache, shard_length, write_cache
from moviepostproduction.training.feature_shards import ShardedFeatures
from moviepostproduction.training.losses import (
    bbox_alignment_loss,
    crop_boxes,
    flow_loss,
    predicted_x0,
    sample_times,
    soft_argmax_centre,
)
from moviepostproduction.training.trainer import TrainConfig, Trainer

from helpers import HostSyncCounter, randomize_zero_inits

MAX_REFS, TEXT = 2, 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose-train")
    md = ModelDir.at(write_tiny_model_dir(root / "model"))
    write_dataset(root / "data", 8, 3, ToyWorldConfig(size=64, ref_size=32, max_refs=MAX_REFS), shard_size=4)
    text, image, vae = TextEncoder.load(md), ImageEncoder.load(md), Vae.load(md)
    cache = build_cache(
        root / "data" / "train", text, image, vae, max_refs=MAX_REFS, max_text_tokens=TEXT, batch_size=3, progress=False
    )
    return root, md, cache, vae, image


def make_task(md, cache, vae, image, **kw) -> ComposeTask:
    torch.manual_seed(0)
    adapter = CompositionAdapter.from_pretrained(md.root / "adapter")
    randomize_zero_inits(adapter)
    model = ConditionedFlux(load_transformer(md), adapter)
    cfg = ComposeTaskConfig(batch_size=2, aux_prob=1.0, region_prob=1.0, aux_samples=2, sample_steps=2, num_preview=2)
    return ComposeTask(model, cache, vae, image, config=ComposeTaskConfig(**{**cfg.__dict__, **kw}))


def test_feature_cache_shapes_and_round_trip(world, tmp_path):
    _, md, cache, _, _ = world
    n = len(cache)
    assert n == 7  # 8 scenes, 1 held out
    assert cache.grid == (4, 4) and cache.latents.shape == (n, 16, 64)
    assert cache.t5.shape == (n, TEXT, 32) and cache.spans.shape == (n, MAX_REFS, TEXT)
    assert cache.valid[:, 0].all() and (cache.spans.any(-1) == cache.valid).all()  # every ref caption found
    assert ((cache.bboxes[..., 2] > cache.bboxes[..., 0]) | ~cache.valid).all()
    root, encoders = world[0], CacheEncoders.wrap(TextEncoder.load(md), image_encoder=world[4], vae=world[3])
    sizes = {"max_refs": MAX_REFS, "max_text_tokens": TEXT, "batch_size": 3, "shard_size": 4, "progress": False}
    written = write_cache(root / "data" / "train", tmp_path / "c", encoders, meta={"model": str(md.root)}, **sizes)
    back = ShardedFeatures(tmp_path / "c", MAX_REFS, expect={"model": str(md.root)})
    assert len(back) == n and back.grid == written.grid == cache.grid
    for name, value in back.select(torch.arange(n)).items():
        assert torch.equal(value, cache.select(torch.arange(n))[name]), name
    with pytest.raises(WeightsError, match="was built with model="):
        ShardedFeatures(tmp_path / "c", MAX_REFS, expect={"model": "elsewhere"})
    assert cache.dino_patches.shape[:2] == (n, MAX_REFS)
    assert (cache.dino_patches.flatten(2).abs().sum(-1) > 0).eq(cache.valid).all()  # padded refs hold zeros


def test_cache_workers_encode_the_same_samples_in_the_same_order(world, tmp_path):
    """Shard files decoded by 2 spawned processes (the encoders stay in this one) against the serial build: every
    field but the VAE latents equal, the latents within fp16 rounding (batches of 32, not 3); `limit` cuts across
    shards; a recipe with cache_workers builds its cache that way; a worker's decoding error is one line."""
    root, md, cache, vae, image = world
    files = sorted((root / "data" / "train").glob("shard-*.tar"))
    assert [shard_length(file) for file in files] == [4, 3]  # 8 scenes in shards of 4, one held out
    text = TextEncoder.load(md)
    sizes = {"max_refs": MAX_REFS, "max_text_tokens": TEXT, "workers": 2, "progress": False}
    parallel = build_cache(root / "data" / "train", text, image, vae, limit=6, **sizes)
    assert len(parallel) == 6 and parallel.grid == cache.grid and parallel.fields == cache.fields
    for name in cache.fields:
        want, got = getattr(cache, name)[:6], getattr(parallel, name)
        assert got.dtype == want.dtype
        if name == "latents":
            torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=0)
        else:
            assert torch.equal(got, want), name
    result = run_train_recipe(
        world,
        tmp_path,
        "compose",
        "toy",
        cache_workers=2,
        limit=5,
        max_refs=MAX_REFS,
        max_text_tokens=TEXT,
        compose={"batch_size": 2},
    )
    assert result.exit_code == 0, result.output
    built = ShardedFeatures(tmp_path / "run" / "cache" / "train", MAX_REFS)
    assert len(built) == 5 and torch.equal(built.select(torch.arange(5))["t5"], cache.t5[:5].float())
    assert not built.has_patches  # the adapter has no box patches (box_patch_rank 0): its cache stores none
    cut = tmp_path / "cut" / "train"  # a truncated shard: found when its samples are counted, before any worker
    cut.mkdir(parents=True)
    for file in files:
        (cut / file.name).write_bytes(file.read_bytes()[: -4096 if file == files[-1] else None])
    with pytest.raises(MppError, match="shard-000001.tar: not a readable tar shard"):
        build_cache(cut, text, image, vae, **sizes)
    bad = tmp_path / "bad" / "train"  # a bad PNG: a worker's error, one line naming the shard and the sample
    bad.mkdir(parents=True)
    (bad / files[0].name).write_bytes(files[0].read_bytes())
    with tarfile.open(files[1]) as src, tarfile.open(bad / files[1].name, "w") as dst:
        for member in src.getmembers():
            body = b"not a png" if member.name.endswith(".scene.png") else src.extractfile(member).read()
            member.size = len(body)
            dst.addfile(member, io.BytesIO(body))
    with pytest.raises(MppError, match=r"shard-000001.tar: sample '\d+' is incomplete or corrupt"):
        build_cache(bad, text, image, vae, **sizes)


def test_a_cache_without_patch_tokens_loads_and_is_refused_for_box_patches(world, tmp_path):
    from dataclasses import replace

    _, md, cache, vae, image = world
    back = replace(cache, dino_patches=None)  # a cache built for an adapter without box patches
    assert back.dino_patches is None and "dino_patches" not in back.select(torch.tensor([0]))
    adapter = CompositionAdapter.from_pretrained(md.root / "adapter").reconfigured(box_patch_rank=4)[0]
    model = ConditionedFlux(load_transformer(md), adapter)
    with pytest.raises(ValueError, match="the feature cache holds none .* delete the run's cache/ to rebuild it"):
        ComposeTask(model, back, vae, image)


def test_toy_stage_trains_everything_with_all_four_losses_and_resumes_exactly(world, tmp_path):
    _, md, cache, vae, image = world
    full = make_task(md, cache, vae, image)
    cfg = dict(stage="toy", checkpoint_every=2, log_every=1, progress=False, tensorboard=False)
    a = Trainer(full, TrainConfig(out_dir=str(tmp_path / "a"), max_steps=3, **cfg)).run()
    assert {"flow", "identity", "bbox", "region"} <= set(a.logs[0])  # identity: fg refs have alpha >= 0.5
    Trainer(make_task(md, cache, vae, image), TrainConfig(out_dir=str(tmp_path / "b"), max_steps=2, **cfg)).run()
    b = Trainer(make_task(md, cache, vae, image), TrainConfig(out_dir=str(tmp_path / "b"), max_steps=3, **cfg)).run()
    assert b.losses == a.losses
    assert (tmp_path / "a" / "samples" / "step-000003.png").is_file()


def test_the_trainer_moves_the_frozen_vae_and_image_encoder_but_checkpoints_trained_weights_only(
    world, tmp_path, monkeypatch
):
    """The decoded losses run the VAE and DINO on the model's device (a CUDA run once failed with them left on the
    CPU): the task hands them to the trainer, which moves every module of `modules()`; they never enter checkpoints."""
    _, md, cache, vae, image = world
    task = make_task(md, cache, vae, image)
    assert task.modules()["vae"] is vae and task.modules()["image_encoder"] is image
    moved = []
    for name, module in task.modules().items():
        monkeypatch.setattr(module, "to", lambda device, name=name, m=module: moved.append(name) or m, raising=False)
    Trainer(task, TrainConfig(out_dir=str(tmp_path), stage="toy", max_steps=1, progress=False, tensorboard=False))
    assert moved == ["transformer", "adapter", "vae", "image_encoder"]
    monkeypatch.undo()
    result = Trainer(
        task, TrainConfig(out_dir=str(tmp_path), stage="toy", max_steps=1, progress=False, tensorboard=False)
    ).run()
    keys = load_file(result.checkpoint / "trainable.safetensors").keys()
    assert {key.split(".")[0] for key in keys} == {"transformer", "adapter"}
    no_decoder = make_task(md, cache, None, None)
    assert set(no_decoder.modules()) == {"transformer", "adapter"}


def test_host_syncs_of_a_training_step_do_not_grow_with_the_batch(world):
    """On a GPU every read of a tensor as a Python number, nonzero, unique or boolean-mask index waits for the device;
    region maps once made ~1000 of them per step of 256 scenes (one unique per sample) and left an H200 a quarter
    busy. A step with every loss (the decoded ones and region preservation; two forwards) makes the same few at 2
    scenes and at 6 (the same two scenes three times, so every data-dependent branch is taken alike)."""
    _, md, cache, vae, image = world
    calls = []
    for repeat in (1, 3):
        task = make_task(md, cache, vae, image, drop_refs=0.0)
        task.param_groups("toy")
        task.layout_t = 0.0  # the layout pathway at every time: no random branch
        with HostSyncCounter() as syncs:
            task.loss(torch.arange(2).repeat(repeat), torch.Generator().manual_seed(0)).loss.backward()
        assert {"identity", "bbox", "region"} <= set(task.weights)
        calls.append(syncs.calls)
    assert calls[0] == calls[1]
    assert sum(calls[0].values()) <= 64, calls[0]  # 51 now: a few per forward (region maps, input checks, packing)


@pytest.mark.parametrize(
    ("stage", "trained", "frozen"),
    [
        ("1", ["adapter.layout_head", "adapter.assemble", "lora_A"], ["adapter.modulation_head", "adapter.feedback"]),
        (
            "2",
            ["adapter.modulation_head", "adapter.layout_head", "lora_B"],
            ["adapter.feedback", "blocks.0.ff"],
        ),
    ],
)
def test_stages_train_their_modules_only(world, stage, trained, frozen):
    _, md, cache, vae, image = world
    task = make_task(md, cache, vae, image)
    groups = task.param_groups(stage)
    names = [
        n
        for m, mod in task.modules().items()
        for n_, p in mod.named_parameters()
        if p.requires_grad
        for n in [f"{m}.{n_}"]
    ]
    assert all(any(t in n for n in names) for t in trained)
    assert not any(f in n for n in names for f in frozen if "lora_" not in n)
    assert groups[0]["lr"] == {"1": 1e-4, "2": 5e-6}[stage]
    out = task.loss(torch.arange(2), torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is not None for p in groups[0]["params"] if p.grad is not None) and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in groups[0]["params"]
    )


def test_predicted_x0_inverts_the_noising_and_the_flow_target_is_noise_minus_x0():
    x0, noise, t = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.rand(3)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * noise
    assert torch.allclose(predicted_x0(x_t, noise - x0, t), x0, atol=1e-6)
    assert flow_loss(noise - x0, x0, noise) == 0 and flow_loss(noise, x0, noise) == x0.pow(2).mean()


def test_training_times_are_the_sigmoid_of_the_step_generators_normal_draws():
    z = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample_times(1000, torch.Generator().manual_seed(3), torch.device("cpu")), torch.sigmoid(z))


def test_crop_boxes_cuts_the_box():
    img = torch.zeros(1, 3, 8, 8)
    img[:, :, 2:6, 4:8] = 1.0  # a block at x in [0.5, 1), y in [0.25, 0.75)
    crops = crop_boxes(img, torch.tensor([[[0.5, 0.25, 1.0, 0.75], [0.0, 0.0, 0.5, 0.25]]]), 4)
    assert crops.shape == (2, 3, 4, 4) and torch.allclose(crops[0], torch.ones(3, 4, 4)) and crops[1].abs().max() == 0


def test_soft_argmax_finds_the_matching_patch_and_bbox_loss_is_zero_there():
    patches = torch.zeros(1, 16, 4)
    patches[0, :, 1] = 1.0
    patches[0, 9] = torch.tensor([1.0, 0, 0, 0])  # row 2, col 1 of a 4x4 grid -> centre (0.375, 0.625)
    ref = torch.tensor([[[1.0, 0, 0, 0]]])
    centre = soft_argmax_centre(patches, (4, 4), ref, temperature=0.01)
    assert torch.allclose(centre, torch.tensor([[[0.375, 0.625]]]), atol=1e-3)
    box = torch.tensor([[[0.25, 0.5, 0.5, 0.75]]])
    assert bbox_alignment_loss(patches, (4, 4), ref, box, torch.ones(1, 1)) < 0.1  # temperature 0.1 blurs a bit
    far = torch.tensor([[[0.75, 0.0, 1.0, 0.25]]])
    assert bbox_alignment_loss(patches, (4, 4), ref, far, torch.ones(1, 1)) > 0.5


def test_mpp_train_recipe_caches_trains_exports_and_the_export_composes(world, tmp_path):
    import json

    import yaml
    from typer.testing import CliRunner

    from moviepostproduction.cli import app
    from moviepostproduction.compose.pipeline import ComposePipeline

    root, md, _, _, _ = world
    recipe = {
        "model": str(md.root),
        "data": str(root / "data"),
        "out": str(tmp_path / "run"),
        "stage": "toy",
        "max_refs": MAX_REFS,
        "max_text_tokens": TEXT,
        "export": str(tmp_path / "exported"),
        "ref_guidance": 2.0,
        "noise_temperature": 0.8,
        "trainer": {"max_steps": 2, "checkpoint_every": 1, "progress": False},
        "compose": {"batch_size": 2, "sample_steps": 2, "num_preview": 1},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    assert "trained to step 2" in result.output
    assert (tmp_path / "run" / "cache" / "train" / "index.json").is_file()
    assert (tmp_path / "run" / "curves.png").is_file() and list((tmp_path / "run" / "samples").glob("*.png"))
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["max_text_tokens"] == TEXT and not index["tiny_random"]
    from moviepostproduction.files import load_safetensors

    stored = load_safetensors(next((tmp_path / "exported" / "transformer").glob("*.safetensors")))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}  # export_dtype fp16
    from moviepostproduction.files import default_file_mode

    weights = [*(tmp_path / "exported").rglob("*.safetensors"), *(tmp_path / "run").rglob("*.safetensors")]
    assert {oct(f.stat().st_mode & 0o777) for f in weights} == {oct(default_file_mode())}  # never 0600
    pipe = ComposePipeline.from_model_dir(tmp_path / "exported")
    assert pipe.dtype == torch.float32
    assert pipe.defaults.max_text_tokens == TEXT and pipe.defaults.ref_guidance_scale == 2.0  # the recipe's
    assert pipe.defaults.noise_temperature == 0.8  # via model_index.json
    assert pipe.label.endswith(", 2 steps)")
    (tmp_path / "exported" / "nanodit").mkdir()
    (tmp_path / "exported" / "nanodit" / "config.json").write_text("{}")  # another recipe's weights
    again = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml"), "--max-steps", "3"])  # resumes at step 2
    assert again.exit_code == 0 and "trained to step 3" in again.output
    assert (tmp_path / "exported" / "nanodit" / "config.json").read_text() == "{}"  # kept by the re-export
    assert ComposePipeline.from_model_dir(tmp_path / "exported").label.endswith(", 3 steps)")
    assert json.loads((tmp_path / "exported" / "model_index.json").read_text())["trained_steps"] == 3
    # A next cycle loads the export as its model dir (no warm start): its count goes on from the export's.
    cycle = {
        **recipe,
        "model": str(tmp_path / "exported"),
        "out": str(tmp_path / "run2"),
        "export": str(tmp_path / "e2"),
    }
    (tmp_path / "r2.yaml").write_text(yaml.safe_dump({**cycle, "trainer": {**recipe["trainer"], "max_steps": 1}}))
    assert CliRunner().invoke(app, ["train", str(tmp_path / "r2.yaml")]).exit_code == 0
    assert json.loads((tmp_path / "e2" / "model_index.json").read_text())["trained_steps"] == 4
    assert ComposePipeline.from_model_dir(tmp_path / "e2").label.endswith(", 4 steps)")
    # Or a run on the first model dir starts from the export's weights (init_from: a model dir), its cache kept.
    warm = {**recipe, "out": str(tmp_path / "run3"), "export": str(tmp_path / "e3"), "init_from": cycle["model"]}
    (tmp_path / "r3.yaml").write_text(yaml.safe_dump({**warm, "trainer": {**recipe["trainer"], "max_steps": 1}}))
    assert CliRunner().invoke(app, ["train", str(tmp_path / "r3.yaml")]).exit_code == 0
    report = json.loads((tmp_path / "run3" / "warm_start.json").read_text())
    trained = load_safetensors(tmp_path / "run" / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert sorted(report["loaded"]) == sorted(trained) and report["missing"] == report["unexpected"] == []
    assert json.loads((tmp_path / "e3" / "model_index.json").read_text())["trained_steps"] == 4

    args = ["eval", "--model", str(tmp_path / "exported"), "--n", "2", "--steps", "2", "--leak-scenes", "1"]
    scored = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "eval")])
    assert scored.exit_code == 0, scored.output
    header = next(line for line in scored.output.splitlines() if line.startswith("| model"))
    assert [c.strip() for c in header.strip("|").split("|")][:2] == ["model", "IoU"]
    assert "heldout split, scenes 0-1, 28 steps" not in scored.output
    assert ", ref guidance 2, noise temperature 0.8, " in scored.output
    validation = CliRunner().invoke(
        app, [*args, "--split", "train", "--start", "5", "--variants", "model", "--noise-temperature", "1"]
    )
    assert validation.exit_code == 0
    world = "train split of the model's toy world (64 px, 1-2 refs), scenes 5-6, "  # the scenes' size and counts
    assert world + "2 steps, ref guidance 2, noise temperature 1, " in validation.output
    rows = json.loads((tmp_path / "eval" / "eval.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["model", "layout-only", "modulation-only", "untrained", "vae-roundtrip"]
    assert math.isnan(rows[-1]["leakage"])  # the round trip generates nothing: leakage is not defined
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["ref_guidance"] == 2.0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["noise_temperature"] == 0.8
    assert all(0.0 <= r["IoU"] <= 1.0 for r in rows)
    assert len({(r["fg refs (seen pairs)"], r["fg refs (unseen pairs)"]) for r in rows}) == 1  # same refs judged
    assert (
        f"fg refs judged for identity: {rows[0]['fg refs (seen pairs)']} with a (shape, colour) pair seen in"
        in (tmp_path / "eval" / "eval.md").read_text()
    )
    from PIL import Image

    assert Image.open(tmp_path / "eval" / "grid.png").size == (6 * 64, 2 * 64)  # target + 5 variants, 2 scenes
    with open(tmp_path / "eval" / "samples.csv", newline="") as f:
        samples = list(csv.DictReader(f))  # one row per variant, scene, ref and seed
    assert len(samples) == sum(r["refs"] for r in rows) and [s["model"] for s in samples[:1]] == ["model"]
    judged = [s["identity"] == "True" for s in samples if s["model"] == "model" and s["judged"] == "True"]
    assert len(judged) == rows[0]["fg refs (seen pairs)"] + rows[0]["fg refs (unseen pairs)"]
    assert sum(judged) / len(judged) == pytest.approx(rows[0]["fg identity"])
    # Several seeds per scene: seed 0 is the scene's own (the run above), the table pools every seed's samples.
    two = CliRunner().invoke(
        app, [*args, "--seeds", "2", "--variants", "model,vae-roundtrip", "--out", str(tmp_path / "e2s")]
    )
    assert two.exit_code == 0, two.output
    report = json.loads((tmp_path / "e2s" / "eval.json").read_text())
    model_row, roundtrip = report["rows"]
    assert report["seeds"] == 2 and model_row["refs"] == 2 * rows[0]["refs"]
    assert len(model_row["fg identity per seed"]) == 2
    assert model_row["fg identity per seed"][0] == rows[0]["fg identity"]  # seed 0 = the single-seed run
    assert model_row["fg identity"] == pytest.approx(sum(model_row["fg identity per seed"]) / 2)  # same refs per seed
    assert roundtrip["fg identity per seed"] == [rows[-1]["fg identity"]] * 2  # the round trip has no noise
    assert "2 seeds per scene (0-1; the table pools them" in two.output and "model fg identity per seed: " in two.output
    assert "2 seeds per scene" in (tmp_path / "e2s" / "eval.md").read_text()
    # --first-seed draws later seeds alone: seed 1 of the pooled run, sample for sample.
    later = CliRunner().invoke(
        app, [*args, "--first-seed", "1", "--variants", "model", "--leak-scenes", "0", "--out", str(tmp_path / "e1")]
    )
    assert later.exit_code == 0, later.output
    assert "1 seeds per scene (1-1; the table pools them" in later.output
    (seed1,) = json.loads((tmp_path / "e1" / "eval.json").read_text())["rows"]
    assert json.loads((tmp_path / "e1" / "eval.json").read_text())["first_seed"] == 1
    assert seed1["fg identity per seed"] == [model_row["fg identity per seed"][1]]
    assert CliRunner().invoke(app, [*args, "--first-seed", "-1"]).exit_code == 2
    assert f"fg refs judged for identity: {rows[0]['fg refs (seen pairs)']} with" in two.output  # refs, not samples
    assert CliRunner().invoke(app, [*args, "--seeds", "0"]).exit_code == 2
    bad = CliRunner().invoke(app, [*args, "--variants", "model,best"])
    assert bad.exit_code == 2 and "--variants: " in bad.output and "best" in bad.output
    empty = CliRunner().invoke(app, [*args, "--variants", " , "])
    assert empty.exit_code == 2 and "--variants: expected some of model, " in empty.output


def test_mpp_train_bad_recipe_is_one_line_exit_2(tmp_path):
    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    (tmp_path / "r.yaml").write_text(
        "model: m\nout: o\nsteps: 3\nexport_dtype: fp8\nref_guidance: -1\nnoise_temperature: 0\n"
    )
    result = CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    assert "steps: unknown field" in result.output and "data: required" in result.output
    assert "export_dtype: expected one of fp16, bf16, fp32 (got 'fp8')" in result.output
    assert "ref_guidance: must be a finite number >= 0 (got -1)" in result.output
    assert "noise_temperature: must be a positive number (got 0)" in result.output
    assert "Traceback" not in result.output
    (tmp_path / "w.yaml").write_text("model: m\ndata: d\nout: o\ncache_workers: 0\n")
    workers = CliRunner().invoke(app, ["train", str(tmp_path / "w.yaml")])
    assert workers.exit_code == 2 and "cache_workers: must be a positive integer (got 0)" in workers.output


def run_train_recipe(world, tmp_path, task: str, stage: str, **fields):
    """`mpp train` on a one-step recipe for `task` over the tiny world; returns the CLI result."""
    import yaml
    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    root, md, _, _, _ = world
    recipe = {
        "task": task,
        "model": str(md.root),
        "data": str(root / "data"),
        "out": str(tmp_path / "run"),
        "stage": stage,
        "export": str(tmp_path / "exported"),
        "trainer": {"max_steps": 1, "progress": False, "tensorboard": False, "sample_every": 0},
        **fields,
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return CliRunner().invoke(app, ["train", str(tmp_path / "r.yaml")])


def test_mpp_train_runs_a_fill_recipe(world, tmp_path):
    fill = {"batch_size": 1, "scenes": 2, "train_x_embedder": True, "sample_count": 1, "sample_steps": 1}
    result = run_train_recipe(world, tmp_path, "fill", "all", fill=fill)
    assert result.exit_code == 0, result.output
    assert "trained to step 1" in result.output and (tmp_path / "exported" / "fill").is_dir()


def test_mpp_train_runs_a_vary_recipe_and_exports_nanodit(world, tmp_path):
    result = run_train_recipe(world, tmp_path, "vary", "full", limit=4, vary={"batch_size": 2})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exported" / "nanodit" / "model.safetensors").is_file()


def test_mpp_train_recipe_reconfigures_the_adapter(world, tmp_path):
    import json

    compose = {"batch_size": 2}
    bad = run_train_recipe(world, tmp_path, "compose", "toy", adapter={"box_position_freq": 2}, compose=compose)
    assert bad.exit_code == 2 and "adapter.box_position_freq: unknown ConditioningConfig field" in bad.output
    negative = run_train_recipe(world, tmp_path, "compose", "toy", adapter={"box_position_freqs": -1}, compose=compose)
    assert negative.exit_code == 2 and "box_position_freqs=-1 must be an integer in [0, 1024]" in negative.output
    listed = run_train_recipe(world, tmp_path, "compose", "toy", adapter=[4], compose=compose)
    assert (
        listed.exit_code == 2 and "adapter: must be a mapping of ConditioningConfig fields (got [4])" in listed.output
    )
    worded = run_train_recipe(world, tmp_path, "compose", "toy", adapter={"depth_priority": "yes"}, compose=compose)
    assert worded.exit_code == 2 and "depth_priority='yes' must be 3 finite numbers (fg, mg, bg)" in worded.output
    assert "Traceback" not in bad.output + negative.output + listed.output + worded.output
    changes = {"box_position_freqs": 2, "box_position_rank": 4, "box_patch_rank": 4, "depth_priority": [3, 0, 0]}
    result = run_train_recipe(world, tmp_path, "compose", "toy", adapter=changes, max_refs=MAX_REFS, compose=compose)
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "exported" / "adapter" / "config.json").read_text())
    assert (saved["box_position_freqs"], saved["box_position_rank"], saved["box_patch_rank"]) == (2, 4, 4)
    assert saved["depth_priority"] == [3, 0, 0]
    assert ShardedFeatures(tmp_path / "run" / "cache" / "train", MAX_REFS).has_patches  # box patches: stored
    plain = run_train_recipe(world, tmp_path, "compose", "toy", max_refs=MAX_REFS, compose=compose)  # same cache/
    assert plain.exit_code == 2 and "cache was built with patches='True', not 'False'; delete it" in plain.output
    from moviepostproduction.compose.pipeline import ComposePipeline

    pipe = ComposePipeline.from_model_dir(tmp_path / "exported")
    assert pipe.model.adapter.uses_box_positions and pipe.model.adapter.uses_box_patches
    assert pipe.model.adapter.assemble["0"].patches.out.weight.abs().sum() > 0  # trained from its zero init
    assert pipe.model.adapter.cfg.uses_occlusion_priority
    from moviepostproduction.scene import load_scene

    examples = Path(__file__).resolve().parents[1] / "examples"
    scene = load_scene(examples / "scene.json")
    cond = pipe.prepare(scene).conditioning
    assert cond.ref_patches.shape[:2] == (1, len(scene.refs)) and cond.token_extent.shape == (1, len(scene.refs), 2)
    assert pipe(scene, num_inference_steps=2).images[0].size == (scene.width, scene.height)
    assert "image_position_scale" not in json.loads((tmp_path / "exported" / "model_index.json").read_text())


def test_an_epoch_draws_every_scene_once_in_a_seeded_order(world):
    _, md, cache, vae, image = world
    n = len(cache)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 7919 + 1))
    task = make_task(md, cache, vae, image)
    assert [b.tolist() for b in task.batches(1, 5)] == [order[i : i + 2].tolist() for i in range(0, n - 1, 2)]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"deepen": {"double_blocks": 2}}, "deepen: unknown field"),
        *[
            ({"compose": {"batch_size": 2, knob: 1}}, f"compose.{knob}: unknown field")
            for knob in ("box_loss_weight", "time_mu", "overlap_repeat", "frozen_parts", "image_position_scale")
        ],
    ],
)
def test_the_removed_experiment_fields_are_unknown_fields(world, tmp_path, fields, named):
    """The one-off knobs of experiments that did not ship are gone (experiments/README.md): a recipe naming one fails
    with a one-line error, before anything is cached."""
    bad = run_train_recipe(world, tmp_path, "compose", "toy", **fields)
    assert bad.exit_code == 2 and named in bad.output and "Traceback" not in bad.output


def test_drop_caption_trains_those_samples_on_the_empty_caption_without_spans(world):
    _, md, cache, vae, image = world
    with pytest.raises(ValueError, match="drop_caption > 0 needs the empty caption"):
        make_task(md, cache, vae, image, drop_caption=0.5)
    with torch.no_grad():
        empty = TextEncoder.load(md).encode([""], TEXT)  # what ComposePipeline.prepare encodes for negative ""
    task = make_task(md, cache, vae, image)
    task.config.drop_caption, task.empty_caption = 1.0, (empty.t5, empty.pooled)
    batch = cache.select(torch.arange(3))
    out = task.without_caption(batch, torch.tensor([True, False, True]))
    for k in (0, 2):
        assert torch.equal(out["t5"][k], empty.t5[0].to(out["t5"])) and torch.equal(out["pooled"][k], empty.pooled[0])
        assert not out["spans"][k].any()
    assert torch.equal(out["t5"][1], batch["t5"][1]) and torch.equal(out["spans"][1], batch["spans"][1])
    assert batch["spans"][0].any()  # the toy captions name their refs: there was something to clear
    seen = []
    forward = task.forward
    task.forward = lambda b, *a, **kw: seen.append(b["t5"]) or forward(b, *a, **kw)
    out = task.loss(torch.arange(2), torch.Generator().manual_seed(0))
    assert math.isfinite(out.logs["flow"]) and seen
    assert all(torch.equal(t5, empty.t5.to(t5).expand_as(t5)) for t5 in seen)  # drop_caption 1: every sample


@pytest.mark.parametrize("value", [0.5, 1.5, "often"])
def test_mpp_train_recipe_checks_and_uses_drop_caption(world, tmp_path, value):
    result = run_train_recipe(world, tmp_path, "compose", "toy", compose={"batch_size": 2, "drop_caption": value})
    if value == 0.5:
        assert result.exit_code == 0, result.output
        return
    shown = repr(value) if isinstance(value, str) else str(value)
    assert (
        result.exit_code == 2
        and f"compose.drop_caption: must be a probability in [0, 1] (got {shown})" in result.output
    )
    assert "Traceback" not in result.output


def test_warm_start_steps_follow_the_chain_of_checkpoints(tmp_path):
    import json

    from moviepostproduction.training.recipe import warm_start_steps

    def checkpoint(name: str, step: int, init_from: str | None) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text(json.dumps({"step": step, "config": {"init_from": init_from}}))
        return str(tmp_path / name)

    first = checkpoint("a", 35000, None)
    second = checkpoint("b", 17750, first)
    assert warm_start_steps(None) == 0 and warm_start_steps(first) == 35000 and warm_start_steps(second) == 52750
    assert warm_start_steps(checkpoint("c", 5, str(tmp_path / "gone"))) is None  # a broken chain: unknown
    assert warm_start_steps(checkpoint("d", 5, str(tmp_path / "d"))) is None  # a loop
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model_index.json").write_text(json.dumps({"trained_steps": 162000}))
    assert warm_start_steps(checkpoint("e", 1500, str(tmp_path / "export"))) == 163500  # a chain from an export
    (tmp_path / "export" / "model_index.json").write_text(json.dumps({"label": "no count"}))
    assert warm_start_steps(str(tmp_path / "export")) is None


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples" / "train").glob("*.yaml")))
def test_every_example_recipe_is_valid(path):
    from moviepostproduction.training.recipe import Recipe, _task_config, _trainer_config

    recipe = Recipe.from_file(path)  # unknown / missing fields raise
    _trainer_config(recipe)
    if recipe.task == "compose":
        _task_config(recipe)
