"""Deepen a trained FLUX transformer and its adapter by appending blocks that start as the identity.

Each new block's AdaLN gates come from zeroed rows of its own modulation linear (double blocks: gate_msa and
gate_mlp of both streams; single blocks: the one gate), so it adds exactly zero to every stream whatever its
other weights and whatever per-token temb offsets reach it: the deepened model computes what the old one did.
The gate rows get gradients from the first step (attention and MLP outputs are non-zero), so training opens the
new blocks gradually, as adaLN-Zero does in DiT. New double blocks go after the old double blocks and new single
blocks after the old single blocks, so the feedback bridge (double block b -> b + 1) and the layout blocks keep
their indices; the adapter's new per-block modules (modulation projections, bridges) start from their own init
(the bridges' zero-init `up` included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moviepostproduction.compose.modules.adapter import CompositionAdapter
from moviepostproduction.model_dir import freeze, move_like
from moviepostproduction.sampling import is_count

# Chunk positions of the gates in the outputs of AdaLayerNormZero (6 chunks: shift, scale, gate for attention,
# then for the MLP) and AdaLayerNormZeroSingle (3 chunks: shift, scale, gate).
DOUBLE_GATES, SINGLE_GATES = (2, 5), (2,)


@dataclass(frozen=True)
class Deepening:
    """Blocks to append: `double_blocks` double-stream and `single_blocks` single-stream."""

    double_blocks: int = 0
    single_blocks: int = 0

    def __post_init__(self) -> None:
        for name in ("double_blocks", "single_blocks"):
            value = getattr(self, name)
            if not is_count(value):
                raise ValueError(f"{name}={value!r} must be an integer >= 0")


def zero_gates(linear: nn.Linear, chunks: int, gates: tuple[int, ...]) -> None:
    """Zero the output rows of `linear` that become the listed chunks of its (chunks * D) output."""
    width = linear.out_features // chunks
    with torch.no_grad():
        for c in gates:
            linear.weight[c * width : (c + 1) * width].zero_()
            if linear.bias is not None:
                linear.bias[c * width : (c + 1) * width].zero_()


def deepen_transformer(transformer: nn.Module, plan: Deepening, seed: int = 0) -> nn.Module:
    """A frozen FluxTransformer2DModel with the old blocks' weights and `plan`'s identity blocks appended."""
    from diffusers import FluxTransformer2DModel

    old_double, old_single = transformer.config.num_layers, transformer.config.num_single_layers
    config = {
        **transformer.config,
        "num_layers": old_double + plan.double_blocks,
        "num_single_layers": old_single + plan.single_blocks,
    }
    param = next(transformer.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        deeper = FluxTransformer2DModel.from_config(config)
    deeper = move_like(deeper, param.device, param.dtype)
    missing, unexpected = deeper.load_state_dict(transformer.state_dict(), strict=False)
    new_prefixes = tuple(f"transformer_blocks.{i}." for i in range(old_double, config["num_layers"])) + tuple(
        f"single_transformer_blocks.{i}." for i in range(old_single, config["num_single_layers"])
    )
    stray = [k for k in missing if not k.startswith(new_prefixes)]
    if unexpected or stray:  # cannot happen for a FluxTransformer2DModel; guards against other classes
        raise ValueError(f"deepening lost tensors: missing {stray[:3]}, unexpected {unexpected[:3]}")
    for block in deeper.transformer_blocks[old_double:]:
        zero_gates(block.norm1.linear, 6, DOUBLE_GATES)
        zero_gates(block.norm1_context.linear, 6, DOUBLE_GATES)
    for block in deeper.single_transformer_blocks[old_single:]:
        zero_gates(block.norm.linear, 3, SINGLE_GATES)
    return freeze(deeper)


def deepen_adapter(adapter: CompositionAdapter, plan: Deepening, seed: int = 0) -> tuple[CompositionAdapter, list[str]]:
    """The adapter for the deepened transformer and the names of its new tensors (which start from their init).

    The layout blocks are pinned to the old ones (a default of every third double block would add new ones).
    """
    cfg = adapter.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        deeper, fresh = adapter.reconfigured(
            num_double_blocks=cfg.num_double_blocks + plan.double_blocks,
            num_single_blocks=cfg.num_single_blocks + plan.single_blocks,
            layout_blocks=cfg.resolved_layout_blocks,
        )
    param = next(adapter.parameters())
    return deeper.to(device=param.device, dtype=param.dtype), fresh
