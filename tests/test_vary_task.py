"""`VaryTask` (training/vary_task.py): cached toy-world features from a model dir's frozen encoders, the loss,
stages, batches, a short run through the shared Trainer, and the validation protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
from moviepostproduction.errors import MppError, WeightsError
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.training.task import TrainTask
from moviepostproduction.training.trainer import TrainConfig, Trainer
from moviepostproduction.training.vary_data import VaryFeatures, build_vary_features, scene_signature
from moviepostproduction.training.vary_task import (
    VaryTask,
    VaryTaskConfig,
    _conditioning,
    build_vary_task,
    nanodit_config_for,
    validate_vary,
)
from moviepostproduction.vary.nanodit import PRESETS, NanoDiT

from helpers import randomize_zero_inits

WORLD = ToyWorldConfig(size=64)
N, TOKENS = 8, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="module")
def encoders(model_dir):
    return TextEncoder.load(model_dir), ImageEncoder.load(model_dir), Vae.load(model_dir)


@pytest.fixture(scope="module")
def features(encoders) -> VaryFeatures:
    return build_vary_features(N, 0, *encoders, world=WORLD, max_text_tokens=TOKENS, batch_size=4, progress=False)


def make_task(features, encoders, randomize: bool = True, **config) -> VaryTask:
    torch.manual_seed(0)
    model = NanoDiT(nanodit_config_for(features, "tiny"))
    if randomize:
        randomize_zero_inits(model, std=0.1)
    return VaryTask(model, features, encoders[2], VaryTaskConfig(**{"batch_size": 4, "sample_steps": 2, **config}))


# ------------------------------------------------------------------------------------------------ features
def test_features_hold_latents_caption_and_both_dino_inputs_per_scene(features, encoders):
    scene = generate_scene(3, 0, WORLD)
    assert features.latents.shape == (N, 16, 8, 8)  # 64 px scenes, VAE 8x, 16 channels
    assert features.text.shape == (N, TOKENS, 32) and features.text_mask.dtype == torch.bool
    assert features.scene_cls.shape == features.ref_cls.shape == (N, 40)  # tiny DINO width
    assert features.scene_patches.shape == features.ref_patches.shape == (N, 16, 40)  # 32 px / 8 px patches
    assert torch.equal(features.pixels[3], torch.from_numpy(scene.image).permute(2, 0, 1))
    assert torch.equal(features.ref_pixels[3], torch.from_numpy(scene.refs[0].image).permute(2, 0, 1))
    text, image, _ = encoders
    dino = image.encode([Image.fromarray(scene.refs[0].image)])
    assert torch.allclose(features.ref_cls[3].float(), dino.dino_cls[0], atol=1e-2)  # cached as float16
    caption = text.encode([scene.caption], max_t5_tokens=TOKENS)
    assert torch.equal(features.text_mask[3], caption.t5_mask[0])
    assert not torch.allclose(features.scene_cls[3], features.ref_cls[3])


def test_feature_cache_round_trips_and_refuses_another_build(features, model_dir, tmp_path):
    meta = scene_signature(model_dir, WORLD, 0, "train", N, TOKENS)
    path = features.save(tmp_path / "train.safetensors", meta)
    loaded = VaryFeatures.load(path, expect=meta)
    assert all(torch.equal(getattr(loaded, k), getattr(features, k)) for k in ("latents", "text_mask", "fg_colour"))
    other = scene_signature(model_dir, WORLD, 1, "train", N, TOKENS)
    with pytest.raises(WeightsError, match="was built with seed='0', not '1'; delete it to rebuild"):
        VaryFeatures.load(path, expect=other)


# ---------------------------------------------------------------------------------------------------- task
def test_task_follows_the_train_task_protocol_and_checks_model_sizes(features, encoders):
    task = make_task(features, encoders)
    assert isinstance(task, TrainTask) and set(task.modules()) == {"nanodit", "vae"}
    wrong = NanoDiT(PRESETS["tiny"])  # text 16 / DINO 24 x 4: not the tiny encoders' sizes
    with pytest.raises(MppError, match=r"model.config.text_dim: the features need 32 \(got 16\)"):
        VaryTask(wrong, features)
    with pytest.raises(MppError, match="ref_prob: must be a probability"):
        VaryTaskConfig(ref_prob=1.5)
    with pytest.raises(MppError, match="probabilities sum to 1.1"):
        VaryTaskConfig(uncond=0.2)


def test_each_sample_takes_its_dino_input_from_the_reference_or_the_scene(features):
    feats = features.select(torch.arange(4))
    use_ref = torch.tensor([True, False, True, False])
    cond = _conditioning(feats, use_ref)
    assert torch.equal(cond.cls[0], feats["ref_cls"][0]) and torch.equal(cond.cls[1], feats["scene_cls"][1])
    assert torch.equal(cond.patches[2], feats["ref_patches"][2]) and torch.equal(
        cond.patches[3], feats["scene_patches"][3]
    )
    assert torch.equal(cond.text, feats["text"]) and torch.equal(cond.text_mask, feats["text_mask"])


def test_loss_is_seeded_and_trains_every_parameter_of_the_stage(features, encoders):
    task = make_task(features, encoders)
    groups = task.param_groups("full")
    batch = next(task.batches(0, 0))
    a = task.loss(batch, torch.Generator().manual_seed(1))
    b = task.loss(batch, torch.Generator().manual_seed(1))
    c = task.loss(batch, torch.Generator().manual_seed(2))
    assert a.loss.ndim == 0 and torch.isfinite(a.loss) and a.loss == b.loss and a.loss != c.loss
    assert set(a.logs) == {"flow", "ref_share"}
    a.loss.backward()
    trained = {n for n, p in task.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert "patch_proj.weight" in trained and "final_layer.linear.weight" in trained
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in task.model.parameters())
    assert all(not p.requires_grad for p in task.vae.parameters())


def test_stages_pick_parameters_and_learning_rates(features, encoders):
    task = make_task(features, encoders, lr=1e-3)
    patch = task.param_groups("patch")[0]
    names = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert names == {"patch_proj.weight", "patch_proj.bias", "patch_null"} and patch["lr"] == 1e-3
    assert task.param_groups("warm")[0]["lr"] == 5e-4  # seed 003: half the rate after a warm start
    with pytest.raises(MppError, match="stage: vary stages are full, warm, patch"):
        task.param_groups("lora")


def test_batches_are_a_fixed_shuffle_per_epoch_and_seed(features, encoders):
    task = make_task(features, encoders)
    first = [b.tolist() for b in task.batches(0, 0)]
    assert first == [b.tolist() for b in task.batches(0, 0)] and len(first) == N // 4
    assert sorted(i for b in first for i in b) == list(range(N))
    assert first != [b.tolist() for b in task.batches(1, 0)]
    too_big = make_task(features, encoders, batch_size=N + 1)
    with pytest.raises(MppError, match="batch_size: exceeds the 8 cached scenes"):
        next(too_big.batches(0, 0))


def test_three_steps_through_the_shared_trainer_write_a_checkpoint_and_a_sample_grid(features, encoders, tmp_path):
    task = make_task(features, encoders, randomize=False, num_preview=2)
    cfg = TrainConfig(
        out_dir=str(tmp_path / "run"), stage="full", max_steps=3, checkpoint_every=3, log_every=1,
        progress=False, tensorboard=False,
    )  # fmt: skip
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    result = Trainer(task, cfg).run()
    assert result.step == 3 and len(result.losses) == 3 and all(np.isfinite(result.losses))
    assert result.checkpoint is not None and result.checkpoint.is_dir()
    changed = [k for k, v in task.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "final_layer.linear.weight" in changed  # the zero-initialised output layer learns first
    grid = Image.open(tmp_path / "run" / "samples" / "step-000003.png")
    assert grid.size == (5 * 64, 2 * 64)  # [ref | scene | from scene | from ref | text only] x 2 rows


def test_build_vary_task_caches_features_once(model_dir, tmp_path):
    task = build_vary_task(model_dir, n=4, preview_n=2, max_text_tokens=TOKENS, cache_dir=tmp_path, base="tiny",
                           config=VaryTaskConfig(batch_size=2), progress=False)  # fmt: skip
    assert len(task.features) == 4 and len(task.preview) == 2
    assert (tmp_path / "train.safetensors").is_file() and (tmp_path / "heldout.safetensors").is_file()
    again = build_vary_task(model_dir, n=4, preview_n=2, max_text_tokens=TOKENS, cache_dir=tmp_path, base="tiny",
                            progress=False)  # fmt: skip
    assert torch.equal(again.features.latents, task.features.latents)
    assert task.model.config.text_dim == 32 and task.model.config.hidden_size == PRESETS["tiny"].hidden_size


def test_validation_reports_reconstruction_swap_and_text_only(features, encoders):
    task = make_task(features, encoders)
    report = validate_vary(task.model, features, task.vae, n=3, steps=2)
    assert set(report) == {
        "reconstruction_mse",
        "swap_mse_to_features",
        "swap_mse_to_caption",
        "swap_follows_features",
        "text_only_mse",
        "text_only_image_gain",
        "fg_colour_with_image",
        "fg_colour_text_only",
    }
    assert all(np.isfinite(v) for v in report.values())
    assert 0.0 <= report["swap_follows_features"] <= 1.0 and report["reconstruction_mse"] > 0
    with pytest.raises(MppError, match="n: the feature swap needs at least 2 scenes"):
        validate_vary(task.model, features, task.vae, n=1)
