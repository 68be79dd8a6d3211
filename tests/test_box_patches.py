"""BoxPatchEncoding: bilinear reads of the refs' DINO patch grids, its Assemble-Attn residual, plumbing and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moviepostproduction.compose.assemble import average_on_covered, box_patch_values
from moviepostproduction.compose.conditioning import RefBatch
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import PRESETS, CompositionAdapter, ConditioningConfig
from moviepostproduction.compose.modules.box_patches import BoxPatchEncoding, patch_side, sample_grid
from moviepostproduction.layout import bbox_token_mask, token_extent
from moviepostproduction.panorama.wrap import remap_conditioning

from helpers import flux_inputs, make_tiny_flux, randomize_zero_inits, trained_assemble_part
from helpers import refs_at as boxed_refs

GRID = (8, 8)
TEXT = 6
CFG = PRESETS["tiny"].with_(box_patch_rank=8)
PATCHES = 16  # a 4 x 4 grid, as the toy DINO


def refs_at(bboxes: list[list[float]], seed: int = 0, patches: torch.Tensor | None = None) -> RefBatch:
    if patches is None:
        patches = torch.randn(1, len(bboxes), PATCHES, CFG.dino_dim, generator=torch.Generator().manual_seed(seed + 1))
    return boxed_refs(bboxes, CFG, seed, patches)


def test_sample_grid_is_bilinear_with_border_padding():
    gen = torch.Generator().manual_seed(0)
    grids = torch.randn(3, 4, 4, 5, generator=gen)  # (R, s, s, C)
    index = torch.randint(0, 3, (50,), generator=gen)
    points = torch.rand(50, 2, generator=gen) * 1.4 - 0.2  # some beyond the box
    got = sample_grid(grids, index, points)
    want = F.grid_sample(
        grids.permute(0, 3, 1, 2)[index],  # (S, C, s, s)
        (points * 2 - 1)[:, None, None],  # (S, 1, 1, 2) as (x, y) in [-1, 1]
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )[:, :, 0, 0]
    assert torch.allclose(got, want, atol=1e-5)
    centres = torch.tensor([[0.125, 0.125], [0.875, 0.375]])  # patch (0, 0) and row 1, column 3
    assert torch.equal(sample_grid(grids, torch.tensor([1, 2]), centres), torch.stack([grids[1, 0, 0], grids[2, 1, 3]]))
    assert patch_side(256) == 16
    with pytest.raises(ValueError, match="12 DINO patch tokens are not a square grid"):
        patch_side(12)


def test_token_extent_is_one_token_in_the_box_frame():
    extent = token_extent(torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.75, 0.0, 0.25, 0.5]]), (4, 8))
    assert torch.allclose(extent, torch.tensor([[0.25, 1 / 3], [0.25, 0.5]]))  # the second box wraps the seam


def test_box_patches_keep_plain_flux_at_init_and_reach_the_output():
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(CFG))
    inputs = flux_inputs(1, GRID, TEXT)
    boxes = [[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]
    refs = refs_at(boxes)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        assert cond.ref_patches is not None and cond.token_extent.shape == (1, 2, 2)
        assert (model(**inputs, conditioning=cond) - model.plain_forward(**inputs)).abs().max() <= 1e-5
        randomize_zero_inits(model.adapter, std=0.2)
        base = model(**inputs, conditioning=cond)
        changed = refs_at(boxes, patches=refs.dino_patches.clone())
        changed.dino_patches[0, 1] += 1.0  # the second ref's patch tokens only
        moved = model(**inputs, conditioning=model.prepare(changed, GRID, TEXT))
    diff = (moved - base).abs().amax(-1)[0]  # (N,)
    second = bbox_token_mask(torch.tensor(boxes[1]), GRID)
    assert diff[second].min() > 0  # the ref's own box reads its patches (later blocks spread it further)


def test_box_patch_residual_follows_the_patch_grid_inside_the_box():
    adapter = CompositionAdapter(CFG)
    randomize_zero_inits(adapter, std=0.2)
    encoding = adapter.assemble["0"].patches
    patches = torch.zeros(1, 1, PATCHES, CFG.dino_dim)
    patches[0, 0, :8] = torch.randn(8, CFG.dino_dim, generator=torch.Generator().manual_seed(1))  # top half only

    def residual(bboxes, grid_patches):
        cond = adapter.prepare(refs_at(bboxes, patches=grid_patches), GRID, TEXT)
        packing = cond.packing
        covered = packing.cover.reshape(-1).nonzero().squeeze(1)
        cover = packing.cover.reshape(-1)[covered]
        dense = torch.zeros(64, CFG.hidden_dim)
        frame = packing.coords[packing.key_mask[:, 1:]], packing.slot_groups()
        slots = box_patch_values(encoding, (cond.ref_patches, cond.token_extent), packing, *frame)
        dense[covered] = average_on_covered(slots, packing, covered, cover)
        return dense.view(8, 8, -1)

    with torch.no_grad():
        a = residual([[0.0, 0.0, 0.5, 0.5]], patches)  # 4 x 4 tokens: one token per patch
        b = residual([[0.25, 0.5, 0.75, 1.0]], patches)  # the same box moved
        blank = residual([[0.0, 0.0, 0.5, 0.5]], torch.zeros_like(patches))
    assert torch.allclose(a[:4, :4], b[4:, 2:6], atol=1e-6)  # box-relative
    assert torch.allclose(a[3, :4], blank[3, :4], atol=1e-6)  # the bottom row reads only the (zero) bottom patches
    assert not torch.allclose(a[0, 0], blank[0, 0], atol=1e-3)  # the top row reads the filled ones
    assert torch.equal(a[5, 5], torch.zeros(CFG.hidden_dim))  # nothing outside the box


def test_box_patches_learn_from_zero_init_and_survive_a_panorama_remap():
    cond, grad = trained_assemble_part(CFG, refs_at([[0.1, 0.1, 0.6, 0.5]]), "patches", GRID, TEXT)
    assert grad is not None and grad.abs().sum() > 0  # zero-init, yet it trains
    remapped = remap_conditioning(cond, GRID, pad=1, shift=3)
    assert remapped.ref_patches is cond.ref_patches and remapped.token_extent is cond.token_extent
    assert cond.to(dtype=torch.float64).ref_patches.dtype == torch.float64
    moved = refs_at([[0.1, 0.1, 0.6, 0.5]]).to(dtype=torch.float64)  # RefBatch.to: absent fields stay None
    assert moved.dino_patches.dtype == torch.float64 and moved.valid.dtype == torch.bool and moved.text_spans is None


def test_box_patches_without_patch_tokens_or_with_bad_ones_are_refused():
    adapter = CompositionAdapter(CFG)
    refs = refs_at([[0.1, 0.1, 0.6, 0.5]])
    refs.dino_patches = None
    with pytest.raises(ValueError, match=r"box patches are on \(box_patch_rank=8\) but the refs carry no DINO"):
        adapter.prepare(refs, GRID, TEXT)
    with pytest.raises(ValueError, match="RefBatch.dino_patches contains NaN or Inf"):
        refs_at([[0.1, 0.1, 0.6, 0.5]], patches=torch.full((1, 1, PATCHES, CFG.dino_dim), float("nan")))
    with pytest.raises(ValueError, match=r"RefBatch.dino_patches has leading shape \(1, 2\)"):
        refs_at([[0.1, 0.1, 0.6, 0.5]], patches=torch.zeros(1, 2, PATCHES, CFG.dino_dim))
    with pytest.raises(ValueError, match=r"box_patch_rank=-2 must be an integer in \[0, 65536\]"):
        ConditioningConfig(box_patch_rank=-2)
    assert not CompositionAdapter(PRESETS["tiny"]).uses_box_patches  # off by default
    assert isinstance(adapter.assemble["1"].patches, BoxPatchEncoding)
