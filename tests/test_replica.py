"""The tiny hub-layout replicas (toyworld/replica.py): the file lists of black-forest-labs/FLUX.1-dev, FLUX.1-schnell
and FLUX.1-Fill-dev, index files that resolve, tokenizers without tokenizer.json, and diffusers' own pipelines
loading them from the local path (issue 41: tests run on folders exactly as users download them)."""

from __future__ import annotations

import json
import re

import pytest
from safetensors import safe_open

from moviepostproduction.model_dir import TEXT_COMPONENTS, ModelDir
from moviepostproduction.toyworld.replica import DEV_SCHEDULER, SCHNELL_SCHEDULER, flux_replica

COMMON = {
    "ae.safetensors",
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
SHARD = re.compile(r"(transformer/diffusion_pytorch_model|text_encoder_2/model)-(\d{5})-of-(\d{5})\.safetensors")
SINGLE = {"dev": "flux1-dev.safetensors", "schnell": "flux1-schnell.safetensors", "fill": "flux1-fill-dev.safetensors"}


def files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("variant", ["dev", "schnell", "fill"])
def test_the_replica_has_the_hub_file_list_and_its_index_files_resolve(variant):
    root = flux_replica(variant=variant)
    listed = files(root)
    shards = {f for f in listed if SHARD.fullmatch(f)}
    assert listed - shards == COMMON | {SINGLE[variant]}
    assert not any(f.endswith("tokenizer.json") for f in listed)  # transformers converts vocab / spiece itself
    for index, folder in [("diffusion_pytorch_model.safetensors.index.json", "transformer"),
                          ("model.safetensors.index.json", "text_encoder_2")]:  # fmt: skip
        weight_map = json.loads((root / folder / index).read_text())["weight_map"]
        named = {f"{folder}/{file}" for file in weight_map.values()}
        assert named == {f for f in shards if f.startswith(f"{folder}/")} and len(named) >= 2
        for key, file in weight_map.items():  # every tensor is in the shard its index names
            with safe_open(root / folder / file, "pt") as handle:
                assert key in set(handle.keys())
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == ("FluxFillPipeline" if variant == "fill" else "FluxPipeline")
    scheduler = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == (SCHNELL_SCHEDULER if variant == "schnell" else DEV_SCHEDULER)
    assert scheduler["use_dynamic_shifting"] is (variant != "schnell")
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    assert transformer["guidance_embeds"] is (variant != "schnell")
    expected_channels = (384, 64) if variant == "fill" else (64, None)
    assert (transformer["in_channels"], transformer["out_channels"]) == expected_channels
    vae = json.loads((root / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    single = sum(p.stat().st_size for p in (root / "transformer").glob("*.safetensors"))
    assert abs((root / SINGLE[variant]).stat().st_size - single) < 0.05 * single  # the duplicate's size
    ModelDir.at(root).check(["transformer", "vae", *TEXT_COMPONENTS])  # and our own checks accept it


@pytest.mark.parametrize("variant", ["dev", "schnell", "fill"])
def test_diffusers_loads_the_replica_from_its_local_path(variant):
    from diffusers import FluxFillPipeline, FluxPipeline

    cls = FluxFillPipeline if variant == "fill" else FluxPipeline
    pipe = cls.from_pretrained(flux_replica(variant=variant), local_files_only=True)
    assert type(pipe).__name__ == cls.__name__
    assert pipe.scheduler.config.use_dynamic_shifting is (variant != "schnell")
    assert type(pipe.tokenizer).__name__ == "CLIPTokenizer" and pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer_2("a red circle").input_ids
    assert ids[-1] == pipe.tokenizer_2.eos_token_id == 1 and pipe.tokenizer_2.unk_token_id not in ids[:-1]
    assert len(pipe.tokenizer_2) == pipe.text_encoder_2.config.vocab_size
