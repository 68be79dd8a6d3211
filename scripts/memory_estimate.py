"""The numbers of docs/memory.md: FLUX.1-dev component sizes computed from the real configs on the meta device (no
download), what each memory mode keeps on the GPU at once, and, with --measure-vae SIZE, the CPU peak of one FLUX
VAE decode at SIZE x SIZE (random weights, fp32: the activations do not depend on the weights).

    .venv/bin/python scripts/memory_estimate.py [--activations-gib 0.66] [--measure-vae 512]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

GIB = 1024**3
NF4 = 0.5 + 4 / 64  # 4 bits a value + one fp32 absmax per 64 values (bitsandbytes blocksize 64)


def _meta(build) -> nn.Module:
    with torch.device("meta"):
        return build()


def components() -> dict[str, nn.Module]:
    import json

    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
        T5Config,
        T5EncoderModel,
    )

    from moviepostproduction.compose.modules import CompositionAdapter, ConditioningConfig
    from moviepostproduction.encoders.single_file import CONFIG_ROOT

    def cfg(sub: str) -> dict:
        data = json.loads((CONFIG_ROOT / "flux1-dev" / sub / "config.json").read_text())
        return {k: v for k, v in data.items() if not k.startswith("_") and k != "architectures"}

    # openai/clip-vit-large-patch14's vision tower and facebook/dinov2-large (docs/model-directory.md)
    vit_l = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
    clip_vision = CLIPVisionConfig(**vit_l, intermediate_size=4096, image_size=224, projection_dim=768)
    dino = Dinov2Config(**vit_l, mlp_ratio=4, image_size=518)
    return {
        "transformer": _meta(lambda: FluxTransformer2DModel(**cfg("transformer"))),
        "text_encoder_2 (T5-XXL)": _meta(lambda: T5EncoderModel(T5Config(**cfg("text_encoder_2")))),
        "text_encoder (CLIP-L)": _meta(lambda: CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))),
        "vae": _meta(lambda: AutoencoderKL(**cfg("vae"))),
        "image_encoders/clip (ViT-L/14)": _meta(lambda: CLIPVisionModelWithProjection(clip_vision)),
        "image_encoders/dino (DINOv2-L)": _meta(lambda: Dinov2Model(dino)),
        "adapter": _meta(lambda: CompositionAdapter(ConditioningConfig())),
    }


def sizes(model: nn.Module, quantized: bool) -> tuple[int, float, float]:
    """(values, bf16 bytes, bytes with its nn.Linear weights in nf4)."""
    values = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return values, 2.0 * values, (2.0 * (values - linear) + NF4 * linear) if quantized else 2.0 * values


def measure_vae(side: int) -> float:
    from diffusers import AutoencoderKL

    from moviepostproduction.bench.memory import PeakMemory
    from moviepostproduction.encoders.single_file import CONFIG_ROOT

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_ROOT / "flux1-dev" / "vae")).eval()
    latents = torch.randn(1, 16, side // 8, side // 8)
    with torch.no_grad():
        return PeakMemory(torch.device("cpu")).measure(lambda: vae.decode(latents))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations-gib", type=float, default=0.66, help="transformer step peak (bf16)")
    parser.add_argument("--vae-gib", type=float, default=2.9, help="VAE decode peak (bf16)")
    parser.add_argument("--measure-vae", type=int, default=0, help="measure the VAE decode peak at this side (CPU)")
    args = parser.parse_args()
    rows = {}
    print(f"{'component':34s} {'params':>14s} {'bf16 GiB':>9s} {'nf4 GiB':>8s}")
    for name, model in components().items():
        quantized = name.startswith(("transformer", "text_encoder_2"))
        values, bf16, nf4 = sizes(model, quantized)
        rows[name] = (bf16, nf4)
        print(f"{name:34s} {values:14,d} {bf16 / GIB:9.2f} {nf4 / GIB:8.2f}")
    act, vae_act = args.activations_gib * GIB, args.vae_gib * GIB
    adapter = rows.pop("adapter")[0]  # stays on the GPU in every mode (encoders/offload.py)
    bf16 = {k: v[0] for k, v in rows.items()}
    nf4 = {k: v[1] for k, v in rows.items()}

    def offloaded(weights: dict[str, float]) -> float:
        """Model offload: the peak phase, one component and its activations at a time."""
        return adapter + max(weights["transformer"] + act, weights["vae"] + vae_act, *weights.values())

    print(f"bf16, no offload:         {(sum(bf16.values()) + adapter + max(act, vae_act)) / GIB:6.2f} GiB")
    print(f"bf16, model offload:      {offloaded(bf16) / GIB:6.2f} GiB")
    layer = max(p.numel() for m in components().values() for p in m.parameters()) * 2.0  # T5's token embedding
    print(f"bf16, sequential offload: {(adapter + max(act, vae_act) + layer) / GIB:6.2f} GiB (largest layer included)")
    print(f"nf4 + model offload:      {offloaded(nf4) / GIB:6.2f} GiB (transformer and T5 in nf4)")
    mixed = {**bf16, "transformer": nf4["transformer"]}
    print(f"nf4 transformer + model:  {offloaded(mixed) / GIB:6.2f} GiB (T5 bf16)")
    if args.measure_vae:
        print(f"VAE decode {args.measure_vae}^2, fp32, CPU peak: {measure_vae(args.measure_vae):.0f} MiB")


if __name__ == "__main__":
    main()
