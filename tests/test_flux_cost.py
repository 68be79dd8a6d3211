"""What keeps conditioning cheap (docs/benchmarks.md), pinned structurally by counting work, not by timing.

- the AdaLN linears run on one row per modulation region, never one per token;
- Assemble-Attn is at most MAX_BUCKETS attention calls per layout block whatever the number of refs, reuses the
  q/k/v the block's joint attention computed, and runs its output projections once per covered token;
- the forward only reads the per-scene cache: prepare's modules never run inside it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moviepostproduction.bench.setup import bench_refs, token_grid
from moviepostproduction.compose.assemble import (
    add_on_covered,
    assemble_residual,
    capture_image_qkv,
    image_qkv,
    project_out,
)
from moviepostproduction.compose.assemble_rows import MAX_BUCKETS, pack_rows, size_buckets
from moviepostproduction.compose.conditioning import RefBatch, build_regions
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.layout import bbox_token_mask

from helpers import assemble_attention, flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits, scatter_mean

GRID = (8, 8)
TEXT = 6


@pytest.fixture
def cfg3(tiny_cfg):
    """Three double blocks, Assemble-Attn in blocks 0 and 2 only."""
    return tiny_cfg.with_(num_double_blocks=3, layout_blocks=(0, 2))


def build(cfg, randomize: bool = True) -> ConditionedFlux:
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(num_layers=cfg.num_double_blocks), CompositionAdapter(cfg))
    if randomize:
        randomize_zero_inits(model.adapter, std=0.1)
    return model


class CountAttention(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func is F.scaled_dot_product_attention
        return func(*args, **(kwargs or {}))


def count_rows(modules: dict[str, torch.nn.Module]):
    """Forward hooks recording the number of rows (all leading dims) each module's input has, per call."""
    rows: dict[str, list[int]] = {name: [] for name in modules}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: rows[name].append(args[0][..., 0].numel()))
        for name, m in modules.items()
    ]
    return rows, handles


def test_adaln_linear_runs_once_per_region_in_the_full_forward(cfg3):
    model = build(cfg3)
    tr = model.transformer
    inputs = flux_inputs(1, GRID, TEXT)
    refs = random_refs(1, 4, cfg3, seed=2, text_len=TEXT)
    linears = {f"double{b}.image": blk.norm1.linear for b, blk in enumerate(tr.transformer_blocks)}
    linears |= {f"double{b}.text": blk.norm1_context.linear for b, blk in enumerate(tr.transformer_blocks)}
    linears |= {"single0": tr.single_transformer_blocks[0].norm.linear}
    rows, handles = count_rows(linears)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        model(**inputs, conditioning=cond)
        regions = {name: calls.copy() for name, calls in rows.items()}
        for calls in rows.values():
            calls.clear()
        model(**inputs, conditioning=None)
    for h in handles:
        h.remove()
    u_img, u_txt, u_joint = (
        cond.image_regions.num_regions,
        cond.text_regions.num_regions,
        cond.joint_regions.num_regions,
    )
    assert 1 < u_img < GRID[0] * GRID[1] and 1 < u_joint < GRID[0] * GRID[1] + TEXT
    for b in range(3):
        assert regions[f"double{b}.image"] == [u_img]
        assert regions[f"double{b}.text"] == [u_txt]
    assert regions["single0"] == [u_joint]
    assert all(r == [1] for r in rows.values())  # without refs: one temb row, broadcast, as stock FLUX


def test_single_block_regions_group_foreground_boxes_only_with_the_same_velocity(cfg3):
    """Background refs carry no weight in single blocks; their boxes must not split the joint regions."""
    model = build(cfg3)
    inputs = flux_inputs(1, GRID, TEXT)
    refs = random_refs(1, 5, cfg3, seed=5, text_len=TEXT)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        fg = cond.foreground
        assert 0 < int(fg.sum()) < 5  # a mixed scene
        masks = torch.cat([refs.text_spans.float(), model.adapter.modulation_masks(refs, GRID)], dim=-1)  # (1, R, T+N)
        every_box = build_regions(masks, cond.alpha * fg)  # grouped on every ref's box
        fg_patterns = torch.unique((masks * fg[..., None])[0].T, dim=0).shape[0]
        assert cond.joint_regions.num_regions == fg_patterns < every_box.num_regions
        fast = model(**inputs, conditioning=cond)
        slow = model(**inputs, conditioning=dataclasses.replace(cond, joint_regions=every_box))
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-5)


@pytest.mark.parametrize("refs", [1, 3, 7])
def test_assemble_attn_is_one_attention_call_per_size_bucket_in_each_layout_block(cfg3, refs):
    model = build(cfg3)
    inputs = flux_inputs(2, GRID, TEXT)
    scene = random_refs(2, refs, cfg3, seed=refs, counts=[refs, max(refs - 1, 1)])
    with torch.no_grad():
        cond = model.prepare(scene, GRID, TEXT)
        counts = {}
        for name, kwargs in {
            "plain": {},
            "layout": dict(conditioning=cond),
            "no_layout": dict(conditioning=cond, layout_active=False),
        }.items():
            with CountAttention() as counter:
                model(**inputs, **kwargs)
            counts[name] = counter.calls
    buckets = len(pack_rows(cond.packing, 2 * 64).buckets)
    assert counts["plain"] == 3 + 1  # the stock joint attention of 3 double + 1 single block
    assert 1 <= buckets <= MAX_BUCKETS
    assert counts["layout"] == counts["plain"] + 2 * buckets  # blocks 0 and 2, all (sample, ref) groups batched
    assert counts["no_layout"] == counts["plain"]


def test_one_padded_assemble_call_on_request_gives_the_same_velocity(cfg3):
    """`assemble_calls=1`: Assemble-Attn is literally one SDPA call per layout block, with the same output."""
    model = build(cfg3)
    inputs = flux_inputs(2, GRID, TEXT)
    scene = random_refs(2, 7, cfg3, seed=7, counts=[7, 6])
    with torch.no_grad():
        cond = model.prepare(scene, GRID, TEXT)
        assert len(pack_rows(cond.packing, 2 * 64).buckets) >= 2  # the default really splits this scene
        bucketed = model(**inputs, conditioning=cond)
        model.assemble_calls = 1
        with CountAttention() as counter:
            single = model(**inputs, conditioning=cond)
    assert counter.calls == 3 + 1 + 2  # stock attention of 3 double + 1 single block, one call per layout block
    torch.testing.assert_close(single, bucketed, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"assemble_calls=0: need at least 1"):
        ConditionedFlux(model.transformer, model.adapter, assemble_calls=0)


def test_image_projections_run_once_per_token_and_output_projections_once_per_covered_token(cfg3):
    """The layout blocks' q/k/v see the N image tokens once (the joint attention's own call); `to_out` sees the
    N tokens plus each covered token once, however many boxes cover it."""
    model = build(cfg3)
    attn = model.transformer.transformer_blocks[0].attn
    inputs = flux_inputs(1, GRID, TEXT)
    # Same union of boxes (the left half), 2 tiles vs 2 tiles + 5 overlapping boxes inside them.
    few, many = (bench_refs(r, cfg3, 0.5, TEXT, seed=r) for r in (2, 7))
    seen = {}
    for name, refs in {"few": few, "many": many}.items():
        for grad in (True, False):  # training; sampling, where to_out and out_proj run fused (F.linear, no hook)
            rows, handles = count_rows({"q": attn.to_q, "k": attn.to_k, "v": attn.to_v, "out": attn.to_out[0]})
            with torch.set_grad_enabled(grad):
                model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
            for h in handles:
                h.remove()
            seen[name, grad] = rows
    n, covered = 64, 32
    for (_, grad), rows in seen.items():
        assert rows["q"] == rows["k"] == rows["v"] == [n]
        assert rows["out"] == ([n, covered] if grad else [n])


def test_captured_qkv_equal_a_fresh_projection_and_fused_projections_are_served(tiny_cfg):
    model = build(tiny_cfg)
    attn = model.transformer.transformer_blocks[0].attn
    image, context = torch.randn(2, 64, tiny_cfg.hidden_dim), torch.randn(2, TEXT, tiny_cfg.hidden_dim)
    with torch.no_grad():
        expected = image_qkv(attn, image)
        for fuse in (False, True):
            if fuse:
                attn.fuse_projections()
            with capture_image_qkv(attn) as found:
                attn(hidden_states=image, encoder_hidden_states=context)
            assert found.keys() == {"q", "k", "v"}
            for got, want in zip(image_qkv(attn, image, found), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert image_qkv(attn, image[:, :10], found)[0].shape == (2, 10, 2, 16)  # shape mismatch: projected again
    assert not attn.norm_q._forward_hooks and not attn.to_qkv._forward_hooks  # hooks removed on exit


def test_assemble_residual_equals_the_per_group_reference(tiny_cfg):
    """Row packing, covered-token RoPE and output projections after the box average change nothing."""
    model = build(tiny_cfg)
    attn = model.transformer.transformer_blocks[0].attn
    out_proj = model.adapter.assemble["0"]
    refs = random_refs(2, 5, tiny_cfg, seed=11, counts=[5, 2])
    image = torch.randn(2, 64, tiny_cfg.hidden_dim)
    ids = torch.cat([flux_inputs(1, GRID, TEXT)["txt_ids"], flux_inputs(1, GRID, TEXT)["img_ids"]])
    cos, sin = model.transformer.pos_embed(ids)
    rope = (cos[TEXT:], sin[TEXT:])
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        reference = scatter_mean(
            out_proj(assemble_attention(attn, image, cond.layout_tokens, cond.packing, rope)), cond.packing, image.shape
        )
        rows = pack_rows(cond.packing, 2 * 64)
        fast = assemble_residual(attn, out_proj, image_qkv(attn, image), cond.layout_tokens, cond.packing, rows, rope)
        x, gate = torch.randn(2, 64, tiny_cfg.hidden_dim), torch.randn(2, 64, tiny_cfg.hidden_dim)
        added = add_on_covered(x, gate, fast, rows.covered)
        shared = add_on_covered(x, gate[:, :1], fast, rows.covered)  # one gate per sample (no modulation)
    inside = cond.packing.cover > 0
    assert torch.equal(rows.covered, inside.flatten().nonzero().squeeze(1)) and (fast.abs().amax(-1) > 0).all()
    torch.testing.assert_close(fast, reference.flatten(0, 1)[rows.covered], rtol=0, atol=1e-5)
    assert (reference[~inside] == 0).all()  # so the branch is zero off the covered tokens
    torch.testing.assert_close(added, x + gate * reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared, x + gate[:, :1] * reference, rtol=0, atol=1e-5)


def test_sampling_fuses_the_output_projections_once_per_weights(tiny_cfg):
    model = build(tiny_cfg).eval()
    attn, out_proj = model.transformer.transformer_blocks[0].attn, model.adapter.assemble["0"]
    attended = torch.randn(10, tiny_cfg.hidden_dim)

    def two_step():
        return out_proj(attn.to_out[0](attended))

    with torch.enable_grad():
        assert project_out(attn, out_proj, attended).grad_fn is not None  # training: the two maps, autograd intact
    with torch.no_grad():
        torch.testing.assert_close(project_out(attn, out_proj, attended), two_step(), rtol=0, atol=1e-5)
        fused = out_proj._fused_out[1]
        project_out(attn, out_proj, attended)
        assert out_proj._fused_out[1] is fused  # reused by the next denoising step
        out_proj.out.weight.add_(0.5)  # an optimiser step / a reload: in place, so the version counter moves
        torch.testing.assert_close(project_out(attn, out_proj, attended), two_step(), rtol=0, atol=1e-5)
        assert out_proj._fused_out[1] is not fused
    assert "_fused_out" not in str(list(out_proj.state_dict()))  # never saved


def test_rows_hold_each_group_exactly_once_with_less_padding(tiny_cfg):
    grid = token_grid(4096)
    refs = bench_refs(50, tiny_cfg.with_(max_refs=50), 0.5, 8, seed=50)
    cond = CompositionAdapter(tiny_cfg.with_(max_refs=50)).prepare(refs, grid, 8)
    packing, n = cond.packing, 4096
    rows, single = pack_rows(packing, n), pack_rows(packing, n, max_buckets=1)
    (one,) = single.buckets
    p, s = one.source.shape
    assert s == packing.key_mask.shape[1] and p == packing.num_groups  # one group per row
    lengths = packing.key_mask.sum(1)
    # Size buckets: <= 4 calls doing less than half of one padded call's work (and >= the unpadded sum of l^2).
    work = sum(b.source.shape[0] * b.source.shape[1] ** 2 for b in rows.buckets)  # P * S^2 query-key pairs per call
    assert 2 <= len(rows.buckets) <= MAX_BUCKETS and int((lengths**2).sum()) <= work < 0.5 * p * s * s
    assert torch.equal(rows.covered, (packing.cover[0] > 0).nonzero().squeeze(1))
    source = torch.cat([b.source.flatten() for b in rows.buckets])
    segment = torch.cat([b.segment.flatten() for b in rows.buckets])
    target = torch.cat([b.target for b in rows.buckets])
    assert source.numel() == rows.num_slots == segment.numel() == target.numel()
    for g in range(packing.num_groups):
        slots = (segment == g).nonzero().squeeze(1)
        box = bbox_token_mask(refs.bboxes[0, packing.group_ref[g]], grid).nonzero().squeeze(1)
        assert slots.numel() == 1 + box.numel() and slots.max() - slots.min() == box.numel()  # contiguous
        assert source[slots[0]] == rows.covered.numel() + g  # the group's layout token first
        assert torch.equal(rows.covered[source[slots[1:]]], box)
        assert torch.equal(rows.covered[target[slots[1:]]], box)  # slots add into their token's covered row
        assert target[slots[0]] == rows.covered.numel()  # the layout token's output is dropped
        assert torch.equal(rows.group_slots[g, : box.numel()], slots[1:])
    for bucket in rows.buckets:  # a key prefix per row, P x S bools (None: no padding), never (P, S, S)
        assert bucket.key_mask is None or bucket.key_mask.shape == (
            *bucket.source.shape[:1],
            1,
            1,
            bucket.source.shape[1],
        )


@pytest.mark.parametrize("seed", range(6))
def test_size_buckets_split_the_sorted_lengths_with_the_least_work(seed):
    """Against brute force over every split of the sorted lengths into <= 3 runs."""
    import itertools

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 60, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
    runs = size_buckets(lengths, max_buckets=3)
    assert sorted(i for run in runs for i in run) == list(range(len(lengths))) and len(runs) <= 3
    assert all(max(lengths[i] for i in a) <= min(lengths[i] for i in b) for a, b in itertools.pairwise(runs))

    def work(parts):
        return sum(len(part) * max(part) ** 2 for part in parts)

    ordered = sorted(lengths)
    best = min(
        work([ordered[a:b] for a, b in itertools.pairwise((0, *cuts, len(ordered))) if b > a])
        for k in range(3)
        for cuts in itertools.combinations(range(1, len(ordered)), k)
    )
    assert best <= work([[lengths[i] for i in run] for run in runs]) <= best * 1.05
    assert size_buckets([7] * 5) == [[0, 1, 2, 3, 4]] and size_buckets([]) == []  # equal lengths: one call


def test_forward_only_reads_the_per_scene_cache(tiny_cfg):
    """Encoders and heads are paid once per scene: none of prepare's modules runs inside a denoising step."""
    model = build(tiny_cfg)
    adapter = model.adapter
    once = {
        "alpha": adapter.alpha_predictor,
        "instance": adapter.instance_encoder,
        "layout": adapter.layout_head,
        "shared": adapter.modulation_head.shared,
    }
    refs = random_refs(1, 3, tiny_cfg, seed=4, text_len=TEXT)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        rows, handles = count_rows(once)
        for _ in range(3):
            model(**flux_inputs(1, GRID, TEXT), conditioning=cond)
    for h in handles:
        h.remove()
    assert all(calls == [] for calls in rows.values())


def test_stacked_boxes_cost_what_one_box_costs(tiny_cfg):
    """Four refs on the same box: one modulation region more than none, one output projection per covered token."""
    model = build(tiny_cfg)
    attn = model.transformer.transformer_blocks[0].attn
    box = torch.tensor([0.0, 0.0, 0.5, 0.5])
    stacked = RefBatch(
        bboxes=box.expand(1, 4, 4).clone(),
        depth=torch.zeros(1, 4, dtype=torch.long),
        valid=torch.ones(1, 4, dtype=torch.bool),
        clip=torch.randn(1, 4, tiny_cfg.clip_dim),
        dino=torch.randn(1, 4, tiny_cfg.dino_dim),
    )
    rows, handles = count_rows({"out": attn.to_out[0]})
    cond = model.prepare(stacked, GRID, TEXT)
    model(**flux_inputs(1, GRID, TEXT), conditioning=cond)  # with autograd: to_out runs unfused, hooks see it
    for h in handles:
        h.remove()
    assert rows["out"] == [64, 16] and cond.image_regions.num_regions == 2
