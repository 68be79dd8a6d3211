"""Single-file FLUX components (encoders/single_file.py): files written the way BFL and ComfyUI ship them, from tiny
diffusers / transformers models, by inverting diffusers' key conversion (loaders/single_file_utils.py:
convert_flux_transformer_checkpoint_to_diffusers, convert_ldm_vae_checkpoint), then loaded back through
`from_single_file` to the same weights. diffusers' FLUX converter splits single blocks at FLUX.1's width (3072),
so the BFL transformer round trip needs that width and is marked slow; GGUF is tested in diffusers keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moviepostproduction.encoders.single_file import (
    CONFIG_ROOT,
    VARIANTS,
    load_text_encoder_file,
    load_transformer_file,
    load_vae_file,
    transformer_variant,
)
from moviepostproduction.errors import WeightsError
from moviepostproduction.toyworld.tiny import write_tiny_model_dir

from helpers import make_tiny_flux


# --------------------------------------------------------------------------- diffusers -> BFL (the inverse)
def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """AdaLayerNormContinuous: BFL stores (shift, scale), diffusers (scale, shift)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a])


def flux_to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict in Black Forest Labs' keys (flux1-dev.safetensors)."""
    out: dict[str, torch.Tensor] = {}
    embedders = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    for bfl, ours in embedders.items():
        for layer, linear in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for p in ("weight", "bias"):
                key = f"time_text_embed.{ours}.{linear}.{p}"
                if key in sd:
                    out[f"{bfl}.{layer}.{p}"] = sd[key]
    for p in ("weight", "bias"):
        out[f"txt_in.{p}"], out[f"img_in.{p}"] = sd[f"context_embedder.{p}"], sd[f"x_embedder.{p}"]
        out[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
        out[f"final_layer.adaLN_modulation.1.{p}"] = swap_halves(sd[f"norm_out.linear.{p}"])
    doubles = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    for i in sorted(doubles):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            pairs = {
                "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", "img_mlp.0": "ff.net.0.proj",
                "img_mlp.2": "ff.net.2", "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
                "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
            }  # fmt: skip
            for b, d in pairs.items():
                out[f"{dst}{b}.{p}"] = sd[f"{src}{d}.{p}"]
            out[f"{dst}img_attn.qkv.{p}"] = torch.cat([sd[f"{src}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{dst}txt_attn.qkv.{p}"] = torch.cat([sd[f"{src}attn.add_{x}_proj.{p}"] for x in "qkv"])
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[f"{dst}{stream}_attn.norm.query_norm.scale"] = sd[f"{src}attn.{q}.weight"]
            out[f"{dst}{stream}_attn.norm.key_norm.scale"] = sd[f"{src}attn.{k}.weight"]
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for i in sorted(singles):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}modulation.lin.{p}"] = sd[f"{src}norm.linear.{p}"]
            parts = [sd[f"{src}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{src}proj_mlp.{p}"]]
            out[f"{dst}linear1.{p}"] = torch.cat(parts)
            out[f"{dst}linear2.{p}"] = sd[f"{src}proj_out.{p}"]
        out[f"{dst}norm.query_norm.scale"] = sd[f"{src}attn.norm_q.weight"]
        out[f"{dst}norm.key_norm.scale"] = sd[f"{src}attn.norm_k.weight"]
    return out


def _vae_attention_key(rest: str) -> str:
    names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for ours, ldm in names.items():
        if rest.startswith(ours + "."):
            return ldm + rest[len(ours) :]
    raise KeyError(rest)


def vae_to_ldm(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the LDM keys of BFL's ae.safetensors (attention as 1x1 convs)."""
    out = {}
    for key, value in sd.items():
        part, rest = key.split(".", 1)  # encoder / decoder
        rest = rest.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        bits = rest.split(".")
        if bits[0] in ("down_blocks", "up_blocks"):
            i = int(bits[1]) if bits[0] == "down_blocks" else levels - 1 - int(bits[1])
            stage = "down" if bits[0] == "down_blocks" else "up"
            if bits[2] == "resnets":
                rest = f"{stage}.{i}.block.{bits[3]}." + ".".join(bits[4:])
            else:  # downsamplers.0.conv.* / upsamplers.0.conv.*
                rest = f"{stage}.{i}.{'downsample' if stage == 'down' else 'upsample'}." + ".".join(bits[4:])
        elif bits[:2] == ["mid_block", "resnets"]:
            rest = f"mid.block_{int(bits[2]) + 1}." + ".".join(bits[3:])
        elif bits[:2] == ["mid_block", "attentions"]:
            rest = "mid.attn_1." + _vae_attention_key(".".join(bits[3:]))
            value = value[:, :, None, None] if value.ndim == 2 else value
        out[f"{part}.{rest}"] = value
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("single") / "tiny", seed=0)


# --------------------------------------------------------------------------------------------------- tests
def test_shipped_configs_are_the_three_flux_variants():
    for variant in VARIANTS:
        cfg = json.loads((CONFIG_ROOT / variant / "transformer" / "config.json").read_text())
        assert (
            cfg["num_layers"],
            cfg["num_single_layers"],
            cfg["num_attention_heads"] * cfg["attention_head_dim"],
        ) == (
            19,
            38,
            3072,
        )
        assert cfg["guidance_embeds"] == (variant != "flux1-schnell")
        assert cfg["in_channels"] == (384 if variant == "flux1-fill-dev" else 64)


@pytest.mark.parametrize(
    ("overrides", "variant"),
    [
        ({}, "flux1-dev"),
        ({"guidance_embeds": False}, "flux1-schnell"),
        ({"in_channels": 384, "out_channels": 64}, "flux1-fill-dev"),
    ],
)
def test_the_variant_is_read_from_the_file(tmp_path, overrides, variant):
    sd = flux_to_bfl(make_tiny_flux(**overrides).state_dict())
    path = tmp_path / "flux.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, path)  # ComfyUI's prefix
    assert transformer_variant(path) == variant


def test_vae_from_ae_safetensors_has_the_same_weights(tmp_path, model_dir):
    from moviepostproduction.encoders import Vae

    vae = Vae.load(model_dir).model  # FLUX's layout: no quant convs
    levels = len(vae.config.block_out_channels)
    path = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae.state_dict(), levels).items()}, path)
    loaded = load_vae_file(path, config=model_dir, dtype=torch.float32)
    assert same_weights(vae, loaded)


def test_text_encoders_from_comfyui_files_have_the_same_weights(tmp_path, model_dir):
    from moviepostproduction.encoders import TextEncoder

    text = TextEncoder.load(model_dir)
    clip_path, t5_path = tmp_path / "clip_l.safetensors", tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.to(torch.float16) for k, v in text.clip.state_dict().items()}, clip_path)
    t5 = {k: v.to(torch.float16) for k, v in text.t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, t5_path)  # the token embedding once, as `shared`
    clip = load_text_encoder_file(clip_path, "clip", config=model_dir, dtype=torch.float16)
    loaded_t5 = load_text_encoder_file(t5_path, "t5", config=model_dir, dtype=torch.float16)
    assert same_weights(text.clip.half(), clip) and same_weights(text.t5.half(), loaded_t5)
    ids = torch.tensor([[3, 4, 5, 1]])
    assert torch.equal(loaded_t5(input_ids=ids).last_hidden_state, text.t5(input_ids=ids).last_hidden_state)


def test_a_foreign_file_is_one_line(tmp_path, model_dir):
    path = tmp_path / "ae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"not a FLUX transformer \(no img_in.weight"):
        load_transformer_file(path)
    with pytest.raises(WeightsError, match=r"no such transformer file"):
        load_transformer_file(tmp_path / "missing.safetensors")
    save_file({"text_model.bogus.weight": torch.zeros(1)}, tmp_path / "clip.safetensors")
    with pytest.raises(WeightsError, match=r"1 tensors CLIPTextModel does not have \(text_model.bogus.weight\)"):
        load_text_encoder_file(tmp_path / "clip.safetensors", "clip", config=model_dir)


def write_gguf(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A GGUF file of `sd`: 2-D weights quantized Q8_0 (as city96's FLUX files), the rest F32."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="flux")
    for name, tensor in sd.items():
        data = tensor.float().numpy()
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0:
            q8 = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_transformer_stays_quantized_and_matches(tmp_path, model_dir):
    pytest.importorskip("gguf")
    from moviepostproduction.encoders import load_transformer

    from helpers import flux_inputs

    reference = load_transformer(model_dir)
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    write_gguf(reference.state_dict(), path)
    model = load_transformer_file(path, config=model_dir, dtype=torch.float32)
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ == "GGUFParameter" and weight.dtype == torch.uint8  # still 8-bit in memory
    cfg = reference.config
    inputs = flux_inputs(1, (4, 4), 6)
    inputs = {
        "hidden_states": torch.randn(1, 16, cfg.in_channels, generator=torch.Generator().manual_seed(0)),
        "encoder_hidden_states": torch.randn(1, 6, cfg.joint_attention_dim),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
        "img_ids": inputs["img_ids"],
        "txt_ids": inputs["txt_ids"],
        **({"guidance": torch.tensor([3.5])} if cfg.guidance_embeds else {}),
    }
    with torch.no_grad():
        want, got = (m(**inputs, return_dict=False)[0] for m in (reference, model))
    assert (got - want).abs().max() <= 0.02 * want.abs().max()  # Q8_0 rounding only


@pytest.mark.slow
def test_bfl_transformer_at_flux_width_loads_to_the_same_weights(tmp_path):
    """diffusers' converter assumes FLUX.1's width (3072) in single blocks: one block of each kind at that width
    (0.5 B values, about 1 GB in bf16)."""
    with torch.device("meta"):
        widths = dict(num_attention_heads=24, attention_head_dim=128, axes_dims_rope=(16, 56, 56))
        meta = make_tiny_flux(num_layers=1, num_single_layers=1, **widths)
    gen = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=gen) * 0.02).to(torch.bfloat16) for k, v in meta.state_dict().items()}
    path = tmp_path / "flux1-dev.safetensors"
    save_file(flux_to_bfl(sd), path)
    folder = tmp_path / "cfg" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel", **dict(meta.config)}))
    loaded = load_transformer_file(path, config=tmp_path / "cfg", dtype=torch.bfloat16)
    state = loaded.state_dict()
    assert state.keys() == sd.keys() and all(torch.equal(state[k], sd[k]) for k in sd)
