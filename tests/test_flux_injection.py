"""Invariants of the FLUX injection (DESIGN 3 (a)-(e)) on a tiny random-config FluxTransformer2DModel."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from moviepostproduction.compose.conditioning import RefBatch
from moviepostproduction.compose.flux import BlockInputs, ConditionedFlux, double_block_forward, region_modulation
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.layout import bbox_token_mask

from helpers import assemble_attention, flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits, scatter_mean

GRID = (8, 8)
TEXT = 6


def build(cfg, seed: int = 0) -> ConditionedFlux:
    torch.manual_seed(seed)
    return ConditionedFlux(make_tiny_flux(seed), CompositionAdapter(cfg))


def rope_parts(model: ConditionedFlux, inputs: dict):
    joint = model.transformer.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    return (None, joint, (joint[0][TEXT:], joint[1][TEXT:]))


@pytest.mark.parametrize("soft", [False, True])
def test_a_equals_plain_diffusers_forward_at_init(tiny_cfg, soft):
    model = build(tiny_cfg.with_(soft_masks=soft))
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 4, tiny_cfg, counts=[4, 2], text_len=TEXT)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        plain = model.plain_forward(**inputs)
        ours = model(**inputs, conditioning=cond)
    assert cond.image_regions.num_regions > 1  # the region path is exercised
    assert (ours - plain).abs().max() <= 1e-5


def test_zero_refs_is_exactly_plain_flux(tiny_cfg):
    model = build(tiny_cfg)
    randomize_zero_inits(model.adapter)
    inputs = flux_inputs(1, GRID, TEXT)
    empty = random_refs(1, 0, tiny_cfg)
    with torch.no_grad():
        cond = model.prepare(empty, GRID, TEXT)
        assert torch.equal(model(**inputs, conditioning=cond), model(**inputs, conditioning=None))
        assert (model(**inputs, conditioning=cond) - model.plain_forward(**inputs)).abs().max() <= 1e-5


def test_b_layout_residual_touches_only_tokens_inside_boxes(tiny_cfg):
    model = build(tiny_cfg)
    randomize_zero_inits(model.adapter, std=0.2)
    inputs = flux_inputs(1, GRID, TEXT)
    refs = random_refs(1, 2, tiny_cfg, seed=3)
    tr = model.transformer
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        x = tr.x_embedder(inputs["hidden_states"])
        ctx = tr.context_embedder(inputs["encoder_hidden_states"])
        temb = tr.time_text_embed(inputs["timestep"] * 1000, inputs["guidance"] * 1000, inputs["pooled_projections"])
        rope = rope_parts(model, inputs)
        block = tr.transformer_blocks[0]
        img_off, txt_off = model.adapter.modulation_head.double_offsets(0, cond.shared_offsets)
        without = BlockInputs(cond, img_off, txt_off)
        with_layout = BlockInputs(cond, img_off, txt_off, assemble=model.adapter.assemble["0"])
        ctx_a, x_a = double_block_forward(block, x, ctx, temb, rope, without)
        ctx_b, x_b = double_block_forward(block, x, ctx, temb, rope, with_layout)
    inside = bbox_token_mask(refs.bboxes[0], GRID).any(0)
    changed = (x_a - x_b).abs().amax(-1)[0] > 0
    assert changed.any()
    assert not changed[~inside].any()
    assert torch.equal(ctx_a, ctx_b)


def test_c_modulation_of_a_ref_changes_nothing_outside_its_mask(tiny_cfg):
    model = build(tiny_cfg)
    refs = random_refs(1, 1, tiny_cfg, seed=5)
    cond = model.prepare(refs, GRID, TEXT)
    norm = model.transformer.transformer_blocks[0].norm1
    temb = torch.randn(1, tiny_cfg.hidden_dim)
    offsets = torch.randn(1, 1, tiny_cfg.hidden_dim)
    with torch.no_grad():
        base = region_modulation(norm, temb, None, None, 6)
        modulated = region_modulation(norm, temb, offsets, cond.image_regions, 6)
    inside = bbox_token_mask(refs.bboxes[0, 0], GRID)
    for b, m in zip(base, modulated, strict=True):
        assert m.shape == (1, 64, tiny_cfg.hidden_dim)
        outside = (m[0, ~inside] - b[0, 0]).abs().max()
        assert outside <= 1e-6  # the same temb; only the GEMM shape differs
        assert ((m[0, inside] - b[0, 0]).abs().amax(-1) > 1e-3).all()


def test_region_modulation_returns_one_plus_scale_for_the_listed_chunks(tiny_cfg):
    """Same chunks as the stock AdaLayerNormZero's linear, with 1 added to the scale chunks in region space."""
    model = build(tiny_cfg)
    cond = model.prepare(random_refs(1, 3, tiny_cfg), GRID, TEXT)
    norm = model.transformer.transformer_blocks[0].norm1
    temb, offsets = torch.randn(1, tiny_cfg.hidden_dim), torch.randn(1, 3, 32)
    with torch.no_grad():
        stock = norm.linear(norm.silu(temb)).chunk(6, dim=-1)  # (1, D) each
        plain = region_modulation(norm, temb, None, None, 6, scales=(1, 4))
        both = (
            region_modulation(norm, temb, offsets, cond.image_regions, 6),
            region_modulation(norm, temb, offsets, cond.image_regions, 6, scales=(1, 4)),
        )
    for c in range(6):
        one = 1.0 if c in (1, 4) else 0.0
        assert torch.equal(plain[c][:, 0], stock[c] + one)
        assert torch.equal(both[1][c], both[0][c] + one)


def test_region_modulation_runs_adaln_once_per_region_not_per_token(tiny_cfg):
    model = build(tiny_cfg)
    cond = model.prepare(random_refs(1, 3, tiny_cfg), GRID, TEXT)
    norm = model.transformer.transformer_blocks[0].norm1
    rows = []
    handle = norm.linear.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[1]))
    with torch.no_grad():
        region_modulation(norm, torch.randn(1, tiny_cfg.hidden_dim), torch.randn(1, 3, 32), cond.image_regions, 6)
    handle.remove()
    assert rows == [cond.image_regions.num_regions]
    assert cond.image_regions.num_regions <= 2**3 < GRID[0] * GRID[1]


def test_assemble_attention_batched_equals_per_group_diffusers_attention(tiny_cfg):
    """The packed single call equals running the block's own attention module once per (sample, ref) group."""
    model = build(tiny_cfg)
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 3, tiny_cfg, counts=[3, 1], seed=7)
    attn = model.transformer.transformer_blocks[0].attn
    image = torch.randn(2, 64, tiny_cfg.hidden_dim)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        rope = rope_parts(model, inputs)
        packed = assemble_attention(attn, image, cond.layout_tokens, cond.packing, rope[2])
        pk = cond.packing
        assert pk.num_groups == 4
        for g in range(pk.num_groups):
            b, r = int(pk.group_batch[g]), int(pk.group_ref[g])
            idx = bbox_token_mask(refs.bboxes[b, r], GRID).nonzero().squeeze(-1)
            text_cos, text_sin = rope[1][0][:1], rope[1][1][:1]  # text position: identity rotation
            cos = torch.cat([text_cos, rope[2][0][idx]])
            sin = torch.cat([text_sin, rope[2][1][idx]])
            ref_img, _ = attn(
                hidden_states=image[b : b + 1, idx],
                encoder_hidden_states=cond.layout_tokens[b : b + 1, r : r + 1],
                image_rotary_emb=(cos, sin),
            )
            torch.testing.assert_close(packed[g, : idx.numel()], ref_img[0], rtol=0, atol=1e-5)


def test_overlapping_boxes_are_averaged(tiny_cfg):
    refs = RefBatch(
        bboxes=torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]]]),
        depth=torch.zeros(1, 2, dtype=torch.long),
        valid=torch.ones(1, 2, dtype=torch.bool),
        clip=torch.randn(1, 2, tiny_cfg.clip_dim),
        dino=torch.randn(1, 2, tiny_cfg.dino_dim),
    )
    cond = CompositionAdapter(tiny_cfg).prepare(refs, GRID, TEXT)
    values = torch.stack([torch.full((cond.packing.token_index.shape[1], 1), 2.0), torch.full((16, 1), 4.0)])
    out = scatter_mean(values, cond.packing, (1, 64, 1))[0, :, 0].view(8, 8)
    assert out[0, 0] == 2.0 and out[5, 5] == 4.0 and out[3, 3] == 3.0 and out[7, 7] == 0.0


def test_padded_batch_equals_each_sample_alone(tiny_cfg):
    """Batch size > 1 with different numbers of refs per sample: padding and masks change nothing."""
    model = build(tiny_cfg)
    randomize_zero_inits(model.adapter, std=0.1)
    inputs = flux_inputs(2, GRID, TEXT, seed=2)
    refs = random_refs(2, 3, tiny_cfg, counts=[3, 1], seed=9, text_len=TEXT)
    with torch.no_grad():
        batched = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
        for b, n in enumerate([3, 1]):
            single_refs = RefBatch(
                bboxes=refs.bboxes[b : b + 1, :n],
                depth=refs.depth[b : b + 1, :n],
                valid=refs.valid[b : b + 1, :n],
                clip=refs.clip[b : b + 1, :n],
                dino=refs.dino[b : b + 1, :n],
                text_spans=refs.text_spans[b : b + 1, :n],
            )
            one = {k: (v[b : b + 1] if k not in ("img_ids", "txt_ids") else v) for k, v in inputs.items()}
            alone = model(**one, conditioning=model.prepare(single_refs, GRID, TEXT))
            torch.testing.assert_close(batched[b : b + 1], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(batched, model.plain_forward(**inputs), atol=1e-3)  # conditioning acts


def train_step(model: ConditionedFlux, cfg, inputs: dict) -> torch.Tensor:
    refs = random_refs(2, 3, cfg, counts=[3, 2], seed=4, text_len=TEXT)
    cond = model.prepare(refs, GRID, TEXT)
    out = model(**inputs, conditioning=cond)
    loss = out.pow(2).mean()
    loss.backward()
    return loss


def test_d_only_trainable_modules_receive_gradients(tiny_cfg):
    model = build(tiny_cfg)
    model.transformer.requires_grad_(False)
    train_step(model, tiny_cfg, flux_inputs(2, GRID, TEXT))
    assert all(p.grad is None for p in model.transformer.parameters())
    grads = {n: p.grad for n, p in model.adapter.named_parameters()}
    assert grads["modulation_head.shared.2.weight"].abs().sum() > 0  # zero-init, yet learning
    assert grads["assemble.0.out.weight"].abs().sum() > 0
    assert grads["feedback_bridge.up.0.weight"].abs().sum() > 0
    # alpha only matters once offsets / layout outputs are non-zero; after that it learns too.
    randomize_zero_inits(model.adapter, std=0.1)
    model.adapter.zero_grad(set_to_none=True)
    train_step(model, tiny_cfg, flux_inputs(2, GRID, TEXT))
    assert all(p.grad is None for p in model.transformer.parameters())
    assert model.adapter.alpha_predictor.fc2.weight.grad.abs().sum() > 0
    assert model.adapter.instance_encoder.fuse[0].weight.grad.abs().sum() > 0


def test_e_gradient_checkpointing_gives_identical_outputs_and_gradients(tiny_cfg):
    inputs = flux_inputs(2, GRID, TEXT)
    results = []
    for checkpointing in (False, True):
        model = build(tiny_cfg)
        randomize_zero_inits(model.adapter, std=0.1)
        model.transformer.requires_grad_(False)
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        model.train()
        loss = train_step(model, tiny_cfg, inputs)
        results.append((loss.detach(), [p.grad.clone() for p in model.adapter.parameters() if p.grad is not None]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=1e-6)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_e_peft_lora_adapter_works_and_trains_alone(tiny_cfg):
    model = build(tiny_cfg)
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 3, tiny_cfg, text_len=TEXT)
    with torch.no_grad():
        before = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
    model.transformer.requires_grad_(False)
    model.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        after = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
    torch.testing.assert_close(before, after, rtol=0, atol=1e-6)  # LoRA B is zero at init
    model.adapter.requires_grad_(False)
    train_step(model, tiny_cfg, inputs)
    lora = {n: p for n, p in model.transformer.named_parameters() if "lora" in n}
    assert lora and all(p.requires_grad for p in lora.values())
    assert any(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    base = [p for n, p in model.transformer.named_parameters() if "lora" not in n]
    assert all(p.grad is None for p in base)


def test_prepare_runs_encoders_and_heads_once_for_many_steps(tiny_cfg):
    model = build(tiny_cfg)
    calls = {"instance": 0, "alpha": 0, "shared": 0}
    model.adapter.instance_encoder.register_forward_hook(
        lambda *a: calls.__setitem__("instance", calls["instance"] + 1)
    )
    model.adapter.alpha_predictor.register_forward_hook(lambda *a: calls.__setitem__("alpha", calls["alpha"] + 1))
    model.adapter.modulation_head.shared.register_forward_hook(
        lambda *a: calls.__setitem__("shared", calls["shared"] + 1)
    )
    inputs = flux_inputs(1, GRID, TEXT)
    with torch.no_grad():
        cond = model.prepare(random_refs(1, 2, tiny_cfg), GRID, TEXT)
        for step in range(5):
            model(**{**inputs, "timestep": torch.tensor([1.0 - step / 5])}, conditioning=cond)
    assert calls == {"instance": 1, "alpha": 1, "shared": 1}


def test_layout_can_be_switched_off_for_late_steps(tiny_cfg):
    model = build(tiny_cfg)
    randomize_zero_inits(model.adapter, std=0.2)
    inputs = flux_inputs(1, GRID, TEXT)
    with torch.no_grad():
        cond = model.prepare(random_refs(1, 2, tiny_cfg), GRID, TEXT)
        on = model(**inputs, conditioning=cond, layout_active=True)
        off = model(**inputs, conditioning=cond, layout_active=False)
        with torch.no_grad():
            for m in model.adapter.assemble.values():
                m.reset_parameters()
        silent = model(**inputs, conditioning=cond, layout_active=True)
    assert not torch.allclose(on, off)
    torch.testing.assert_close(off, silent, rtol=0, atol=1e-6)


def test_mismatched_adapter_is_rejected(tiny_cfg):
    with pytest.raises(ValueError, match="hidden_dim=64"):
        ConditionedFlux(make_tiny_flux(), CompositionAdapter(tiny_cfg.with_(hidden_dim=64)))
    with pytest.raises(ValueError, match="blocks"):
        ConditionedFlux(make_tiny_flux(), CompositionAdapter(tiny_cfg.with_(num_double_blocks=3)))


@pytest.mark.slow
def test_real_size_smoke_flux_dev_shapes_50_refs():
    """FLUX.1-dev width (24 x 128) with 1 double + 1 single block, 1024 image tokens, 50 refs, on CPU."""
    from moviepostproduction.compose.modules import ConditioningConfig

    tr = make_tiny_flux(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
    )
    cfg = ConditioningConfig.for_transformer(tr)
    model = ConditionedFlux(tr, CompositionAdapter(cfg))
    grid, text = (32, 32), 64
    gen = torch.Generator().manual_seed(0)
    from moviepostproduction.sampling import latent_image_ids, text_ids

    inputs = dict(
        hidden_states=torch.randn(1, 1024, 64, generator=gen),
        encoder_hidden_states=torch.randn(1, text, 4096, generator=gen),
        pooled_projections=torch.randn(1, 768, generator=gen),
        timestep=torch.tensor([0.7]),
        img_ids=latent_image_ids(*grid),
        txt_ids=text_ids(text),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        cond = model.prepare(random_refs(1, 50, cfg), grid, text)
        out = model(**inputs, conditioning=cond)
        plain = model.plain_forward(**inputs)
    assert out.shape == (1, 1024, 64)
    assert (out - plain).abs().max() <= 1e-4
