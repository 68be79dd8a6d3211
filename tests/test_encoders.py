"""Frozen encoders, VAE and transformer loaded from a tiny random model dir in the real FLUX layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae, find_caption_spans, load_transformer
from moviepostproduction.errors import ValidationError, WeightsError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.tiny import (
    TinySpec,
    rope_axes,
    tiny_configs,
    tiny_random_model_dir,
    write_tiny_model_dir,
)

SPEC = TinySpec()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def text(tiny_dir: Path) -> TextEncoder:
    return TextEncoder.load(tiny_dir)


@pytest.fixture(scope="module")
def images(tiny_dir: Path) -> ImageEncoder:
    return ImageEncoder.load(tiny_dir)


@pytest.fixture(scope="module")
def vae(tiny_dir: Path) -> Vae:
    return Vae.load(tiny_dir)


@pytest.fixture
def broken(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny dir that a test may damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "model"))


def _refs() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    tall_rgba = Image.fromarray(rng.integers(0, 256, (81, 33, 4), dtype=np.uint8), mode="RGBA")
    return [wide, tall_rgba, Image.new("L", (20, 20), 128)]


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


# --- the tiny dir ------------------------------------------------------------------------------------


def test_tiny_dir_is_small_complete_and_marked(tiny_dir: Path) -> None:
    size = sum(f.stat().st_size for f in tiny_dir.rglob("*") if f.is_file())
    assert size < 5 * 2**20
    model_dir = ModelDir.at(tiny_dir)
    model_dir.check()
    assert model_dir.tiny_random is True
    assert not list(tiny_dir.rglob("*.bin"))


def test_tiny_configs_are_wired_to_each_other() -> None:
    cfg = tiny_configs(SPEC)
    assert cfg.transformer["in_channels"] == 4 * cfg.vae["latent_channels"] == 64
    assert cfg.transformer["joint_attention_dim"] == cfg.text_encoder_2.d_model
    assert cfg.transformer["pooled_projection_dim"] == cfg.text_encoder.hidden_size
    assert sum(cfg.transformer["axes_dims_rope"]) == cfg.transformer["attention_head_dim"]
    assert len(cfg.vae["block_out_channels"]) == 4  # 8x downsampling
    assert rope_axes(128) == (16, 56, 56)  # FLUX.1-dev's split
    assert all(a % 2 == 0 for a in rope_axes(16))


def test_tiny_build_is_deterministic_per_seed(tiny_dir: Path, tmp_path: Path) -> None:
    again = write_tiny_model_dir(tmp_path / "again", seed=0)
    for file in sorted(tiny_dir.rglob("*.safetensors")) + [tiny_dir / "tokenizer_2" / "tokenizer.json"]:
        assert file.read_bytes() == (again / file.relative_to(tiny_dir)).read_bytes(), file
    with pytest.raises(FileExistsError):
        write_tiny_model_dir(again)
    other = write_tiny_model_dir(tmp_path / "other", seed=1)
    weights = Path("transformer/diffusion_pytorch_model.safetensors")
    assert (other / weights).read_bytes() != (tiny_dir / weights).read_bytes()


def test_default_model_dir_is_built_once_into_the_cache(tmp_path: Path) -> None:
    first = tiny_random_model_dir(tmp_path)
    stamp = (first / "transformer" / "config.json").stat().st_mtime_ns
    assert tiny_random_model_dir(tmp_path) == first
    assert (first / "transformer" / "config.json").stat().st_mtime_ns == stamp
    assert ModelDir.at(first).tiny_random
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging leftovers


# --- text --------------------------------------------------------------------------------------------


def test_text_encoder_shapes_dtypes_and_frozen(text: TextEncoder) -> None:
    emb = text.encode(["a red chef in the kitchen", "a dog"], max_t5_tokens=24)
    assert emb.t5.shape == (2, 24, SPEC.t5_dim)
    assert emb.pooled.shape == (2, SPEC.clip_text_dim)
    assert emb.t5.dtype == emb.pooled.dtype == torch.float32
    assert emb.t5_mask.dtype == torch.bool and emb.t5_mask.shape == (2, 24)
    assert emb.t5_mask[1].sum() < emb.t5_mask[0].sum() < 24
    text.train()
    assert _frozen(text.clip) and _frozen(text.t5) and not text.training


def test_text_encoding_is_deterministic_and_batch_independent(text: TextEncoder) -> None:
    a = text.encode(["a blue star", "a green ring at night"], max_t5_tokens=16)
    b = text.encode(["a green ring at night"], max_t5_tokens=16)
    assert torch.equal(text.encode(["a blue star", "a green ring at night"], max_t5_tokens=16).t5, a.t5)
    torch.testing.assert_close(a.t5[1:], b.t5, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.pooled[1:], b.pooled, atol=1e-6, rtol=0)


def test_text_encoding_equals_diffusers_flux_pipeline(tiny_dir: Path, text: TextEncoder) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_dir, local_files_only=True)
    prompts = ["a red chef in the neon kitchen", "a cat"]
    with torch.no_grad():  # the pipeline's encoders are not frozen; grad mode picks another attention kernel
        t5, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, max_sequence_length=32)
    ours = text.encode(prompts, max_t5_tokens=32)
    assert torch.equal(ours.t5, t5) and torch.equal(ours.pooled, pooled)


def test_truncation_is_logged(text: TextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="moviepostproduction.encoders"):
        emb = text.encode(["a red chef " * 30], max_t5_tokens=16)
    assert emb.t5_mask.all()
    assert [r.getMessage() for r in caplog.records] == [
        "CLIP prompt truncated to 77 tokens",
        "T5 prompt truncated to 16 tokens",
    ]


def test_caption_spans_locate_append_and_skip(text: TextEncoder) -> None:
    tok = text.t5_tokenizer
    caption = "A red chef in the neon kitchen"
    prompt, spans = find_caption_spans(tok, caption, ["red chef", None, "a dog", "Kitchen"], max_tokens=64)
    assert prompt == caption + ", a dog"
    assert spans[1] is None
    ids = tok(prompt)["input_ids"]
    for span, words in zip((spans[0], spans[2], spans[3]), ("red chef", "a dog", "kitchen"), strict=True):
        assert span is not None and span[0] < span[1]
        assert tok.decode(ids[span[0] : span[1]]).strip().lower() == words
    emb, spans2, prompt2 = text.encode_spans(caption, ["red chef", None, "a dog", "Kitchen"], max_t5_tokens=64)
    assert (spans2, prompt2) == (spans, prompt) and emb.t5.shape == (1, 64, SPEC.t5_dim)


def test_caption_spans_same_caption_twice_takes_distinct_occurrences(text: TextEncoder) -> None:
    _, spans = find_caption_spans(text.t5_tokenizer, "a cat and a cat", ["a cat", "a cat", "a cat"], 32)
    assert len({s for s in spans}) == 3  # two in the caption, the third appended


def test_caption_span_past_the_token_limit_names_the_ref(text: TextEncoder) -> None:
    with pytest.raises(ValidationError) as err:
        find_caption_spans(text.t5_tokenizer, "a red chef in the neon kitchen", [None, "a purple heart"], 8)
    assert str(err.value).startswith("refs[1].caption: falls past the first 8 T5 tokens")


# --- images ------------------------------------------------------------------------------------------


def test_image_encoder_shapes_and_frozen(images: ImageEncoder) -> None:
    emb = images.encode(_refs())
    patches = (SPEC.image_size // SPEC.patch_size) ** 2
    assert emb.clip.shape == (3, SPEC.clip_image_dim)
    assert emb.dino_cls.shape == (3, SPEC.dino_dim)
    assert emb.dino_patches.shape == (3, patches, SPEC.dino_dim)
    empty = images.encode([])
    assert (empty.clip.shape, empty.dino_cls.shape, empty.dino_patches.shape) == (
        (0, SPEC.clip_image_dim),
        (0, SPEC.dino_dim),
        (0, patches, SPEC.dino_dim),
    )
    assert torch.equal(images.encode(_refs()).dino_patches, emb.dino_patches)
    assert _frozen(images.clip) and _frozen(images.dino)


def test_preprocessing_matches_transformers_pil_processors(tiny_dir: Path, images: ImageEncoder) -> None:
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil

    for cls, ours, sub in (
        (CLIPImageProcessorPil, images.clip_pre, "clip"),
        (BitImageProcessorPil, images.dino_pre, "dino"),
    ):
        reference = cls.from_pretrained(tiny_dir / "image_encoders" / sub)(_refs(), return_tensors="pt")
        torch.testing.assert_close(ours(_refs()), reference["pixel_values"], atol=1e-5, rtol=0)


def test_encode_pixels_is_differentiable_and_close_to_the_pil_path(images: ImageEncoder) -> None:
    image = _refs()[0]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    assert (images.clip_pre.tensor(pixels) - images.clip_pre([image])).abs().mean() < 0.05
    pixels.requires_grad_(True)
    images.encode_pixels(pixels).dino_cls.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in images.parameters())


# --- VAE and transformer -----------------------------------------------------------------------------


def test_vae_round_trip_shapes_and_flux_normalisation(vae: Vae) -> None:
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(pixels)
    assert z.shape == (2, 16, 8, 6) and vae.downsample == 8
    mode = vae.model.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(z, (mode - 0.1159) * 0.3611)
    assert vae.decode(z).shape == pixels.shape
    torch.testing.assert_close(vae.decode(z), vae.model.decode(mode).sample)
    sample = vae.encode(pixels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample, vae.encode(pixels, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(sample, z)
    with pytest.raises(ValueError, match="not a multiple of the VAE factor 8"):
        vae.encode(pixels[..., :60, :])
    assert _frozen(vae.model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_loads_frozen_in_dtype_and_runs(tiny_dir: Path, dtype: torch.dtype) -> None:
    model = load_transformer(tiny_dir, dtype=dtype)
    assert _frozen(model) and all(p.dtype == dtype for p in model.parameters())
    n, t = 12, 5
    out = model(
        hidden_states=torch.randn(1, n, 64, dtype=dtype),
        encoder_hidden_states=torch.randn(1, t, SPEC.t5_dim, dtype=dtype),
        pooled_projections=torch.randn(1, SPEC.clip_text_dim, dtype=dtype),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(n, 3),
        txt_ids=torch.zeros(t, 3),
        guidance=torch.tensor([3.5]),
    ).sample
    assert out.shape == (1, n, 64) and out.dtype == dtype


# --- errors: one line naming the path ----------------------------------------------------------------


def _break(root: Path, case: str) -> None:
    if case == "folder":
        shutil.rmtree(root / "vae")
    elif case == "config":
        (root / "vae" / "config.json").unlink()
    elif case == "weights":
        (root / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    elif case == "tokenizer":
        (root / "tokenizer_2" / "tokenizer.json").unlink()
    elif case == "preprocessor":
        (root / "image_encoders" / "dino" / "preprocessor_config.json").unlink()


MISSING = {
    "folder": ("vae", "an AutoencoderKL folder in diffusers layout"),
    "config": ("vae/config.json", "an AutoencoderKL config in diffusers layout"),
    "weights": ("vae/diffusion_pytorch_model.safetensors", "AutoencoderKL weights as .safetensors"),
    "tokenizer": (
        "tokenizer_2/tokenizer.json",
        "the T5 tokenizer vocabulary, or one of ['vocab.json', 'spiece.model']",
    ),
    "preprocessor": (
        "image_encoders/dino/preprocessor_config.json",
        "the Dinov2Model preprocessor config (resize, crop, mean/std)",
    ),
}


@pytest.mark.parametrize("case", sorted(MISSING))
def test_missing_file_is_one_line_naming_the_path(broken: Path, case: str) -> None:
    _break(broken, case)
    rel, expected = MISSING[case]
    with pytest.raises(WeightsError) as err:
        ModelDir.at(broken).check()
    assert str(err.value) == f"model dir {broken}: missing {broken / rel} (expected {expected})"


def test_loaders_check_only_their_own_components(broken: Path) -> None:
    shutil.rmtree(broken / "image_encoders")
    Vae.load(broken)  # the VAE does not need the image encoders
    with pytest.raises(WeightsError, match="image_encoders/clip"):
        ImageEncoder.load(broken)


def test_truncated_safetensors_is_refused_naming_the_file(broken: Path) -> None:
    file = broken / "text_encoder" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(WeightsError) as err:
        TextEncoder.load(broken)
    assert str(err.value).startswith(f"model dir {broken}: {file} is truncated or corrupt (")
    assert "\n" not in str(err.value)


def test_pickle_only_folder_is_refused(broken: Path) -> None:
    folder = broken / "text_encoder_2"
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(WeightsError) as err:
        TextEncoder.load(broken)
    assert str(err.value) == (
        f"model dir {broken}: {folder} holds only pickle weights ['pytorch_model.bin']; refusing to unpickle, "
        "convert them to .safetensors"
    )


def test_missing_tensor_is_refused_not_random_initialised(broken: Path) -> None:
    from safetensors.torch import load_file, save_file

    file = broken / "image_encoders" / "clip" / "model.safetensors"
    tensors = load_file(file)
    del tensors["visual_projection.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(WeightsError) as err:
        ImageEncoder.load(broken)
    assert str(err.value) == (
        f"model dir {broken}: weights in {file.parent} lack 1 tensors of CLIPVisionModelWithProjection "
        "(visual_projection.weight)"
    )


def test_wrong_model_type_and_shapes_are_named(broken: Path) -> None:
    config = broken / "text_encoder" / "config.json"
    shutil.copy(broken / "text_encoder_2" / "config.json", config)
    with pytest.raises(WeightsError) as err:
        ModelDir.at(broken).check(["text_encoder"])
    assert str(err.value) == (
        f"model dir {broken}: {config} has model_type='t5' "
        "(expected a CLIPTextModel: model_type in ['clip_text_model', 'clip'])"
    )
    transformer = broken / "transformer" / "config.json"
    transformer.write_text(json.dumps({**json.loads(transformer.read_text()), "num_attention_heads": 4}))
    with pytest.raises(WeightsError) as err:
        load_transformer(broken)
    message = str(err.value)
    assert message.startswith(f"model dir {broken}: {transformer} describes a FluxTransformer2DModel of 277,856 ")
    assert message.endswith(", more than twice the 81,664 values its weights hold (config and weights differ)")
    assert "\n" not in message  # found on the meta device: nothing was allocated for the 4-head model


def test_bad_json_missing_shard_and_not_a_dir(broken: Path, tmp_path: Path) -> None:
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"cannot read .*model_index\.json as JSON"):
        ModelDir.at(broken).check(["vae"])
    (broken / "model_index.json").unlink()
    index = {"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (broken / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError) as err:
        ModelDir.at(broken).check(["vae"])
    shard = broken / "vae" / "diffusion_pytorch_model-00002-of-00002.safetensors"
    assert str(err.value) == (
        f"model dir {broken}: missing {shard} (expected a shard listed in "
        "diffusion_pytorch_model.safetensors.index.json)"
    )
    with pytest.raises(WeightsError, match="not a directory"):
        ModelDir.at(tmp_path / "nowhere")
