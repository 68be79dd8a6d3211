"""Deepening a trained FLUX transformer + adapter: appended blocks start as the identity, then learn."""

from __future__ import annotations

import pytest
import torch

from moviepostproduction.backbones.deepen import Deepening, deepen_adapter, deepen_transformer
from moviepostproduction.backbones.flux import ConditionedFlux
from moviepostproduction.modules import CompositionAdapter

from helpers import flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits

GRID, TEXT = (8, 8), 6


def trained_model(cfg) -> ConditionedFlux:
    """A tiny model whose every weight (zero-init ones included) is non-trivial, as after training."""
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(cfg.with_(layout_blocks=None)))
    randomize_zero_inits(model.adapter, std=0.2)
    return model


def deepened(model: ConditionedFlux, plan: Deepening, seed: int = 0) -> ConditionedFlux:
    adapter, _ = deepen_adapter(model.adapter, plan, seed=seed)
    return ConditionedFlux(deepen_transformer(model.transformer, plan, seed=seed), adapter)


def test_deepened_model_computes_exactly_what_the_old_one_did(tiny_cfg):
    model = trained_model(tiny_cfg)
    plan = Deepening(double_blocks=2, single_blocks=3)
    deeper = deepened(model, plan)
    config = deeper.transformer.config
    assert (config.num_layers, config.num_single_layers) == (4, 4)
    assert (deeper.adapter.cfg.num_double_blocks, deeper.adapter.cfg.num_single_blocks) == (4, 4)
    # The old default "every third double block" would add a layout block at 3; the old ones are pinned.
    assert deeper.adapter.cfg.resolved_layout_blocks == model.adapter.cfg.resolved_layout_blocks == (0,)
    assert not any(p.requires_grad for p in deeper.transformer.parameters())  # frozen, as load_transformer
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 3, tiny_cfg, counts=[3, 2], text_len=TEXT)
    with torch.no_grad():
        before = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
        after = deeper(**inputs, conditioning=deeper.prepare(refs, GRID, TEXT))
        assert not torch.equal(before, model(**inputs, conditioning=None))  # the conditioning acts
    assert torch.equal(before, after)  # exact: each new block adds 0 * (its output)
    # Old tensors are carried over untouched; the new blocks' gates are zero rows of their own AdaLN linear.
    old, new = model.transformer.state_dict(), deeper.transformer.state_dict()
    assert all(torch.equal(v, new[k]) for k, v in old.items())
    width = config.num_attention_heads * config.attention_head_dim
    gates = deeper.transformer.transformer_blocks[2].norm1.linear.weight.view(6, width, -1)
    assert gates[[2, 5]].abs().sum() == 0 and gates[[0, 1, 3, 4]].abs().sum() > 0


def test_new_blocks_learn_from_the_first_step(tiny_cfg):
    deeper = deepened(trained_model(tiny_cfg), Deepening(double_blocks=1, single_blocks=1))
    deeper.transformer.requires_grad_(True)
    out = deeper(**flux_inputs(2, GRID, TEXT), conditioning=deeper.prepare(random_refs(2, 2, tiny_cfg), GRID, TEXT))
    out.pow(2).mean().backward()
    config = deeper.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    double = deeper.transformer.transformer_blocks[2]
    single = deeper.transformer.single_transformer_blocks[1]
    for linear, chunks in ((double.norm1.linear, 6), (double.norm1_context.linear, 6), (single.norm.linear, 3)):
        assert linear.weight.grad.view(chunks, width, -1)[2].abs().sum() > 0  # the gate rows open
    # Behind a zero gate nothing else of the block gets a gradient yet (adaLN-Zero).
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in double.attn.parameters())
    new_bridge = deeper.adapter.feedback_bridge.up[1].weight
    assert new_bridge.abs().sum() == 0  # zero-init, like every fresh bridge


def test_deepening_is_deterministic_and_validates_its_plan(tiny_cfg):
    model = trained_model(tiny_cfg)
    a, b = (deepened(model, Deepening(1, 1), seed=3) for _ in range(2))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for bad in ({"double_blocks": -1}, {"single_blocks": 1.5}, {"double_blocks": True}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.* must be an integer >= 0"):
            Deepening(**bad)
