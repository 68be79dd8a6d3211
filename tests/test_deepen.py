"""Deepening a trained FLUX transformer + adapter: appended blocks start as the identity, then learn."""

from __future__ import annotations

import pytest
import torch

from moviepostproduction.compose.deepen import Deepening, deepen_adapter, deepen_transformer
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter

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


def test_fresh_backbone_script_writes_a_wider_deeper_untrained_model_dir(tmp_path):
    """scripts/fresh_backbone.py: the source's frozen parts copied byte for byte, a random-init backbone and adapter of
    the new size that compose, and the source's layout blocks kept where they still exist."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from moviepostproduction.encoders import load_transformer
    from moviepostproduction.model_dir import ModelDir
    from moviepostproduction.sampling import latent_image_ids, text_ids
    from moviepostproduction.toyworld.tiny import write_tiny_model_dir

    source = write_tiny_model_dir(tmp_path / "model", seed=0)
    imposed, _ = CompositionAdapter.from_pretrained(source / "adapter").reconfigured(occlusion_priority=True)
    imposed.save_pretrained(source / "adapter")  # as the shipped toy model: a sampling choice the new one drops
    script = Path(__file__).resolve().parents[1] / "scripts" / "fresh_backbone.py"
    out = tmp_path / "wide"
    args = ["--heads", "3", "--head-dim", "16", "--double-blocks", "2", "--single-blocks", "3", "--seed", "1"]
    command = [sys.executable, str(script), str(source), str(out), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    md = ModelDir.at(out)
    md.check()
    transformer = load_transformer(md)
    cfg = transformer.config
    assert (cfg.num_attention_heads, cfg.attention_head_dim, cfg.num_layers, cfg.num_single_layers) == (3, 16, 2, 3)
    assert (
        sum(cfg.axes_dims_rope) == 16
        and cfg.joint_attention_dim == load_transformer(ModelDir.at(source)).config.joint_attention_dim
    )
    adapter = CompositionAdapter.from_pretrained(out / "adapter")
    old = CompositionAdapter.from_pretrained(source / "adapter").cfg
    assert old.occlusion_priority and not adapter.cfg.occlusion_priority
    assert adapter.cfg == old.with_(
        hidden_dim=48, num_double_blocks=2, num_single_blocks=3, layout_blocks=(0,), occlusion_priority=False
    )
    for part in ("vae", "text_encoder", "text_encoder_2", "image_encoders/dino", "tokenizer_2"):
        for file in (source / part).iterdir():
            assert (out / part / file.name).read_bytes() == file.read_bytes()
    assert "untrained 2+3 blocks x 48" in json.loads((out / "model_index.json").read_text())["label"]
    model = ConditionedFlux(transformer, adapter)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(2, GRID[0] * GRID[1], cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(2, TEXT, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.rand(2, generator=gen),
        img_ids=latent_image_ids(*GRID),
        txt_ids=text_ids(TEXT),
        guidance=torch.full((2,), 3.5),
    )
    refs = random_refs(2, 3, adapter.cfg, counts=[3, 2], text_len=TEXT)
    with torch.no_grad():
        v = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
    assert v.shape == inputs["hidden_states"].shape and torch.isfinite(v).all()
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "wide exists; pick a new directory" in again.stderr


def test_move_like_casts_only_a_differing_dtype_and_so_raises_no_diffusers_warning():
    import logging

    from diffusers.utils import logging as diffusers_logging

    from moviepostproduction.model_dir import move_like

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        model = make_tiny_flux(0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        same = move_like(model, "cpu", torch.float32)
        assert same is model and all(torch.equal(v, before[k]) for k, v in same.state_dict().items())
        assert not [r for r in records if "Casting directly" in r.getMessage()]
        model.to(dtype=torch.float32)  # the plain cast of the same dtype is what warns
        assert [r for r in records if "Casting directly" in r.getMessage()]
        half = move_like(make_tiny_flux(0), "cpu", torch.bfloat16)
        assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    finally:
        root.removeHandler(handler)
