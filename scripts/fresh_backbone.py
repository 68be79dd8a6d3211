"""Copy a model dir with a new, random-init backbone of another size: the start of a wider / deeper toy model.

    python scripts/fresh_backbone.py src/moviepostproduction/assets/toy-model build/toy-wide \
        --heads 8 --head-dim 32 --double-blocks 4 --single-blocks 4 --seed 0

The frozen parts (VAE, text and image encoders, tokenizers, scheduler) and the NanoDiT are copied as they are. The
transformer (`FluxTransformer2DModel`, the source's config with the new size; RoPE axes re-split for the head dim) and
the adapter (the source's `ConditioningConfig` with the new width and block counts; Assemble-Attn in the source's
layout blocks; no occlusion priority, which the shipped toy model imposes at sampling after training, docs/toy-model.md)
start from their own seeded initialisation, as `mpp train` stage `toy` expects. The starting point of
examples/train/toy-wide.yaml.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from derived_dir import add_source_and_out, parse_source_and_out

from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.files import save_pretrained_readable, staged_copy, write_json_atomic
from moviepostproduction.toyworld.tiny import rope_axes


def fresh_transformer(source: Path, heads: int, head_dim: int, double: int, single: int):
    from diffusers import FluxTransformer2DModel

    config = {k: v for k, v in json.loads((source / "transformer" / "config.json").read_text()).items() if k[0] != "_"}
    config.update(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=double,
        num_single_layers=single,
        axes_dims_rope=rope_axes(head_dim),
    )
    return FluxTransformer2DModel(**config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_and_out(parser, "a complete model dir (its encoders, VAE and NanoDiT are copied)")
    parser.add_argument("--heads", type=int, required=True, help="attention heads (width = heads x head dim)")
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--double-blocks", type=int, required=True)
    parser.add_argument("--single-blocks", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0, help="seed of the backbone's and the adapter's init")
    args, source, out = parse_source_and_out(parser, argv)
    old = CompositionAdapter.from_pretrained(source / "adapter").cfg
    blocks = [b for b in old.resolved_layout_blocks if b < args.double_blocks]
    cfg = old.with_(
        hidden_dim=args.heads * args.head_dim,
        num_double_blocks=args.double_blocks,
        num_single_blocks=args.single_blocks,
        layout_blocks=tuple(blocks),
        occlusion_priority=False,
    )
    torch.manual_seed(args.seed)
    transformer = fresh_transformer(source, args.heads, args.head_dim, args.double_blocks, args.single_blocks)
    torch.manual_seed(args.seed + 1)
    adapter = CompositionAdapter(cfg)
    with staged_copy(source, out, leave_out=("transformer", "adapter")) as tmp:
        save_pretrained_readable(transformer, tmp / "transformer")
        adapter.save_pretrained(tmp / "adapter")
        index = json.loads((tmp / "model_index.json").read_text())
        for key in ("trained_steps", "trained_by"):
            index.pop(key, None)
        size = f"{args.double_blocks}+{args.single_blocks} blocks x {cfg.hidden_dim}"
        index["label"] = f"toy-world model, untrained {size}"
        write_json_atomic(index, tmp / "model_index.json")
    params = sum(p.numel() for p in transformer.parameters()) + sum(p.numel() for p in adapter.parameters())
    print(f"wrote {out}: {args.double_blocks}+{args.single_blocks} blocks, width {cfg.hidden_dim}, {params:,} params")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
