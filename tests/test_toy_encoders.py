"""Toy-world frozen parts: the toy model dir, tokenizer coverage of the captions, VAE and encoder training tasks,
latent normalisation and the probes that measure the features (tiny sizes; the real run is
scripts/train_toy_encoders.py, docs/toy-model.md)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
from moviepostproduction.errors import ValidationError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import (
    TinySpec,
    rope_axes,
    tiny_configs,
    tiny_tokenizers,
    train_tiny_tokenizers,
    write_tiny_model_dir,
)
from moviepostproduction.toyworld.toy_build import ToyEncodersConfig
from moviepostproduction.toyworld.toy_data import (
    ATTRIBUTES,
    IGNORE,
    build_caption_pool,
    build_sprite_pool,
    generate_scenes,
    permute_channels,
    scene_pixels,
)
from moviepostproduction.toyworld.toy_encoders import EncoderTask, EncoderTrainConfig
from moviepostproduction.toyworld.toy_model import TOY_SPEC, TRAINED_BY_ENCODERS, toy_caption_words, write_toy_model_dir
from moviepostproduction.toyworld.toy_probe import image_features, probe_accuracy
from moviepostproduction.toyworld.toy_vae import VaeTask, VaeTrainConfig, latent_stats
from moviepostproduction.training.task import TrainTask

SPEC = TinySpec()
WORLD = ToyWorldConfig(size=64, ref_size=32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("toy") / "init", seed=0, spec=SPEC)


@pytest.fixture(scope="module")
def scenes():
    return generate_scenes(0, 6, "train", WORLD)


@pytest.fixture
def loaded(tiny_dir: Path):
    """Fresh (text, image, vae) loaded with the real loaders: tests may train them."""
    return TextEncoder.load(tiny_dir), ImageEncoder.load(tiny_dir), Vae.load(tiny_dir)


def _steps(task, batch, n: int, stage: str = "1") -> list[float]:
    """n Adam steps on one fixed batch with one fixed generator seed; the losses before each step."""
    params = [p for g in task.param_groups(stage) for p in g["params"]]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(n):
        out = task.loss(batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    return losses


# --- the toy model dir ------------------------------------------------------------------------------------


def test_toy_spec_is_wired_like_flux() -> None:
    cfg = tiny_configs(TOY_SPEC)
    assert cfg.adapter.hidden_dim == cfg.transformer["num_attention_heads"] * cfg.transformer["attention_head_dim"]
    assert sum(rope_axes(TOY_SPEC.head_dim)) == TOY_SPEC.head_dim
    assert cfg.transformer["joint_attention_dim"] == cfg.text_encoder_2.d_model == 64
    assert cfg.adapter.clip_dim == cfg.image_clip.projection_dim and cfg.adapter.dino_dim == cfg.image_dino.hidden_size
    assert 2 ** (len(cfg.vae["block_out_channels"]) - 1) == 8  # FLUX's 8x VAE


@pytest.mark.parametrize("tokenizers", [tiny_tokenizers, train_tiny_tokenizers], ids=["frozen", "retrained"])
def test_every_caption_word_is_one_clip_token_and_never_unknown(tokenizers) -> None:
    clip, t5 = tokenizers()
    seen = set()
    for split in ("train", "heldout"):
        for scene in generate_scenes(0, 40, split, WORLD):
            seen |= set(re.findall(r"\w+", scene.caption))
    assert seen <= toy_caption_words()
    for word in sorted(toy_caption_words()):
        clip_ids = clip(word, add_special_tokens=False)["input_ids"]
        t5_ids = t5(word, add_special_tokens=False)["input_ids"]
        assert len(clip_ids) == 1, word
        assert clip.unk_token_id not in clip_ids and t5.unk_token_id not in t5_ids, word


def test_tiny_tokenizers_are_the_frozen_files_of_the_shipped_model() -> None:
    """Every process gets the same ids (retraining does not: ties break in hash-map order), and they are the ids
    the shipped toy model's text encoders were trained with."""
    from transformers import AutoTokenizer

    from moviepostproduction.model_dir import SHIPPED_MODEL_DIR

    clip, t5 = tiny_tokenizers()
    shipped = [AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR / sub) for sub in ("tokenizer", "tokenizer_2")]
    assert clip.get_vocab() == shipped[0].get_vocab() and t5.get_vocab() == shipped[1].get_vocab()


def test_written_toy_dir_loads_and_composes(loaded, tiny_dir: Path, tmp_path: Path) -> None:
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.scene import scene_from_dict

    text, image, vae = loaded
    trained = {"vae": vae.model, "text_encoder": text.clip, "text_encoder_2": text.t5,
               "image_encoders/clip": image.clip, "image_encoders/dino": image.dino}  # fmt: skip
    with pytest.raises(KeyError, match=r"needs trained \['vae'\]"):
        write_toy_model_dir(tmp_path / "bad", {k: v for k, v in trained.items() if k != "vae"}, spec=SPEC)
    out = write_toy_model_dir(tmp_path / "toy", trained, spec=SPEC)
    md = ModelDir.at(out)
    md.check()
    assert md.index["toy_world"] is True and md.tiny_random is False
    assert set(TRAINED_BY_ENCODERS) <= {str(p.parent.relative_to(out)) for p in out.rglob("*.safetensors")}
    reloaded = TextEncoder.load(out).encode(["a red star"], max_t5_tokens=8)
    assert torch.equal(reloaded.pooled, text.encode(["a red star"], max_t5_tokens=8).pooled)

    pipe = ComposePipeline.from_model_dir(out)
    assert pipe.label == "toy-world (encoders trained, transformer untrained)"
    (tmp_path / "ref.png").write_bytes(b"")
    from PIL import Image

    Image.new("RGB", (32, 32), (220, 30, 30)).save(tmp_path / "ref.png")
    scene = scene_from_dict(
        {"caption": "a red circle", "width": 32, "height": 32, "refs": [
            {"image": "ref.png", "bbox": [0.1, 0.1, 0.6, 0.6], "depth": "fg", "caption": "a red circle"}]},
        base_dir=tmp_path,
    )  # fmt: skip
    assert pipe(scene, num_inference_steps=1).images[0].size == (32, 32)


# --- data ---------------------------------------------------------------------------------------------------


def test_caption_pool_labels_each_sprite_phrase_and_ignores_padding(loaded, scenes) -> None:
    text = loaded[0]
    pool = build_caption_pool(scenes, text.clip_tokenizer, text.t5_tokenizer, t5_tokens=64)
    for i, scene in enumerate(scenes):
        pads = pool.t5_ids[i] == text.t5_tokenizer.pad_token_id
        assert (pool.token_labels["colour"][i][pads] == IGNORE).all()
        for ref in scene.refs:
            where = pool.token_labels["colour"][i] == ATTRIBUTES["colour"].index(ref.colour)
            phrase = text.t5_tokenizer.decode(pool.t5_ids[i][where])
            assert phrase.strip() == ref.caption  # colours are distinct within a scene
            assert (pool.token_labels["shape"][i][where] == ATTRIBUTES["shape"].index(ref.shape)).all()
    assert pool.clip_ids.shape[1] == 77 and pool.t5_ids.shape[1] == 64


def test_sprite_pool_pixels_are_the_loader_preprocessing(loaded, scenes) -> None:
    from PIL import Image

    image = loaded[1]
    pool = build_sprite_pool(scenes, image.clip_pre, image.dino_pre, SPEC.patch_size)
    refs = [Image.fromarray(r.image) for s in scenes for r in s.refs]
    assert int((~pool.is_crop).sum()) == len(refs)
    assert torch.equal(pool.clip_pixels[~pool.is_crop], image.clip_pre(refs))
    ours = image_features(image, pool)
    theirs = image.encode(refs)  # the inference path: same features
    torch.testing.assert_close(ours.clip[~pool.is_crop], theirs.clip, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.dino_patches[~pool.is_crop], theirs.dino_patches, rtol=1e-5, atol=1e-5)
    none = len(ATTRIBUTES["colour"])
    shows = pool.patch_labels["colour"] != none
    assert shows.any(1).all()  # every view shows its sprite on some patch
    assert (pool.patch_labels["colour"][shows] == pool.labels["colour"][:, None].expand_as(shows)[shows]).all()


# --- training tasks -------------------------------------------------------------------------------------------


def test_vae_task_loss_decreases_on_a_fixed_batch(loaded, scenes) -> None:
    vae = loaded[2].model
    task = VaeTask(vae, scene_pixels(scenes), VaeTrainConfig(crop=32, batch_size=4, batches_per_epoch=2))
    assert isinstance(task, TrainTask)
    batch = next(task.batches(0, 0))
    assert batch.shape == (4, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1
    assert torch.equal(batch, next(task.batches(0, 0)))  # deterministic by (epoch, seed)
    losses = _steps(task, batch, 8, stage="vae")
    assert losses[-1] < 0.8 * losses[0]


def test_vae_decoder_stage_trains_the_decoder_alone(loaded, scenes) -> None:
    vae = copy.deepcopy(loaded[2].model)
    task = VaeTask(vae, scene_pixels(scenes), VaeTrainConfig(crop=32, batch_size=4, batches_per_epoch=2))
    encoder = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    decoder = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    batch = next(task.batches(0, 0))
    losses = _steps(task, batch, 6, stage="decoder")
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, vae.encoder.state_dict()[k]) for k, v in encoder.items())  # latent space kept
    assert not all(torch.equal(v, vae.decoder.state_dict()[k]) for k, v in decoder.items())
    trainable = {n for n, p in vae.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("decoder.", "post_quant_conv.")) for n in trainable)
    with pytest.raises(ValueError, match="VaeTask stage '1': expected one of vae, decoder"):
        task.param_groups("1")


def test_encoder_task_loss_decreases_on_a_fixed_batch(loaded, scenes) -> None:
    text, image, _ = loaded
    sprites = build_sprite_pool(scenes, image.clip_pre, image.dino_pre, SPEC.patch_size)
    captions = build_caption_pool(scenes, text.clip_tokenizer, text.t5_tokenizer, t5_tokens=64)
    encoders = {"clip_vision": image.clip, "dino": image.dino, "clip_text": text.clip, "t5": text.t5}
    cfg = EncoderTrainConfig(sprite_batch=8, caption_batch=4, t5_lengths=(32, 64))
    task = EncoderTask(encoders, text.clip_tokenizer, sprites, captions, cfg)
    assert isinstance(task, TrainTask)
    batch = next(task.batches(0, 0))
    out = task.loss(batch, torch.Generator().manual_seed(0))
    assert set(out.logs) == {"clip_attr", "dino_attr", "dino_patch", "contrastive", "clip_text_attr", "clip_scene",
                             "t5_token", "t5_scene"}  # fmt: skip
    losses = _steps(task, batch, 6)
    assert losses[-1] < 0.8 * losses[0]


def test_permute_channels_reorders_rgb_in_pixel_space(loaded, scenes) -> None:
    from PIL import Image

    image = loaded[1]
    ref = scenes[0].refs[0].image  # (S, S, 3) uint8
    swapped = np.ascontiguousarray(ref[..., [2, 0, 1]])
    ours = permute_channels(image.clip_pre([Image.fromarray(ref)]), torch.tensor([[2, 0, 1]]), image.clip_pre)
    torch.testing.assert_close(ours, image.clip_pre([Image.fromarray(swapped)]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mean and std"):
        permute_channels(ours, torch.tensor([[2, 0, 1]]), dataclasses.replace(image.clip_pre, mean=None))


def test_recoloured_views_train_shape_and_pattern_only(loaded, scenes) -> None:
    text, image, _ = loaded
    sprites = build_sprite_pool(scenes, image.clip_pre, image.dino_pre, SPEC.patch_size)
    captions = build_caption_pool(scenes, text.clip_tokenizer, text.t5_tokenizer, t5_tokens=64)
    encoders = {"clip_vision": image.clip, "dino": image.dino, "clip_text": text.clip, "t5": text.t5}
    cfg = EncoderTrainConfig(sprite_batch=16, caption_batch=2, recolour_prob=0.5)
    task = EncoderTask(encoders, text.clip_tokenizer, sprites, captions, cfg)
    idx = torch.arange(16) % len(sprites)
    clip, dino, recoloured = task._recolour(idx, torch.Generator().manual_seed(3))
    assert 0 < int(recoloured.sum()) < 16  # p = 0.5 over 16 views
    assert torch.equal(clip[~recoloured], sprites.clip_pixels[idx[~recoloured]])
    assert not torch.isclose(dino[recoloured], sprites.dino_pixels[idx[recoloured]]).all()
    # Same draws, same loss (exact resume); recolour_prob 0 leaves the pixels and the old loss as they were.
    a = task.loss({"sprite": idx, "caption": torch.arange(2)}, torch.Generator().manual_seed(3))
    b = task.loss({"sprite": idx, "caption": torch.arange(2)}, torch.Generator().manual_seed(3))
    assert a.logs == b.logs
    plain = EncoderTask(encoders, text.clip_tokenizer, sprites, captions, dataclasses.replace(cfg, recolour_prob=0.0))
    clip0, _, none = plain._recolour(idx, torch.Generator().manual_seed(3))
    assert not none.any() and torch.equal(clip0, sprites.clip_pixels[idx])
    with pytest.raises(ValidationError, match=r"recolour_prob: must be in \[0, 1\) \(got 1.0\)"):
        EncoderTrainConfig(recolour_prob=1.0)


def test_latent_normalisation_gives_zero_mean_unit_variance(loaded, scenes) -> None:
    vae = loaded[2]
    pixels = scene_pixels(scenes)
    stats = latent_stats(vae.model, pixels)
    assert stats.shift_factor == stats.mean and stats.scaling_factor == pytest.approx(1 / stats.std)
    vae.model.register_to_config(scaling_factor=stats.scaling_factor, shift_factor=stats.shift_factor)
    z = Vae(vae.model).encode(pixels.float() / 127.5 - 1)  # (N, 16, h, w), FLUX's normalised latents
    assert float(z.double().mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(z.double().std(correction=0)) == pytest.approx(1.0, abs=1e-4)


def test_frozen_features_are_deterministic(tiny_dir: Path, scenes) -> None:
    from PIL import Image

    refs = [Image.fromarray(r.image) for r in scenes[0].refs]
    a, b = ImageEncoder.load(tiny_dir).encode(refs), ImageEncoder.load(tiny_dir).encode(refs)
    assert torch.equal(a.clip, b.clip) and torch.equal(a.dino_cls, b.dino_cls)
    assert torch.equal(a.dino_patches, b.dino_patches)


# --- probes and config ------------------------------------------------------------------------------------------


def test_probe_accuracy_separates_separable_data_and_not_noise() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (300,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() * 4 + 0.3 * torch.randn(300, 3, generator=g)
    assert probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3) == 1.0
    noise = torch.randn(300, 8, generator=g)
    assert probe_accuracy(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.6


def test_run_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="vae_steps: .*must be >= 1"):
        ToyEncodersConfig(out="x", vae_steps=0)
    with pytest.raises(ValidationError, match=r"encoder_decay_steps: must be in \[0, encoder_steps\] \(got 900\)"):
        ToyEncodersConfig(out="x", encoder_steps=800, encoder_decay_steps=900)
