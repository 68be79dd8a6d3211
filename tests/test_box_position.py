"""BoxPositionEncoding: box-frame token coordinates, its Assemble-Attn residual, config and recipe plumbing."""

from __future__ import annotations

import pytest
import torch

from moviepostproduction.compose.assemble import average_on_covered, box_position_values
from moviepostproduction.compose.conditioning import RefBatch
from moviepostproduction.compose.flux import BlockInputs, ConditionedFlux, double_block_forward
from moviepostproduction.compose.modules import PRESETS, CompositionAdapter, ConditioningConfig
from moviepostproduction.layout import bbox_token_mask, box_token_coords
from moviepostproduction.panorama.wrap import remap_conditioning, token_sources

from helpers import flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits, trained_assemble_part
from helpers import refs_at as boxed_refs

GRID = (8, 8)
TEXT = 6
CFG = PRESETS["tiny"].with_(box_position_freqs=3, box_position_rank=8)


def refs_at(bboxes: list[list[float]], cfg: ConditioningConfig = CFG, seed: int = 0) -> RefBatch:
    return boxed_refs(bboxes, cfg, seed)


def test_box_token_coords_put_covered_centres_in_the_unit_square():
    coords = box_token_coords(torch.tensor([0.25, 0.0, 0.75, 0.5]), (2, 4))  # 4 columns, 2 rows
    assert torch.equal(coords[:4, 0], torch.tensor([-0.25, 0.25, 0.75, 1.25]))  # centres 1/8, 3/8, 5/8, 7/8
    assert torch.equal(coords[::4, 1], torch.tensor([0.5, 1.5]))
    wrapped = box_token_coords(torch.tensor([0.75, 0.0, 0.25, 1.0]), (1, 4))[:, 0]  # width 0.5 across the seam
    assert wrapped[3] == 0.25 and wrapped[0] == 0.75  # column 7/8 first, then column 1/8 past the seam
    gen = torch.Generator().manual_seed(0)
    lo = torch.rand(64, 2, generator=gen) * 0.7
    boxes = torch.cat([lo, lo + 0.05 + torch.rand(64, 2, generator=gen) * 0.25], -1)
    coords, inside = box_token_coords(boxes, GRID), bbox_token_mask(boxes, GRID)  # (64, N, 2), (64, N)
    thin = ((boxes[:, 2:] - boxes[:, :2]) * 8 < 1).any(-1)  # a thin box keeps its midpoint token, centre outside
    covered = coords[~thin][inside[~thin]]
    assert covered.min() >= 0 and covered.max() < 1


def test_box_positions_keep_plain_flux_at_init_and_touch_only_boxes():
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(CFG))
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 4, CFG, counts=[4, 2], text_len=TEXT)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        assert (model(**inputs, conditioning=cond) - model.plain_forward(**inputs)).abs().max() <= 1e-5
        position = model.adapter.assemble["0"].position
        randomize_zero_inits(position, std=0.2)
        b = model.transformer.transformer_blocks[0]
        x = model.transformer.x_embedder(inputs["hidden_states"])
        ctx = model.transformer.context_embedder(inputs["encoder_hidden_states"])
        temb = model.transformer.time_text_embed(
            inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"]
        )
        joint = model.transformer.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
        rope = (None, joint, (joint[0][TEXT:], joint[1][TEXT:]))
        on = BlockInputs(cond, assemble=model.adapter.assemble["0"])
        x_on = double_block_forward(b, x, ctx, temb, rope, on)[1]
        model.adapter.assemble["0"].position = None  # the same block without the position residual
        x_off = double_block_forward(b, x, ctx, temb, rope, on)[1]
    inside = (bbox_token_mask(refs.bboxes, GRID) & refs.valid[..., None]).any(1)  # (B, N)
    changed = (x_on - x_off).abs().amax(-1) > 0
    assert changed[inside].all() and not changed[~inside].any()


def test_box_position_residual_moves_with_its_box_and_averages_overlaps():
    adapter = CompositionAdapter(CFG)
    randomize_zero_inits(adapter, std=0.2)
    position = adapter.assemble["0"].position

    tokens = torch.randn(1, 2, CFG.hidden_dim, generator=torch.Generator().manual_seed(1))

    def residual(bboxes, layout_tokens):
        packing = adapter.prepare(refs_at(bboxes), GRID, TEXT).packing
        covered = packing.cover.reshape(-1).nonzero().squeeze(1)
        cover = packing.cover.reshape(-1)[covered]
        dense = torch.zeros(64, CFG.hidden_dim)
        frame = packing.coords[packing.key_mask[:, 1:]], packing.slot_groups()
        slots = box_position_values(position, layout_tokens, packing, *frame)
        dense[covered] = average_on_covered(slots, packing, covered, cover)
        return dense.view(8, 8, -1)

    with torch.no_grad():
        a = residual([[0.0, 0.0, 0.375, 0.5]], tokens[:, :1])  # 3 x 4 tokens at the top-left
        b = residual([[0.25, 0.25, 0.625, 0.75]], tokens[:, :1])  # the same box two tokens right and down
        other = residual([[0.25, 0.25, 0.625, 0.75]], tokens[:, 1:])
        both = residual([[0.0, 0.0, 0.375, 0.5], [0.25, 0.25, 0.625, 0.75]], tokens)
    assert torch.allclose(a[:4, :3], b[2:6, 2:5], atol=1e-6)  # box-relative: the pattern moves with the box
    assert not torch.allclose(a[0, 0], a[3, 2], atol=1e-3)  # and differs across the box
    assert not torch.allclose(b[3, 3], other[3, 3], atol=1e-3)  # and depends on the reference's layout token
    assert torch.allclose(both[3, 2], (a[3, 2] + other[3, 2]) / 2, atol=1e-6)  # overlaps are averaged
    assert torch.allclose(both[0, 0], a[0, 0], atol=1e-6) and torch.equal(both[7, 7], torch.zeros(CFG.hidden_dim))


def test_box_positions_learn_from_zero_init_and_survive_a_panorama_remap():
    _, grad = trained_assemble_part(CFG, refs_at([[0.1, 0.1, 0.6, 0.5]]), "position", GRID, TEXT)
    assert grad is not None and grad.abs().sum() > 0  # zero-init, yet it trains

    wide = CompositionAdapter(CFG).prepare(refs_at([[0.75, 0.0, 0.25, 1.0]]), GRID, TEXT)  # wraps the seam
    remapped = remap_conditioning(wide, GRID, pad=1, shift=3)
    src = token_sources(GRID, 1, 3)
    for packing, tokens in ((wide.packing, torch.arange(64)), (remapped.packing, src)):
        real = packing.key_mask[0, 1:]
        where = tokens[packing.token_index[0][real]]  # source token of each slot
        want = box_token_coords(wide_box := torch.tensor([0.75, 0.0, 0.25, 1.0]), GRID)[where]
        assert torch.equal(packing.coords[0][real], want), wide_box


def test_adapter_config_round_trips_and_reconfigures(tmp_path):
    old = CompositionAdapter(PRESETS["tiny"])
    new, fresh = old.reconfigured(box_position_freqs=2, box_position_rank=4)
    assert fresh == sorted(k for k in new.state_dict() if ".position." in k) and len(fresh) == 2 * 5  # 2 layout blocks
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())
    loaded = CompositionAdapter.from_pretrained(new.save_pretrained(tmp_path / "a"))
    assert loaded.cfg.box_position_freqs == 2 and loaded.assemble["0"].position is not None
    with pytest.raises(ValueError, match=r"box_position_freqs=-1 must be an integer in \[0, 1024\]"):
        ConditioningConfig(box_position_freqs=-1)
