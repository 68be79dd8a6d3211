"""OcclusionPriority: per-depth weights where boxes overlap, in Assemble-Attn's average and the modulation regions."""

from __future__ import annotations

import math

import pytest
import torch

from moviepostproduction.backbones.assemble import (
    assemble_attention,
    assemble_residual,
    image_qkv,
    scatter_mean,
)
from moviepostproduction.backbones.assemble_rows import pack_rows
from moviepostproduction.backbones.flux import ConditionedFlux
from moviepostproduction.conditioning import RefBatch, build_packing, build_regions
from moviepostproduction.layout import bbox_token_mask
from moviepostproduction.modules import PRESETS, CompositionAdapter, ConditioningConfig, OcclusionPriority
from moviepostproduction.modules.occlusion import LOGIT_SCALE
from moviepostproduction.panorama import remap_conditioning

from helpers import flux_inputs, make_tiny_flux, randomize_zero_inits

GRID = (8, 8)
TEXT = 6
CFG = PRESETS["tiny"].with_(occlusion_priority=True)
FRONT, BACK = [0.0, 0.0, 0.625, 0.625], [0.375, 0.375, 1.0, 1.0]  # overlap: tokens (3..4, 3..4)


def layered_refs(depths=("fg", "bg"), boxes=(FRONT, BACK), seed: int = 0) -> RefBatch:
    gen = torch.Generator().manual_seed(seed)
    r = len(boxes)
    return RefBatch(
        bboxes=torch.tensor([list(boxes)]),
        depth=torch.tensor([[("fg", "mg", "bg").index(d) for d in depths]]),
        valid=torch.ones(1, r, dtype=torch.bool),
        clip=torch.randn(1, r, CFG.clip_dim, generator=gen),
        dino=torch.randn(1, r, CFG.dino_dim, generator=gen),
    )


def set_logits(adapter: CompositionAdapter, layout: list[float], modulation: list[float]) -> None:
    with torch.no_grad():
        adapter.occlusion.logits.copy_(torch.tensor([layout, modulation]) / LOGIT_SCALE)


def test_priority_starts_at_one_and_indexes_depths():
    priority = OcclusionPriority()
    depth, valid = torch.tensor([[0, 2, 1]]), torch.tensor([[True, True, False]])
    layout, modulation = priority(depth, valid)
    assert torch.equal(layout, torch.ones(1, 3)) and torch.equal(modulation, torch.ones(1, 3))
    with torch.no_grad():
        priority.logits.copy_(torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.0, -0.1]]))
    layout, modulation = priority(depth, valid)
    torch.testing.assert_close(layout, torch.tensor([[math.exp(2.0), 1.0, 1.0]]))  # padding stays 1
    torch.testing.assert_close(modulation, torch.tensor([[1.0, math.exp(-1.0), 1.0]]))


def test_regions_share_an_overlap_by_priority_and_keep_single_boxes():
    hard = bbox_token_mask(torch.tensor([[FRONT, BACK]]), GRID).float()  # (1, 2, 64)
    soft = torch.rand(1, 2, 64, generator=torch.Generator().manual_seed(0)) * hard
    alpha = torch.tensor([[0.7, 0.4]])
    for masks in (hard, soft):
        plain = build_regions(masks, alpha)
        ones = build_regions(masks, alpha, torch.ones(1, 2))
        assert torch.equal(ones.index, plain.index) and torch.equal(ones.coef, plain.coef)  # exactly, at init
    weighted = build_regions(hard, alpha, torch.tensor([[3.0, 1.0]]))
    coef = weighted.coef[0, weighted.index[0]]  # (64, 2) per token
    both, front_only = 3 * 8 + 3, 0  # a token in the overlap, one in the front box only
    torch.testing.assert_close(coef[both], torch.tensor([0.7 * 2 * 3 / 4, 0.4 * 2 * 1 / 4]))  # sums to 2 boxes' share
    torch.testing.assert_close(coef[front_only], torch.tensor([0.7, 0.0]))
    assert (coef[hard[0].sum(0) == 0] == 0).all()


def test_packing_weights_and_reference_average():
    hard = bbox_token_mask(torch.tensor([[FRONT, BACK]]), GRID)
    valid = torch.ones(1, 2, dtype=torch.bool)
    packing = build_packing(hard, valid, priority=torch.tensor([[4.0, 1.0]]))
    assert torch.equal(packing.group_weight, torch.tensor([4.0, 1.0]))
    assert packing.denominator()[0, 3 * 8 + 3] == 5.0 and packing.denominator()[0, 0] == 4.0
    assert packing.denominator()[0, 7 * 8 + 7] == 1.0 and packing.denominator()[0, 7] == 0.0
    values = torch.stack([torch.full((packing.token_index.shape[1], 1), v) for v in (1.0, -1.0)])  # (G, L, 1)
    out = scatter_mean(values, packing, (1, 64, 1))[0, :, 0].view(8, 8)
    assert out[3, 3] == pytest.approx((4 - 1) / 5) and out[0, 0] == 1.0 and out[7, 7] == -1.0 and out[0, 7] == 0.0
    plain = build_packing(hard, valid)
    assert plain.group_weight is None and torch.equal(plain.denominator(), plain.cover)


def test_assemble_residual_equals_the_weighted_per_group_reference():
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(CFG))
    randomize_zero_inits(model.adapter, std=0.1)
    set_logits(model.adapter, [1.5, 0.0, -0.5], [0.0, 0.0, 0.0])
    attn, out_proj = model.transformer.transformer_blocks[0].attn, model.adapter.assemble["0"]
    image = torch.randn(1, 64, CFG.hidden_dim)
    inputs = flux_inputs(1, GRID, TEXT)
    cos, sin = model.transformer.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    rope = (cos[TEXT:], sin[TEXT:])
    with torch.no_grad():
        cond = model.prepare(layered_refs(("fg", "bg")), GRID, TEXT)
        packed = out_proj(assemble_attention(attn, image, cond.layout_tokens, cond.packing, rope))  # (G, L, D)
        reference = scatter_mean(packed, cond.packing, image.shape)
        rows = pack_rows(cond.packing, 64)
        fast = assemble_residual(attn, out_proj, image_qkv(attn, image), cond.layout_tokens, cond.packing, rows, rope)
    torch.testing.assert_close(fast, reference.flatten(0, 1)[rows.covered], rtol=0, atol=1e-5)
    w_front, w_back = math.exp(1.5), math.exp(-0.5)
    slot = lambda g, token: (cond.packing.token_index[g] == token).nonzero().item()  # noqa: E731
    overlap = 3 * 8 + 3
    want = (w_front * packed[0, slot(0, overlap)] + w_back * packed[1, slot(1, overlap)]) / (w_front + w_back)
    torch.testing.assert_close(reference[0, overlap], want, rtol=0, atol=1e-5)


def test_zero_init_priority_changes_nothing_and_learns_from_overlaps():
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(PRESETS["tiny"]))
    randomize_zero_inits(model.adapter, std=0.1)
    refs, inputs = layered_refs(("fg", "bg")), flux_inputs(1, GRID, TEXT)
    plain = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT)).detach()  # with autograd, as below
    adapter, fresh = model.adapter.reconfigured(occlusion_priority=True)
    assert fresh == ["occlusion.logits"]
    model.adapter = adapter
    cond = model.prepare(refs, GRID, TEXT)
    out = model(**inputs, conditioning=cond)
    assert torch.equal(out.detach(), plain)  # exactly DESIGN 3's average and sum until the logits move
    out.square().mean().backward()
    grad = adapter.occlusion.logits.grad.clone()
    assert grad[:, 0].abs().min() > 0 and grad[:, 2].abs().min() > 0  # fg and bg overlap: both pathways learn
    assert torch.equal(grad[:, 1], torch.zeros(2))  # no mg ref in the scene
    torch.testing.assert_close(grad[:, 0], -grad[:, 2])  # only the ratio of the two weights matters
    separate = layered_refs(("fg", "bg"), boxes=([0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]))
    adapter.occlusion.logits.grad = None
    model(**inputs, conditioning=model.prepare(separate, GRID, TEXT)).square().mean().backward()
    # No overlap, nothing to weigh: w / w in a single box has zero derivative (up to its rounding).
    assert adapter.occlusion.logits.grad.abs().max() < 1e-4 * grad[:, 0].abs().min()


def test_the_front_ref_owns_the_overlap_under_a_strong_priority():
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(CFG))
    randomize_zero_inits(model.adapter, std=0.2)
    set_logits(model.adapter, [30.0, 0.0, 0.0], [30.0, 0.0, 0.0])
    inputs = flux_inputs(1, GRID, TEXT)
    with torch.no_grad():
        cond = model.prepare(layered_refs(("fg", "bg")), GRID, TEXT)
        front_only = model.prepare(layered_refs(("fg",), boxes=(FRONT,)), GRID, TEXT)
    overlap = 3 * 8 + 3
    image = cond.image_regions.coef[0, cond.image_regions.index[0, overlap]]  # (R,)
    torch.testing.assert_close(image, torch.stack([2 * cond.alpha[0, 0], torch.tensor(0.0)]), rtol=1e-6, atol=1e-6)
    assert cond.packing.denominator()[0, overlap] == pytest.approx(math.exp(30.0) + 1, rel=1e-6)
    assert front_only.layout_priority.shape == (1, 1)
    remapped = remap_conditioning(cond, GRID, pad=1, shift=2)
    assert remapped.layout_priority is cond.layout_priority
    assert torch.equal(remapped.packing.group_weight, cond.packing.group_weight)
    assert cond.to(dtype=torch.float64).packing.cover_weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs, conditioning=cond)).all()


def test_occlusion_priority_config_is_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="occlusion_priority='yes' must be true or false"):
        ConditioningConfig(occlusion_priority="yes")
    assert CompositionAdapter(PRESETS["tiny"]).occlusion is None  # off by default: DESIGN 3's average
    adapter = CompositionAdapter(CFG)
    set_logits(adapter, [1.0, 0.5, 0.0], [0.0, -1.0, 0.0])
    loaded = CompositionAdapter.from_pretrained(adapter.save_pretrained(tmp_path / "adapter"))
    assert loaded.cfg.occlusion_priority and torch.equal(loaded.occlusion.logits, adapter.occlusion.logits)
