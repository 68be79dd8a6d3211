"""The five conditioning modules: initialisations, routing, gradients and parameter budgets (DESIGN 2)."""

from __future__ import annotations

import torch

from moviepostproduction.compose.modules import (
    AlphaPredictor,
    CompositionAdapter,
    ConditioningConfig,
    FeedbackBridge,
    InstanceEncoder,
    LayoutHead,
    ModulationHead,
)

from helpers import random_refs


def test_alpha_is_exactly_one_half_at_init_for_random_inputs(tiny_cfg):
    pred = AlphaPredictor(tiny_cfg)
    gen = torch.Generator().manual_seed(0)
    alpha = pred(
        torch.randn(4, 7, tiny_cfg.clip_dim, generator=gen) * 10,
        torch.rand(4, 7, generator=gen),
        torch.randint(0, 3, (4, 7), generator=gen),
    )
    assert alpha.shape == (4, 7)
    assert torch.equal(alpha, torch.full((4, 7), 0.5))


def test_alpha_learns_from_depth():
    cfg = ConditioningConfig(hidden_dim=8, clip_dim=4, alpha_hidden=8, num_double_blocks=1, num_single_blocks=1)
    pred = AlphaPredictor(cfg)
    opt = torch.optim.Adam(pred.parameters(), lr=0.05)
    depth = torch.tensor([[0, 1, 2]])
    target = torch.tensor([[1.0, 0.5, 0.0]])
    for _ in range(100):
        loss = (pred(torch.zeros(1, 3, 4), torch.full((1, 3), 0.2), depth) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    alpha = pred(torch.zeros(1, 3, 4), torch.full((1, 3), 0.2), depth)[0]
    assert alpha[0] > 0.9 and alpha[2] < 0.1


def test_visual_routing_uses_clip_below_and_dino_at_or_above_one_half(tiny_cfg):
    enc = InstanceEncoder(tiny_cfg)
    gen = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 3, tiny_cfg.clip_dim, generator=gen)
    dino = torch.randn(1, 3, tiny_cfg.dino_dim, generator=gen)
    alpha = torch.tensor([[0.2, 0.5, 0.9]])
    base = enc.visual(clip, dino, alpha)
    clip_changed = enc.visual(clip + 1.0, dino, alpha)
    dino_changed = enc.visual(clip, dino + 1.0, alpha)
    changed_by_clip = (clip_changed != base).any(-1)[0].tolist()
    changed_by_dino = (dino_changed != base).any(-1)[0].tolist()
    assert changed_by_clip == [True, False, False]
    assert changed_by_dino == [False, True, True]


def test_instance_encoder_shapes_and_dino_projection_only_when_needed(tiny_cfg):
    enc = InstanceEncoder(tiny_cfg)
    boxes = torch.tensor([[[0.1, 0.1, 0.4, 0.6], [0.5, 0.2, 0.9, 0.8]]])
    out = enc(boxes, torch.randn(1, 2, tiny_cfg.clip_dim), torch.randn(1, 2, tiny_cfg.dino_dim), torch.rand(1, 2))
    assert out.shape == (1, 2, tiny_cfg.hidden_dim)
    assert isinstance(enc.dino_proj, torch.nn.Linear)  # G=24 != 32
    same = InstanceEncoder(tiny_cfg.with_(dino_dim=tiny_cfg.instance_dim))
    assert isinstance(same.dino_proj, torch.nn.Identity)


def test_layout_head_is_identity_at_init_scaled_by_one_minus_alpha(tiny_cfg):
    head = LayoutHead(tiny_cfg)
    x = torch.randn(2, 3, tiny_cfg.hidden_dim)
    alpha = torch.rand(2, 3)
    torch.testing.assert_close(head(x, alpha), x * (1 - alpha)[..., None], rtol=0, atol=1e-6)


def test_modulation_head_outputs_zero_at_init_and_still_learns(tiny_cfg):
    head = ModulationHead(tiny_cfg)
    inst = torch.randn(2, 3, tiny_cfg.hidden_dim)
    shared = head.shared_offset(inst)
    img, txt = head.double_offsets(0, shared)
    joint = head.single_offsets(0, shared)
    for t in (shared, img, txt, joint):
        assert torch.equal(t, torch.zeros_like(t))
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    target = torch.randn_like(img)
    loss = (head.double_offsets(0, head.shared_offset(inst))[0] - target).pow(2).mean()
    loss.backward()
    assert head.shared[2].weight.grad.abs().sum() > 0  # the zeroed layer receives gradients at once
    opt.step()
    opt.zero_grad()
    loss2 = (head.double_offsets(0, head.shared_offset(inst))[0] - target).pow(2).mean()
    loss2.backward()
    assert head.double_blocks[0].up.weight.grad.abs().sum() > 0
    assert loss2 < loss


def test_feedback_is_zero_at_init_learns_and_stays_zero_for_background(tiny_cfg):
    bridge = FeedbackBridge(tiny_cfg)
    hidden = torch.randn(1, 16, tiny_cfg.hidden_dim)
    pool = torch.zeros(1, 2, 16)
    pool[0, 0, :8] = 1 / 8
    pool[0, 1, 8:] = 1 / 8
    fg = torch.tensor([[True, False]])  # ref 1 has alpha < 0.5
    out = bridge(0, hidden, pool, fg)
    assert torch.equal(out, torch.zeros_like(out))
    opt = torch.optim.SGD(bridge.parameters(), lr=0.5)
    out.sum().backward()
    assert bridge.up[0].weight.grad.abs().sum() > 0
    opt.step()
    out = bridge(0, hidden, pool, fg)
    assert out[0, 0].abs().sum() > 0
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))


def test_feedback_is_zero_for_alpha_below_one_half_through_prepare(tiny_cfg):
    adapter = CompositionAdapter(tiny_cfg)
    with torch.no_grad():
        adapter.alpha_predictor.fc2.bias.fill_(-3.0)  # every alpha < 0.5
    cond = adapter.prepare(random_refs(1, 3, tiny_cfg), (8, 8), text_len=4)
    assert not cond.foreground.any()
    with torch.no_grad():
        adapter.feedback_bridge.up[0].weight.normal_()
    fb = adapter.feedback_bridge(0, torch.randn(1, 64, tiny_cfg.hidden_dim), cond.pool_weights, cond.foreground)
    assert torch.equal(fb, torch.zeros_like(fb))


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_at_flux_size_stay_within_budget(capsys):
    cfg = ConditioningConfig()  # FLUX.1-dev: D=3072, 19 double, 38 single blocks
    with torch.device("meta"):
        adapter = CompositionAdapter(cfg)
    counts = {name: count(m) for name, m in adapter.named_children()}
    total = count(adapter)
    with capsys.disabled():
        print("\nconditioning parameters at FLUX.1-dev size (M):")
        for name, n in counts.items():
            print(f"  {name:18s} {n / 1e6:8.2f}")
        print(f"  {'total':18s} {total / 1e6:8.2f}")
    d = cfg.hidden_dim
    # Shared MLP 2 D^2 plus rank-64 projections; a full D x D per block would be >= 57 D^2 = 538M.
    assert counts["modulation_head"] < 60e6
    assert counts["modulation_head"] == 2 * d * d + 2 * d + 19 * 64 * 3 * d + 38 * 64 * 2 * d
    assert counts["feedback_bridge"] == 18 * 16 * 2 * d
    assert counts["layout_head"] == d * d + d
    assert counts["alpha_predictor"] == (768 + 4) * 256 + 256 + 256 + 1
    assert counts["assemble"] == 7 * (d * d + d)  # blocks 0, 3, ..., 18
    assert total < 150e6
