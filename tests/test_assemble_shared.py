"""Assemble-Attn at any box size: both plans (size buckets, shared attention) equal the per-group reference
(tests/assemble_reference.py), the plan is chosen by cost, and neither builds a (slots x slots) mask."""

from __future__ import annotations

import pytest
import torch

from assemble_reference import reference_residual
from moviepostproduction.compose import assemble_shared
from moviepostproduction.compose.assemble import assemble_residual, image_qkv
from moviepostproduction.compose.assemble_rows import pack_rows
from moviepostproduction.compose.conditioning import build_packing
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.layout import bbox_token_mask
from moviepostproduction.sampling import latent_image_ids

from helpers import make_tiny_flux, randomize_zero_inits

GRID = (8, 8)
N = GRID[0] * GRID[1]
# Full frame, overlapping, a box wrapping the panorama seam (x0 > x1), a thin box, a corner box.
BOXES = [
    [0.0, 0.0, 1.0, 1.0],
    [0.1, 0.2, 0.7, 0.9],
    [0.3, 0.1, 0.95, 0.6],
    [0.8, 0.25, 0.3, 0.75],
    [0.45, 0.0, 0.5, 1.0],
    [0.6, 0.6, 1.0, 1.0],
]


def block_parts(tiny_cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = ConditionedFlux(make_tiny_flux(), CompositionAdapter(tiny_cfg))
    randomize_zero_inits(model.adapter, std=0.1)
    attn, out_proj = model.transformer.transformer_blocks[0].attn, model.adapter.assemble["0"]
    cos, sin = model.transformer.pos_embed(latent_image_ids(*GRID))
    return model, attn, out_proj, (cos, sin)


def scene(batch: int, priority: bool, seed: int = 0):
    """A packing of BOXES (sample 1: a shuffled subset of them), hard masks as the adapter builds them."""
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.tensor(BOXES).expand(batch, -1, -1).clone()  # (B, R, 4)
    valid = torch.ones(batch, len(BOXES), dtype=torch.bool)
    if batch > 1:
        boxes[1] = boxes[1, torch.randperm(len(BOXES), generator=gen)]
        valid[1, 4:] = False
    weights = torch.rand(batch, len(BOXES), generator=gen) * 3 + 0.1 if priority else None
    return build_packing(bbox_token_mask(boxes, GRID), valid, priority=weights)


@pytest.mark.parametrize("batch,priority", [(1, False), (2, False), (2, True)])
def test_both_plans_equal_the_per_group_reference(tiny_cfg, batch, priority):
    _, attn, out_proj, rope = block_parts(tiny_cfg)
    packing = scene(batch, priority)
    image = torch.randn(batch, N, tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(1))
    layout = torch.randn(batch, len(BOXES), tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference_residual(attn, out_proj, image, layout, packing, rope).flatten(0, 1)
        for path in ("buckets", "shared"):
            rows = pack_rows(packing, batch * N, path=path)
            assert (rows.shared is not None) == (path == "shared")
            got = assemble_residual(attn, out_proj, image_qkv(attn, image), layout, packing, rows, rope)
            torch.testing.assert_close(got, want[rows.covered], rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert (want.view(batch, N, -1)[packing.cover == 0] == 0).all()


def test_bf16_stays_close_to_the_fp32_reference(tiny_cfg):
    _, attn, out_proj, rope = block_parts(tiny_cfg)
    packing = scene(2, True)
    image = torch.randn(2, N, tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(3))
    layout = torch.randn(2, len(BOXES), tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference_residual(attn, out_proj, image, layout, packing, rope).flatten(0, 1)
        attn_h, out_h = attn.to(torch.bfloat16), out_proj.to(torch.bfloat16)
        half = (image.bfloat16(), layout.bfloat16(), tuple(r.bfloat16() for r in rope))
        rows = pack_rows(packing, 2 * N, path="shared")
        got = assemble_residual(attn_h, out_h, image_qkv(attn_h, half[0]), half[1], packing, rows, half[2])
    assert got.dtype == torch.bfloat16
    error = (got.float() - want[rows.covered]).abs().max() / want.abs().max()
    assert error < 3e-2


def test_a_box_far_below_the_rows_max_is_recomputed_exactly(tiny_cfg, monkeypatch):
    """Scores 100+ apart: a small box's softmax normaliser underflows against the row's max; those queries take the
    log-space path and still equal the reference."""
    _, attn, out_proj, rope = block_parts(tiny_cfg)
    with torch.no_grad():
        attn.norm_q.weight.mul_(12.0)
        attn.norm_k.weight.mul_(12.0)
    packing = scene(1, False)
    image = torch.randn(1, N, tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(5)) * 2
    layout = torch.randn(1, len(BOXES), tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(6))
    exact_rows = []
    original = assemble_shared._exact_rows

    def counted(queries, *args):
        exact_rows.append(queries.shape[1])
        return original(queries, *args)

    monkeypatch.setattr(assemble_shared, "_exact_rows", counted)
    with torch.no_grad():
        want = reference_residual(attn, out_proj, image, layout, packing, rope).flatten(0, 1)
        rows = pack_rows(packing, N, path="shared")
        got = assemble_residual(attn, out_proj, image_qkv(attn, image), layout, packing, rows, rope)
    assert sum(exact_rows) > 0
    torch.testing.assert_close(got, want[rows.covered], rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_gradients_of_both_plans_agree(tiny_cfg):
    _, attn, out_proj, rope = block_parts(tiny_cfg)
    packing = scene(2, True)
    image0 = torch.randn(2, N, tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(7))
    layout0 = torch.randn(2, len(BOXES), tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(8))
    grads = {}
    for path in ("buckets", "shared"):
        image, layout = image0.clone().requires_grad_(True), layout0.clone().requires_grad_(True)
        rows = pack_rows(packing, 2 * N, path=path)
        out = assemble_residual(attn, out_proj, image_qkv(attn, image), layout, packing, rows, rope)
        out.square().sum().backward()
        grads[path] = (image.grad, layout.grad, out_proj.out.weight.grad.clone())
        out_proj.zero_grad(set_to_none=True)
    for a, b in zip(grads["buckets"], grads["shared"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_the_plan_follows_the_work_and_bad_paths_are_one_line(tiny_cfg):
    many_large = torch.tensor(BOXES * 4)[None]  # 24 boxes, most of them large
    small = torch.tensor([[[0.0, 0.0, 0.25, 0.25], [0.5, 0.5, 0.75, 0.75]]])
    cases = [(many_large, (32, 32), "shared"), (small, (32, 32), "buckets"), (many_large, GRID, "buckets")]
    for boxes, grid, expected in cases:  # the last: too little work to leave the fused bucket calls
        packing = build_packing(bbox_token_mask(boxes, grid), torch.ones(boxes.shape[:2], dtype=torch.bool))
        tokens = grid[0] * grid[1]
        with torch.no_grad():
            rows = pack_rows(packing, tokens, head_dim=16, path="auto")
        assert (rows.shared is not None) == (expected == "shared") and rows.path == "auto"
        with torch.enable_grad():  # training plans buckets (autograd memory), whatever the boxes
            assert pack_rows(packing, tokens, head_dim=16, path="auto").shared is None
    with pytest.raises(ValueError, match=r"^assemble path='fast': choose from \('auto', 'buckets', 'shared'\)$"):
        pack_rows(packing, N, path="fast")
    with pytest.raises(ValueError, match=r"assemble_path='fast'"):
        ConditionedFlux(make_tiny_flux(), CompositionAdapter(tiny_cfg), assemble_path="fast")


def test_bucket_rows_carry_a_key_prefix_mask_only(tiny_cfg):
    packing = scene(2, False)
    rows = pack_rows(packing, 2 * N, path="buckets")
    lengths = packing.key_mask.sum(1)
    for bucket in rows.buckets:
        p, s = bucket.source.shape
        groups = bucket.segment[:, 0]  # one group per row
        assert (groups >= 0).all() and bool(((bucket.segment == groups[:, None]) | (bucket.segment < 0)).all())
        prefix = torch.arange(s)[None] < lengths[groups][:, None]  # (P, S)
        if bucket.padded:
            assert bucket.key_mask.shape == (p, 1, 1, s) and torch.equal(bucket.key_mask[:, 0, 0], prefix)
        else:
            assert bucket.key_mask is None and prefix.all()
    assert rows.mask_bytes == sum(b.source.numel() for b in rows.buckets if b.padded)
    stacked = build_packing(bbox_token_mask(torch.tensor([BOXES[1]] * 3)[None], GRID), torch.ones(1, 3).bool())
    assert all(b.key_mask is None for b in pack_rows(stacked, N).buckets)  # equal lengths: no mask at all


def test_underflowing_queries_are_recomputed_inside_a_compiled_graph_too(tiny_cfg):
    """Under torch.compile the fallback is a torch.cond, not a host sync: same output as eager."""
    _, attn, out_proj, rope = block_parts(tiny_cfg)
    with torch.no_grad():
        attn.norm_q.weight.mul_(12.0)
        attn.norm_k.weight.mul_(12.0)
    packing = scene(1, False)
    image = torch.randn(1, N, tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(5)) * 2
    layout = torch.randn(1, len(BOXES), tiny_cfg.hidden_dim, generator=torch.Generator().manual_seed(6))
    rows = pack_rows(packing, N, path="shared")

    def residual(image, layout):
        return assemble_residual(attn, out_proj, image_qkv(attn, image), layout, packing, rows, rope)

    torch._dynamo.reset()
    with torch.no_grad():
        want = residual(image, layout)
        got = torch.compile(residual, backend="eager", fullgraph=True)(image, layout)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
