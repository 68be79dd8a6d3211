"""Occlusion priority: fixed per-depth (and per-order) weights where boxes overlap, in Assemble-Attn's average and the
modulation regions (compose/modules/occlusion.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moviepostproduction.compose.assemble import assemble_residual, image_qkv
from moviepostproduction.compose.assemble_rows import pack_rows
from moviepostproduction.compose.conditioning import RefBatch, build_packing, build_regions
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import PRESETS, CompositionAdapter, ConditioningConfig
from moviepostproduction.compose.modules.occlusion import MIN_WEIGHT, occlusion_priority
from moviepostproduction.errors import WeightsError
from moviepostproduction.layout import bbox_token_mask
from moviepostproduction.panorama.wrap import remap_conditioning

from helpers import assemble_attention, flux_inputs, make_tiny_flux, randomize_zero_inits, scatter_mean

GRID = (8, 8)
TEXT = 6
FRONT, BACK = [0.0, 0.0, 0.625, 0.625], [0.375, 0.375, 1.0, 1.0]  # overlap: tokens (3..4, 3..4)


def layered_refs(depths=("fg", "bg"), boxes=(FRONT, BACK), seed: int = 0) -> RefBatch:
    gen = torch.Generator().manual_seed(seed)
    r, cfg = len(boxes), PRESETS["tiny"]
    return RefBatch(
        bboxes=torch.tensor([list(boxes)]),
        depth=torch.tensor([[("fg", "mg", "bg").index(d) for d in depths]]),
        valid=torch.ones(1, r, dtype=torch.bool),
        clip=torch.randn(1, r, cfg.clip_dim, generator=gen),
        dino=torch.randn(1, r, cfg.dino_dim, generator=gen),
    )


def model_with(std: float = 0.1, **priority) -> ConditionedFlux:
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(PRESETS["tiny"].with_(**priority)))
    randomize_zero_inits(model.adapter, std=std)
    return model


def test_priority_indexes_depths_relative_to_the_top_label():
    depth, valid = torch.tensor([[0, 2, 1]]), torch.tensor([[True, True, False]])
    assert torch.equal(occlusion_priority(depth, valid, (0.0, 0.0, 0.0)), torch.ones(1, 3))
    weights = occlusion_priority(depth, valid, (2.0, 1.0, 0.0))
    torch.testing.assert_close(weights, torch.tensor([[1.0, math.exp(-2.0), 1.0]]))  # relative to fg's; padding: 1
    strong = occlusion_priority(depth, valid, (30.0, 0.0, 0.0))
    assert strong.dtype == torch.float32 and torch.equal(strong, torch.tensor([[1.0, MIN_WEIGHT, 1.0]]))


def test_regions_share_an_overlap_by_priority_and_keep_single_boxes():
    hard = bbox_token_mask(torch.tensor([[FRONT, BACK]]), GRID).float()  # (1, 2, 64)
    soft = torch.rand(1, 2, 64, generator=torch.Generator().manual_seed(0)) * hard
    alpha = torch.tensor([[0.7, 0.4]])
    for masks in (hard, soft):
        plain = build_regions(masks, alpha)
        ones = build_regions(masks, alpha, torch.ones(1, 2))
        assert torch.equal(ones.index, plain.index) and torch.equal(ones.coef, plain.coef)  # weights 1: exactly
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
    model = model_with(depth_priority=(1.5, 0.0, -0.5))
    attn, out_proj = model.transformer.transformer_blocks[0].attn, model.adapter.assemble["0"]
    image = torch.randn(1, 64, model.adapter.cfg.hidden_dim)
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
    w_front, w_back = math.exp(0.0), math.exp(-2.0)  # relative to the top label's (fg 1.5)
    slot = lambda g, token: (cond.packing.token_index[g] == token).nonzero().item()  # noqa: E731
    overlap = 3 * 8 + 3
    want = (w_front * packed[0, slot(0, overlap)] + w_back * packed[1, slot(1, overlap)]) / (w_front + w_back)
    torch.testing.assert_close(reference[0, overlap], want, rtol=0, atol=1e-5)


def test_a_priority_of_equal_weights_is_exactly_design_3s_average():
    """Refs of different labels under an order priority all weigh 1: the same output, bit for bit, as no priority."""
    refs, inputs = layered_refs(("fg", "bg")), flux_inputs(1, GRID, TEXT)
    plain, ordered = model_with(), model_with(order_priority=3.0)
    with torch.no_grad():
        cond = ordered.prepare(refs, GRID, TEXT)
        assert torch.equal(cond.packing.group_weight, torch.ones(2))
        out = ordered(**inputs, conditioning=cond)
        assert torch.equal(out, plain(**inputs, conditioning=plain.prepare(refs, GRID, TEXT)))


def test_the_front_ref_owns_the_overlap_under_a_strong_priority():
    model = model_with(std=0.2, depth_priority=(30.0, 0.0, 0.0))
    inputs = flux_inputs(1, GRID, TEXT)
    with torch.no_grad():
        cond = model.prepare(layered_refs(("fg", "bg")), GRID, TEXT)
        front_only = model.prepare(layered_refs(("fg",), boxes=(FRONT,)), GRID, TEXT)
    overlap = 3 * 8 + 3
    image = cond.image_regions.coef[0, cond.image_regions.index[0, overlap]]  # (R,)
    share = 2 / (1 + MIN_WEIGHT)  # the two boxes' total, by weights 1 (fg) and MIN_WEIGHT (bg: 1000 times less)
    want = torch.stack([share * cond.alpha[0, 0], share * MIN_WEIGHT * cond.alpha[0, 1]])
    torch.testing.assert_close(image, want, rtol=1e-6, atol=1e-7)
    assert cond.packing.denominator()[0, overlap] == pytest.approx(1 + MIN_WEIGHT, rel=1e-6)
    half = model.prepare(layered_refs(("bg", "bg")), GRID, TEXT).to(dtype=torch.float16)  # both at MIN_WEIGHT
    assert half.packing.denominator()[0, overlap] > 0 and torch.isfinite(half.image_regions.coef).all()
    assert front_only.packing.group_weight.shape == (1,)
    remapped = remap_conditioning(cond, GRID, pad=1, shift=2)
    assert torch.equal(remapped.packing.group_weight, cond.packing.group_weight)
    assert torch.equal(remapped.packing.cover_weight.unique(), cond.packing.cover_weight.unique())
    assert cond.to(dtype=torch.float64).packing.cover_weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs, conditioning=cond)).all()


def test_order_priority_breaks_ties_within_a_label_by_the_scenes_order():
    """Refs listed front to back: within one label each earlier valid ref weighs e^K times the next; other labels,
    padding and K = 0 are untouched."""
    depth = torch.tensor([[0, 1, 0, 0, 1, 0]])  # fg mg fg fg mg fg(padding)
    valid = torch.tensor([[True, True, True, True, True, False]])
    base = occlusion_priority(depth, valid, (3.0, 0.0, 0.0))
    rank = torch.tensor([[0.0, 0.0, 1.0, 2.0, 1.0, 0.0]])  # earlier valid refs of the same label
    expect = torch.where(valid, (base.log() - 2.0 * rank).exp().clamp(min=MIN_WEIGHT), torch.ones_like(base))
    torch.testing.assert_close(occlusion_priority(depth, valid, (3.0, 0.0, 0.0), 2.0), expect)
    assert torch.equal(occlusion_priority(depth, valid, (3.0, 0.0, 0.0), 0.0), base)
    gap = torch.tensor([[True, True, False, True, True, True]])  # a ref not valid does not push the later ones back
    torch.testing.assert_close(occlusion_priority(depth, gap, (0.0, 0.0, 0.0), 2.0)[0, 3], torch.tensor(math.exp(-2)))


def test_the_priority_is_a_checked_setting_saved_in_the_config_and_holds_no_tensor(tmp_path):
    assert not PRESETS["tiny"].uses_occlusion_priority  # off by default: DESIGN 3's average
    cfg = PRESETS["tiny"].with_(depth_priority=[3, 0, 0], order_priority=3.0)  # a list, as JSON and YAML give it
    assert cfg.depth_priority == (3, 0, 0) and cfg.uses_occlusion_priority
    adapter = CompositionAdapter(cfg)
    assert not any("occlusion" in key for key in adapter.state_dict())
    adapter.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "config.json").read_text())
    assert (saved["depth_priority"], saved["order_priority"]) == ([3, 0, 0], 3.0)
    assert CompositionAdapter.from_pretrained(tmp_path / "adapter").cfg == cfg
    for bad in ((1.0, 2.0), "fg", (0.0, float("nan"), 0.0), (True, 0.0, 0.0)):
        with pytest.raises(ValueError, match=r"depth_priority=.* must be 3 finite numbers \(fg, mg, bg\)"):
            ConditioningConfig(depth_priority=bad)
    for bad in (-1.0, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="order_priority=.* must be a finite number >= 0"):
            ConditioningConfig(order_priority=bad)


def test_an_adapter_dir_with_the_removed_learned_priority_is_refused_in_one_line(tmp_path):
    folder = CompositionAdapter(PRESETS["tiny"]).save_pretrained(tmp_path / "adapter")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "occlusion_priority": True}))
    with pytest.raises(WeightsError, match=r"occlusion_priority \(a learned occlusion.logits tensor\) was removed; "
                       r"set depth_priority: \[fg, mg, bg\]") as err:  # fmt: skip
        CompositionAdapter.from_pretrained(folder)
    assert "\n" not in str(err.value)


def test_front_priority_script_sets_the_priority_and_copies_every_tensor(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from moviepostproduction.toyworld.tiny import write_tiny_model_dir

    source = write_tiny_model_dir(tmp_path / "model", seed=0)
    index = json.loads((source / "model_index.json").read_text())
    (source / "model_index.json").write_text(json.dumps({**index, "label": "tiny"}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "front_priority_model.py"
    command = [sys.executable, str(script), str(source), str(tmp_path / "front"), "--fg-priority", "2"]
    done = subprocess.run([*command, "--grounding-ratio", "0.6"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    before = CompositionAdapter.from_pretrained(source / "adapter")
    after = CompositionAdapter.from_pretrained(tmp_path / "front" / "adapter")
    assert after.cfg == before.cfg.with_(depth_priority=(2.0, 0.0, 0.0), grounding_ratio=0.6)
    assert (
        json.loads((tmp_path / "front" / "model_index.json").read_text())["label"] == "tiny; fg occlusion priority e^2"
    )
    weights = "adapter/model.safetensors"
    assert (tmp_path / "front" / weights).read_bytes() == (source / weights).read_bytes()
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "front exists; pick a new directory" in again.stderr
    bad_window = [*command[:-3], str(tmp_path / "f2"), "--grounding-ratio", "0"]
    bad = subprocess.run(bad_window, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and "--grounding-ratio: must be in (0, 1] (got 0)" in bad.stderr
    assert not (tmp_path / "f2").exists()
    ordered = [*command[:-3], str(tmp_path / "f3"), "--fg-priority", "2", "--order-priority", "3"]
    assert subprocess.run(ordered, capture_output=True, text=True, check=False).returncode == 0
    assert CompositionAdapter.from_pretrained(tmp_path / "f3" / "adapter").cfg == before.cfg.with_(
        depth_priority=(2.0, 0.0, 0.0), order_priority=3.0
    )
    label = json.loads((tmp_path / "f3" / "model_index.json").read_text())["label"]
    assert label == "tiny; fg occlusion priority e^2, order within a label e^3"
    bad_order = subprocess.run([*ordered[:-5], str(tmp_path / "f4"), "--order-priority", "-1"], capture_output=True,
                               text=True, check=False)  # fmt: skip
    assert bad_order.returncode == 2 and "order_priority=-1.0 must be a finite number >= 0" in bad_order.stderr
    assert not (tmp_path / "f4").exists()
