"""Per-GPU memory of FLUX.1-dev training, stages 1 and 2 (docs/training.md "Memory for FLUX.1-dev"): computed, not
measured on a GPU.

    .venv/bin/python scripts/train_memory_estimate.py [--side 1024] [--text 512] [--refs 10] [--gpus 8]

Method. Weights: the real FLUX.1-dev transformer and CompositionAdapter configs built on the meta device (no
download); the frozen weights in bf16; the trained ones (the stage's adapter parts, training/stages.py, and the
rank-16 LoRA of compose_task.LORA_TARGETS added by peft) as fp32 master weights + fp32 gradients + AdamW moments
(8 bytes a value) or bitsandbytes' 8-bit moments (2 bytes + an fp32 absmax per 256 values; tensors under 4096 values
stay fp32). Activations: one real FluxTransformerBlock and one FluxSingleTransformerBlock, each with its LoRA, run
through ConditionedFlux's block functions (per-token modulation of `--refs` regions included) on the meta device in
bf16 at the full token count (image (side/16)^2 + text), batch 1, with the input requiring grad; a saved-tensors
hook adds up the bytes autograd keeps (each storage once). The attention kernel is counted as flash attention
saves (q, k, v, out and an fp32 logsumexp: no N x N matrix), which is what an H100 runs. Without checkpointing every
block keeps its set; with it each block keeps its inputs (x and the text stream) and one block's set is rebuilt at a
time. Assemble-Attn (stage 1 and 2 train it, on every 3rd double block) is counted as one more attention over every
image token per layout block (q, k, v, out: an upper bound, its groups cover the boxes only). Not counted: the
VAE decode and DINO of the identity / bbox losses (aux_samples images with gradients; run them at 512^2 or lower
aux_prob when memory is short), the CUDA context (~0.5 GiB) and allocator fragmentation.
FSDP full-shard as the trainer's FSDP2 engine runs it (training/engines.py): gradients and moments divided by the GPU
count; every weight, trainable and frozen, split between micro-batches but gathered whole while one runs (the
compose task's per-process random branches rule out block-by-block gathering), so a GPU holds its shard plus the
whole weights then; activations stay per GPU.
"""

from __future__ import annotations

import argparse
import json
import math
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn

GIB = 1024**3
BF16 = 2


def _config(sub: str) -> dict:
    from moviepostproduction.encoders.single_file import CONFIG_ROOT

    data = json.loads((CONFIG_ROOT / "flux1-dev" / sub / "config.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def build(lora_rank: int):
    """FLUX.1-dev's transformer with the stage's LoRA and the default adapter, on the meta device."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from moviepostproduction.compose.modules import CompositionAdapter, ConditioningConfig
    from moviepostproduction.training.compose_task import LORA_TARGETS

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**_config("transformer")).to(torch.bfloat16)
        adapter = CompositionAdapter(ConditioningConfig())
    transformer.add_adapter(
        LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(LORA_TARGETS), init_lora_weights=True)
    )
    return transformer, adapter


def moment_bytes(numel: int, eight_bit: bool) -> float:
    """AdamW's two moments of one tensor: fp32, or bitsandbytes' blockwise 8-bit (training/optimizers.py)."""
    if eight_bit and numel >= 4096:
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)
    return 8 * numel


def trained_tensors(transformer: nn.Module, adapter: nn.Module, stage: str) -> list[int]:
    from moviepostproduction.training.stages import get_stage

    lora = [p.numel() for n, p in transformer.named_parameters() if "lora_" in n]
    parts = get_stage(stage).adapter_parts
    return lora + [p.numel() for part in parts for p in getattr(adapter, part).parameters()]


class FlashLikeAttention(torch.autograd.Function):
    """What flash attention keeps for backward (q, k, v, out, fp32 logsumexp); shapes only, on the meta device."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # (B, H, L, hd)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, L)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def flash_attention_memory():
    """diffusers' native attention calls torch's SDPA by name: count it as flash attention while measuring."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        q, k, v = (*args, *(kwargs[n] for n in ("query", "key", "value") if n in kwargs))[:3]
        return FlashLikeAttention.apply(q, k, v)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@contextmanager
def saved_bytes():
    """Bytes of the tensors autograd saves inside the block (each storage counted once)."""
    seen: dict[int, tuple[torch.UntypedStorage, int]] = {}
    total = SimpleNamespace(bytes=0)

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if id(storage) not in seen:
            seen[id(storage)] = (storage, storage.nbytes())  # the storage kept: its id is not reused
            total.bytes += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def block_bytes(transformer: nn.Module, tokens: int, text: int, refs: int) -> tuple[int, int, int]:
    """(double block, single block, block inputs) bytes kept for backward, batch 1, bf16, with `refs` regions."""
    from moviepostproduction.compose.conditioning import RegionMap
    from moviepostproduction.compose.flux import BlockInputs, double_block_forward, single_block_forward

    cfg = transformer.config
    d, hd = cfg.num_attention_heads * cfg.attention_head_dim, cfg.attention_head_dim
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(1, tokens, d, **meta, requires_grad=True)  # (B, N, D)
    ctx = torch.empty(1, text, d, **meta, requires_grad=True)  # (B, T, D)
    temb = torch.empty(1, d, **meta)  # (B, D)
    rope = tuple(torch.empty(text + tokens, hd, device="meta") for _ in range(2))  # (cos, sin) each (T + N, hd)
    image_rope = tuple(r[text:] for r in rope)

    def regions(n: int) -> RegionMap:  # `refs` regions + the uncovered one, coefficients trained (alpha)
        index = torch.zeros(1, n, dtype=torch.long, device="meta")
        return RegionMap(index, torch.empty(1, refs + 1, refs, **meta, requires_grad=True))

    offsets = torch.empty(1, refs, d, **meta, requires_grad=True)  # (B, R, D)
    cond = SimpleNamespace(
        image_regions=regions(tokens), text_regions=regions(text), joint_regions=regions(text + tokens)
    )
    inputs = BlockInputs(cond, image_offsets=offsets, text_offsets=offsets)
    with flash_attention_memory():
        with saved_bytes() as double:
            double_block_forward(transformer.transformer_blocks[0], x, ctx, temb, (None, rope, image_rope), inputs)
        with saved_bytes() as single:
            single_block_forward(transformer.single_transformer_blocks[0], x, ctx, temb, (None, rope, None), inputs)
    return double.bytes, single.bytes, (tokens + text) * d * BF16


def vae_bytes(side: int) -> tuple[int, int]:
    """(without, with checkpointing) bytes one decoded image of the identity / bbox losses keeps for backward: the
    real FLUX VAE decoder on the meta device in bf16, part by part. With checkpointing diffusers' decoder keeps the
    inputs of its mid block and up blocks and rebuilds one at a time."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**_config("vae")).to(torch.bfloat16).requires_grad_(False)
    dec = vae.decoder
    z = torch.empty(1, vae.config.latent_channels, side // 8, side // 8, device="meta", dtype=torch.bfloat16)
    x, outside, blocks, inputs, largest = z.requires_grad_(), 0, 0, 0, 0
    with flash_attention_memory():
        with saved_bytes() as part:
            x = dec.conv_in(x)
        outside += part.bytes
        for block in (dec.mid_block, *dec.up_blocks):
            inputs += x.numel() * BF16
            with saved_bytes() as part:
                x = block(x, None)
            blocks, largest = blocks + part.bytes, max(largest, part.bytes)
        with saved_bytes() as part:
            dec.conv_out(dec.conv_act(dec.conv_norm_out(x)))
        outside += part.bytes
    return outside + blocks, outside + inputs + largest


def image_encoders_values() -> int:
    """Values of the frozen VAE, CLIP ViT-L/14 vision tower and DINOv2-L the decoded losses run (bf16 in training)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    vit_l = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
    with torch.device("meta"):
        models = (
            AutoencoderKL(**_config("vae")),
            CLIPVisionModelWithProjection(CLIPVisionConfig(**vit_l, intermediate_size=4096, projection_dim=768)),
            Dinov2Model(Dinov2Config(**vit_l, mlp_ratio=4, image_size=518)),
        )
    return sum(p.numel() for m in models for p in m.parameters())


def estimate(args) -> tuple[list[tuple[str, dict[str, float]]], dict[str, float]]:
    from moviepostproduction.compose.modules import ConditioningConfig

    transformer, adapter = build(args.lora_rank)
    base = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
    base += sum(p.numel() for p in adapter.parameters()) + image_encoders_values()
    tokens, text = (args.side // 16) ** 2, args.text
    double, single, inputs = block_bytes(transformer, tokens, text, args.refs)
    layout_blocks = len(ConditioningConfig().resolved_layout_blocks)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assemble = layout_blocks * 4 * tokens * width * BF16  # q, k, v, out over every image token
    n_double, n_single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    vae_full, vae_ckpt = vae_bytes(args.side)
    acts = {
        "off": n_double * double + n_single * single + assemble + args.aux_samples * vae_full,
        "on": (n_double + n_single) * inputs + max(double, single) + assemble + args.aux_samples * vae_ckpt,
    }
    adapter_values = sum(p.numel() for p in adapter.parameters())
    rows = []
    for stage in ("1", "2"):
        tensors = trained_tensors(transformer, adapter, stage)
        values = sum(tensors)
        lora = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n)
        frozen = (base - (values - lora)) * BF16  # the adapter's trained parts are fp32 master weights instead
        for optimizer in ("adamw", "adamw8bit"):
            moments = sum(moment_bytes(n, optimizer == "adamw8bit") for n in tensors)
            for checkpointing, act in acts.items():
                states = frozen + 8 * values + moments  # fp32 master + fp32 gradient + moments
                weights = frozen + 4 * values  # FSDP: gathered whole during a micro-batch, beside their shards
                sharded = weights + (weights + 4 * values + moments) / args.gpus
                rows.append(
                    (
                        f"stage {stage}, {optimizer}, checkpointing {checkpointing}",
                        dict(values=values, frozen=frozen, trained=8 * values, moments=moments, act=act,
                             one=states + act, sharded=sharded + act),
                    )
                )  # fmt: skip
    parts = dict(double=double, single=single, inputs=inputs, assemble=assemble, vae_full=vae_full,
                 vae_ckpt=vae_ckpt, tokens=tokens, adapter=adapter_values)  # fmt: skip
    return rows, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=1024, help="image side in pixels (tokens: (side/16)^2)")
    parser.add_argument("--text", type=int, default=512, help="T5 tokens")
    parser.add_argument("--refs", type=int, default=10, help="refs of the scene (modulation regions)")
    parser.add_argument("--lora-rank", type=int, default=16, help="compose.lora_rank")
    parser.add_argument("--aux-samples", type=int, default=4, help="compose.aux_samples: images decoded with grads")
    parser.add_argument("--gpus", type=int, default=8, help="FSDP full-shard over this many GPUs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, p = estimate(args)
    print(
        f"{p['tokens']} image + {args.text} text tokens, batch 1, bf16, kept for backward: double block "
        f"{p['double'] / GIB:.3f} GiB, single block {p['single'] / GIB:.3f} GiB, block inputs {p['inputs'] / GIB:.3f} "
        f"GiB, Assemble-Attn (all layout blocks) {p['assemble'] / GIB:.3f} GiB; one decoded {args.side}^2 image "
        f"{p['vae_full'] / GIB:.2f} GiB ({p['vae_ckpt'] / GIB:.2f} GiB checkpointed)"
    )
    print(
        f"| case | trained values | frozen bf16 | trained fp32 + grads | moments | activations | 1 GPU | "
        f"{args.gpus} GPUs, FSDP full-shard |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['values'] / 1e6:.1f} M | {r['frozen'] / GIB:.1f} | {r['trained'] / GIB:.2f} | "
            f"{r['moments'] / GIB:.2f} | {r['act'] / GIB:.1f} | {r['one'] / GIB:.1f} GiB | "
            f"{r['sharded'] / GIB:.1f} GiB |"
        )


if __name__ == "__main__":
    main()
