"""Base and adapter apart (issue 41 item 1): `--model` a stock FLUX folder with no adapter or image encoders,
`--adapter` our small folder naming (or holding) CLIP and DINOv2 folders as downloaded (a full CLIPModel folder)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.adapter_init import init_adapter
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import WeightsError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import example_scene

SQUARE = ("refs/blue_square.png", (0.25, 0.25, 0.75, 0.75), "fg", "a blue square")


def full_clip_folder(vision_folder, target):
    """A CLIPModel folder as openai/clip-vit-* publishes it (text + vision towers, projections, processor files),
    built around the tiny vision tower's config."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vision = CLIPVisionConfig.from_pretrained(vision_folder)
    text = dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=vision.projection_dim)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(target)
    shutil.copy(vision_folder / "preprocessor_config.json", target)
    return target


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """stock/: FLUX as downloaded (no adapter/, no image_encoders/); clip/ a full CLIPModel; dino/ DINOv2."""
    base = tmp_path_factory.mktemp("split")
    tiny = tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny")
    stock = base / "stock"
    shutil.copytree(tiny, stock, ignore=shutil.ignore_patterns("adapter", "image_encoders"))
    clip = full_clip_folder(tiny / "image_encoders" / "clip", base / "clip")
    dino = shutil.copytree(tiny / "image_encoders" / "dino", base / "dino")
    return stock, clip, dino


def test_init_adapter_writes_a_separate_folder_naming_the_encoders(split, tmp_path, capfd):
    stock, clip, dino = split
    out = tmp_path / "adapter"
    args = ["init-adapter", "--model", str(stock), "--clip", str(clip), "--dino", str(dino), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        result.output.splitlines()[-1] == f"use it with: mpp compose SCENE -o OUT.png --model {stock} --adapter {out}"
    )
    index = json.loads((out / "adapter_index.json").read_text())
    assert index["image_encoders"] == {"clip": str(clip.resolve()), "dino": str(dino.resolve())}
    assert sorted(p.name for p in stock.iterdir()) == sorted(p.name for p in split[0].iterdir())  # stock untouched
    assert not (stock / "adapter").exists()

    capfd.readouterr()
    pipe = ComposePipeline.from_pretrained(stock, adapter=out)
    assert capfd.readouterr().err == ""  # no load report for the CLIPModel's unused text tower
    assert (
        pipe.image_encoder.clip.config.projection_dim
        == json.loads((clip / "config.json").read_text())["projection_dim"]
    )
    with_refs = pipe(example_scene("a blue square", (64, 64), [SQUARE]), num_inference_steps=2, output_type="latent")
    plain = pipe(example_scene("a blue square", (64, 64), []), num_inference_steps=2, output_type="latent")
    torch.testing.assert_close(with_refs.images[0], plain.images[0], rtol=0, atol=1e-6)  # untrained: stock FLUX


def test_copied_encoders_and_the_cli_flag(split, tmp_path):
    stock, clip, dino = split
    out = tmp_path / "adapter"
    args = ["init-adapter", "--model", str(stock), "--clip", str(clip), "--dino", str(dino), "-o", str(out)]
    assert CliRunner().invoke(app, [*args, "--copy-encoders"]).exit_code == 0
    assert (out / "image_encoders/clip/model.safetensors").is_file()
    md = ModelDir.at(stock, out)
    assert (md.image_clip, md.image_dino) == (out / "image_encoders/clip", out / "image_encoders/dino")

    scene = tmp_path / "scene.json"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(tmp_path / "blue.png")
    ref = {"image": "blue.png", "bbox": [0.25, 0.25, 0.75, 0.75], "depth": "fg"}
    scene.write_text(json.dumps({"caption": "a blue square", "width": 64, "height": 64, "refs": [ref]}))
    png = tmp_path / "out.png"
    cmd = ["compose", str(scene), "-o", str(png), "--model", str(stock), "--adapter", str(out), "--steps", "2"]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0 and png.is_file(), result.output


def test_a_stock_folder_without_an_adapter_says_how_to_make_one(split, tmp_path):
    stock = split[0]
    with pytest.raises(WeightsError) as err:
        ComposePipeline.from_pretrained(stock)
    assert str(err.value) == (
        f"missing {stock / 'adapter' / 'config.json'} (expected a composition adapter: pass --adapter DIR, or make one "
        f"with `mpp init-adapter --model {stock} --clip CLIP_DIR --dino DINO_DIR -o DIR`)"
    )
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"caption": "a plate", "width": 64, "height": 64, "refs": []}))
    cmd = ["compose", str(scene), "-o", str(tmp_path / "o.png"), "--model", str(stock), "--adapter", "nowhere"]
    missing = CliRunner().invoke(app, cmd)
    assert missing.exit_code == 2
    assert missing.output.splitlines() == [
        "error: adapter nowhere: not a directory (expected an adapter folder: mpp init-adapter)"
    ]
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("[]", "adapter_index.json must be a JSON object"),
        ('{"colour": 1}', "adapter_index.json has unknown key 'colour' (known: image_encoders, sampling)"),
        ('{"image_encoders": {"clip": 3}}', "adapter_index.json image_encoders.clip must be a folder path (got '3')"),
        (
            '{"sampling": {"steps": 3}}',
            "adapter_index.json sampling has unknown key 'steps' (known: max_text_tokens, ref_guidance_scale, "
            "noise_temperature)",
        ),
    ],
)
def test_a_bad_adapter_index_is_one_line(tmp_path, index, message):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_index.json").write_text(index)
    with pytest.raises(WeightsError) as err:
        ModelDir.at(tmp_path)
    assert str(err.value) == f"adapter {tmp_path / 'adapter'}: {message}"


def test_adapter_sampling_defaults_override_the_model_index(split, tmp_path):
    stock = split[0]
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "adapter_index.json").write_text(json.dumps({"sampling": {"ref_guidance_scale": 2.5}}))
    assert ModelDir.at(stock, out).sampling_defaults().ref_guidance_scale == 2.5
    (out / "adapter_index.json").write_text(json.dumps({"sampling": {"noise_temperature": -1}}))
    with pytest.raises(WeightsError, match=r"adapter_index.json noise_temperature must be a positive number"):
        ModelDir.at(stock, out).sampling_defaults()


def test_the_adapters_transformer_lora_is_loaded_and_stays_on(split, tmp_path):
    from safetensors.torch import save_file

    stock, clip, dino = split
    out = tmp_path / "adapter"
    init_adapter(stock, out=out, clip=clip, dino=dino)
    plain = ComposePipeline.from_pretrained(stock, adapter=out)
    gen = torch.Generator().manual_seed(0)
    state = {}
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out"):
        layer = plain.model.transformer.get_submodule(name)
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=gen) * 0.2
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=gen) * 0.2
    (out / "transformer_lora").mkdir()
    save_file(state, str(out / "transformer_lora" / "pytorch_lora_weights.safetensors"))
    tuned = ComposePipeline.from_pretrained(stock, adapter=out)
    scene = example_scene("a blue square", (64, 64), [SQUARE])
    base = plain(scene, num_inference_steps=2, output_type="latent").images[0]
    plain.load_lora_weights(out / "transformer_lora" / "pytorch_lora_weights.safetensors")
    expected = plain(scene, num_inference_steps=2, output_type="latent").images[0]
    got = tuned(scene, num_inference_steps=2, output_type="latent").images[0]
    assert not torch.allclose(base, got)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    tuned.unload_lora_weights()  # user LoRAs only: the adapter's own stays
    torch.testing.assert_close(tuned(scene, num_inference_steps=2, output_type="latent").images[0], got)


def test_the_preflight_counts_the_adapter_and_encoders_where_they_are(split, tmp_path):
    from moviepostproduction.encoders.weight_files import tensor_bytes
    from moviepostproduction.resources import LOADS, ModelDims

    stock, clip, dino = split
    out = tmp_path / "adapter"
    init_adapter(stock, out=out, clip=clip, dino=dino)
    base = ModelDims.from_model_dir(stock, components=LOADS["compose"]).weights_bytes
    split_dims = ModelDims.from_model_dir(ModelDir.at(stock, out), components=LOADS["compose"])
    outside = sum(tensor_bytes(f, 4) for folder in (clip, dino, out) for f in folder.glob("*.safetensors"))
    assert split_dims.weights_bytes == base + outside > base  # fp32 tensors counted at fp32


def test_init_adapter_for_single_file_users_takes_a_variant_name(split, tmp_path):
    _, clip, dino = split
    out = tmp_path / "adapter"
    args = ["init-adapter", "--model", "flux1-dev", "--clip", str(clip), "--dino", str(dino), "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_dim"], cfg["num_double_blocks"], cfg["num_single_blocks"]) == (3072, 19, 38)  # FLUX.1-dev
