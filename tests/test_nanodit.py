"""NanoDiT for `mpp vary` (seed 003, DESIGN 7): shapes, masks, null embeddings, CFG dropout, gradient flow,
dual CFG, warm start, and a tiny overfit run."""

from __future__ import annotations

import math
import time

import pytest
import torch

from moviepostproduction.errors import MppError, WeightsError
from moviepostproduction.noise import make_noise
from moviepostproduction.sampling import denoise, get_timesteps
from moviepostproduction.training.vary_objective import DropoutProbs, flow_matching_loss, sample_dropout
from moviepostproduction.vary.nanodit import PRESETS, NanoDiT, NanoDiTConfig, NanoDiTValueError, VaryConditioning
from moviepostproduction.vary.nanodit_io import load_nanodit, save_nanodit
from moviepostproduction.vary.pipeline import VaryPipeline, dual_guidance_velocity

from helpers import randomize_zero_inits

TINY = PRESETS["tiny"]
PATCH_KEYS = {"patch_proj.weight", "patch_proj.bias", "patch_null"}


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only adds contention on a shared CPU (15x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(cfg: NanoDiTConfig = TINY, seed: int = 0, randomize: bool = True) -> NanoDiT:
    """A tiny model; `randomize` gives the zero-initialised branches values so every path acts on the output."""
    torch.manual_seed(seed)
    model = NanoDiT(cfg).eval()
    if randomize:
        randomize_zero_inits(model, seed=seed + 1, std=0.2)
    return model


def make_cond(cfg: NanoDiTConfig, batch: int, text_len: int = 5, seed: int = 0) -> VaryConditioning:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_len, dtype=torch.bool)
    mask[0, text_len // 2 :] = False  # sample 0 has padded text tokens
    return VaryConditioning(
        text=torch.randn(batch, text_len, cfg.text_dim, generator=gen),
        text_mask=mask,
        cls=torch.randn(batch, cfg.dino_dim, generator=gen),
        patches=torch.randn(batch, cfg.dino_patches, cfg.dino_dim, generator=gen),
    )


def run(model: NanoDiT, x: torch.Tensor, t: torch.Tensor, cond: VaryConditioning, **drops) -> torch.Tensor:
    return model(
        x, t, text=cond.text, text_mask=cond.text_mask, cls=cond.cls, patches=cond.patches, **drops
    )  # (B, C, H, W)


def inputs(cfg: NanoDiTConfig, batch: int, size: tuple[int, int] | None = None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + 100)
    h, w = size or (cfg.sample_size, cfg.sample_size)
    return torch.randn(batch, cfg.in_channels, h, w, generator=gen), torch.rand(batch, generator=gen)


# ------------------------------------------------------------------------------------------- config, shapes
@pytest.mark.parametrize(
    ("cfg", "size"),
    [
        (TINY, (8, 8)),
        (TINY, (4, 12)),  # non-square, another grid than sample_size
        (TINY.with_(patch_size=1, in_channels=3, depth=1), (6, 5)),
        (TINY.with_(patch_size=4, hidden_size=48, num_heads=3, dino_patches=9, qk_norm=False), (16, 8)),
    ],
)
def test_output_shape_equals_input_shape(cfg, size):
    model = make_model(cfg)
    x, t = inputs(cfg, 3, size)
    v = run(model, x, t, make_cond(cfg, 3), drop_text=torch.tensor([True, False, False]))
    assert v.shape == x.shape
    assert torch.isfinite(v).all()


def test_initial_velocity_is_exactly_zero_and_blocks_are_identity():
    model = make_model(randomize=False)
    x, t = inputs(TINY, 2)
    assert torch.equal(run(model, x, t, make_cond(TINY, 2)), torch.zeros_like(x))
    for block in model.blocks:  # adaLN-Zero: every gate starts at 0
        assert not block.adaLN_modulation[-1].weight.any() and not block.adaLN_modulation[-1].bias.any()


def test_presets_and_config_invariants_name_the_values():
    assert PRESETS["toy"].in_channels == 16 and PRESETS["toy"].sample_size == 8
    with pytest.raises(NanoDiTValueError) as err:
        NanoDiTConfig(hidden_size=30, num_heads=4, sample_size=7)
    message = str(err.value)
    assert "hidden_size: not divisible by num_heads 4 (got 30)" in message
    assert "sample_size: not a multiple of patch 2 (got 7)" in message
    with pytest.raises(NanoDiTValueError, match=r"depth: must be an integer >= 1 \(got 0\)"):
        TINY.with_(depth=0)


def test_bad_inputs_name_the_argument_and_shape():
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    with pytest.raises(NanoDiTValueError, match=r"patches: expected shape \(2, 4, 24\) \(got \(2, 3, 24\)\)"):
        model(x, t, text=cond.text, text_mask=None, cls=cond.cls, patches=cond.patches[:, :3])
    with pytest.raises(NanoDiTValueError, match="drop_image: must be a bool tensor"):
        run(model, x, t, cond, drop_image=torch.zeros(2))


# ---------------------------------------------------------------------------------- masks, null embeddings
def test_padded_text_tokens_have_no_influence():
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    changed = VaryConditioning(cond.text.clone(), cond.text_mask, cond.cls, cond.patches)
    changed.text[~cond.text_mask] = 1e3 * torch.randn(int((~cond.text_mask).sum()), TINY.text_dim)
    assert torch.equal(run(model, x, t, cond), run(model, x, t, changed))
    changed.text[1, 0] += 1.0  # a real token does matter, and only for its own sample
    v, v_changed = run(model, x, t, cond), run(model, x, t, changed)
    assert torch.equal(v[0], v_changed[0]) and not torch.allclose(v[1], v_changed[1])


@pytest.mark.parametrize("part", ["text", "image"])
def test_dropped_part_has_no_influence(part):
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    drop = torch.tensor([True, False])
    noise = make_cond(TINY, 2, seed=7)
    if part == "text":  # values and padding of dropped text are both ignored
        other = VaryConditioning(noise.text, ~cond.text_mask, cond.cls, cond.patches)
    else:  # CLS and patches are dropped together: changing either one changes nothing
        other = VaryConditioning(cond.text, cond.text_mask, noise.cls, noise.patches)
    drops = {f"drop_{part}": drop}
    v, v_other = run(model, x, t, cond, **drops), run(model, x, t, other, **drops)
    assert torch.equal(v[0], v_other[0])
    assert not torch.allclose(v[1], v_other[1])  # the kept sample still sees its conditioning


def test_null_embeddings_replace_dropped_parts():
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    drop = torch.ones(2, dtype=torch.bool)
    null_mask = torch.zeros_like(cond.text_mask)
    null_mask[:, 0] = True
    with torch.no_grad():
        explicit = VaryConditioning(
            model.text_null.expand_as(cond.text).clone(),
            null_mask,
            model.cls_null.expand_as(cond.cls).clone(),
            model.patch_null.expand_as(cond.patches).clone(),
        )
        assert torch.equal(run(model, x, t, cond, drop_text=drop, drop_image=drop), run(model, x, t, explicit))
        before = run(model, x, t, cond, drop_text=drop, drop_image=drop)
        for null in (model.text_null, model.cls_null, model.patch_null):  # each null is actually used
            null.add_(1.0)
            after = run(model, x, t, cond, drop_text=drop, drop_image=drop)
            assert not torch.allclose(before, after)
            assert torch.equal(run(model, x, t, cond), run(model, x, t, cond))  # kept samples: unaffected
            before = after


def test_nulls_do_not_touch_kept_samples():
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    keep = torch.zeros(2, dtype=torch.bool)
    v = run(model, x, t, cond, drop_text=keep, drop_image=keep)
    with torch.no_grad():
        for null in (model.text_null, model.cls_null, model.patch_null):
            null.normal_()
    assert torch.equal(v, run(model, x, t, cond, drop_text=keep, drop_image=keep))
    assert torch.equal(v, run(model, x, t, cond))


# --------------------------------------------------------------------------------------------- CFG dropout
def test_dropout_frequencies_match_probabilities():
    n, probs = 20_000, DropoutProbs()
    drop_text, drop_image = sample_dropout(n, probs, torch.Generator().manual_seed(0))
    assert drop_text.dtype == torch.bool and drop_text.shape == drop_image.shape == (n,)
    observed = {
        "uncond": drop_text & drop_image,
        "text_only": ~drop_text & drop_image,
        "image_only": drop_text & ~drop_image,
        "both": ~drop_text & ~drop_image,
    }
    for case, hits in observed.items():
        p = getattr(probs, case)
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(hits.float().mean().item() - p) < 4 * sigma, case


def test_dropout_is_seeded_and_configurable():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert all(
        torch.equal(a, b)
        for a, b in zip(sample_dropout(64, None, gen()), sample_dropout(64, None, gen()), strict=False)
    )
    drop_text, drop_image = sample_dropout(1000, DropoutProbs(0.0, 1.0, 0.0, 0.0), gen())
    assert not drop_text.any() and drop_image.all()  # text only: image (CLS + patches) always dropped
    with pytest.raises(ValueError, match="probabilities sum to 0.9, not 1"):
        DropoutProbs(0.1, 0.3, 0.05, 0.45)
    with pytest.raises(MppError, match=r"uncond: must be a probability in \[0, 1\] \(got -0.1\)"):
        DropoutProbs(-0.1, 0.4, 0.15, 0.55)
    with pytest.raises(MppError, match=r"both: must be a probability in \[0, 1\] \(got 'often'\)"):
        DropoutProbs(0.1, 0.3, 0.05, "often")  # a config file's string: a problem, not a TypeError


# ------------------------------------------------------------------------------------------- gradient flow
def test_patch_projection_receives_gradient():
    model = make_model()
    cond = make_cond(TINY, 2)
    x0, _ = inputs(TINY, 2)
    loss = flow_matching_loss(model.train(), x0, cond, torch.Generator().manual_seed(0), probs=DropoutProbs(0, 0, 0, 1))
    loss.backward()
    assert model.patch_proj.weight.grad.abs().sum() > 0
    assert model.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0


def test_patch_gradient_flows_from_init_after_two_optimizer_steps():
    """At init the path patches -> output crosses two zeros in series (cross-attn gate, final linear), so the
    patch projection's gradient is exactly 0; step 1 moves the final linear, step 2 the gates, then it flows."""
    model = make_model(randomize=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, _ = inputs(TINY, 4)
    cond = make_cond(TINY, 4)
    grads = []
    for step in range(3):
        opt.zero_grad()
        flow_matching_loss(
            model, x0, cond, torch.Generator().manual_seed(step), probs=DropoutProbs(0, 0, 0, 1)
        ).backward()
        grads.append(model.patch_proj.weight.grad.abs().sum().item())
        opt.step()
    assert grads[0] == 0.0 and grads[1] == 0.0
    assert grads[2] > 0.0


# ------------------------------------------------------------------------------------------------ dual CFG
def test_dual_cfg_with_unit_scales_is_the_conditional_velocity():
    """v = u + s_T (b - i) + s_I (i - u); with s_T = s_I = 1 the i and u terms cancel: v = b."""
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    guided = dual_guidance_velocity(model, cond, 1.0, 1.0)(x, t)
    assert torch.allclose(guided, run(model, x, t, cond), atol=1e-5)


def test_dual_cfg_batches_three_evaluations_into_one_forward():
    model = make_model()
    x, t = inputs(TINY, 2)
    cond = make_cond(TINY, 2)
    batches = []
    model.register_forward_hook(lambda _m, args, _out: batches.append(args[0].shape[0]))
    guided = dual_guidance_velocity(model, cond, 4.0, 1.5)(x, t)
    assert batches == [6]
    no = torch.zeros(2, dtype=torch.bool)
    yes = ~no
    u = run(model, x, t, cond, drop_text=yes, drop_image=yes)
    i = run(model, x, t, cond, drop_text=yes, drop_image=no)
    b = run(model, x, t, cond)
    assert torch.allclose(guided, u + 4.0 * (b - i) + 1.5 * (i - u), rtol=1e-5, atol=1e-4)


def test_pipeline_unit_scales_equal_plain_sampling_and_seed_reproduces():
    model = make_model()
    cond = make_cond(TINY, 2)
    pipe = VaryPipeline(model)
    kwargs = dict(text_embeds=cond.text, text_mask=cond.text_mask, image_cls=cond.cls, image_patches=cond.patches)
    out = pipe(**kwargs, text_scale=1.0, image_scale=1.0, num_inference_steps=4, seed=5)
    noise = make_noise((2, TINY.in_channels, 8, 8), seed=5)
    plain = denoise(
        lambda x, t: run(model, x, t, cond), noise, get_timesteps(4, image_seq_len=16)
    )  # 8x8 latents, patch 2 -> 16 tokens
    assert torch.equal(out.images, plain) and out.seed == 5
    guided = pipe(**kwargs, num_inference_steps=4, seed=5).images
    assert guided.shape == (2, 4, 8, 8) and not torch.allclose(guided, plain)
    assert torch.equal(guided, pipe(**kwargs, num_inference_steps=4, generator=torch.Generator().manual_seed(5)).images)


def test_pipeline_rejects_bad_output_type_and_missing_decoder():
    cond = make_cond(TINY, 1)
    pipe = VaryPipeline(make_model())
    kwargs = dict(text_embeds=cond.text, image_cls=cond.cls, image_patches=cond.patches, seed=0)
    with pytest.raises(MppError, match="output_type: must be one of latent, pt, pil"):
        pipe(**kwargs, output_type="np")
    with pytest.raises(MppError, match=r"output_type: needs a decoder"):
        pipe(**kwargs, output_type="pil")
    decoded = VaryPipeline(pipe.model, decode=lambda z: z[:, :3])(**kwargs, num_inference_steps=2, output_type="pt")
    assert decoded.images.shape == (1, 3, 8, 8) and decoded.images.min() >= 0 and decoded.images.max() <= 1


# ---------------------------------------------------------------------------------------------- warm start
def test_warm_start_reports_exactly_the_missing_patch_keys(tmp_path):
    from safetensors.torch import save_file

    old = make_model(seed=3)
    state = {k: v.contiguous() for k, v in old.state_dict().items() if k not in PATCH_KEYS}
    save_file(state, tmp_path / "old.safetensors")  # the pre-patch model: no patch_* tensors, no metadata
    model, report = load_nanodit(tmp_path / "old.safetensors", TINY)
    assert set(report.missing) == set(report.initialized) == PATCH_KEYS
    assert report.unexpected == () and report.mismatched == () and set(report.loaded) == set(state)
    new_state = model.state_dict()
    assert all(torch.equal(new_state[k], v) for k, v in state.items())
    assert not new_state["patch_null"].any()  # fresh init (zeros), not the old model's random values


def test_warm_start_is_strict_outside_the_allow_list(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in make_model().state_dict().items()}
    del state["cls_null"]
    state["text_proj.weight"] = torch.zeros(3, 3)
    state["old_head.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError) as err:
        load_nanodit(tmp_path / "bad.safetensors", TINY)
    message = str(err.value)
    assert str(tmp_path / "bad.safetensors") in message and "\n" not in message
    assert "missing cls_null" in message and "unexpected old_head.weight" in message
    assert "text_proj.weight has shape (3, 3) in the file, (32, 16) in the model" in message
    _, report = load_nanodit(tmp_path / "bad.safetensors", TINY, strict=False)
    assert report.missing == ("cls_null",) and report.unexpected == ("old_head.weight",)
    assert report.mismatched == (("text_proj.weight", (3, 3), (32, 16)),)


def test_save_load_roundtrip_is_atomic_and_carries_the_config(tmp_path):
    model = make_model(TINY.with_(depth=1))
    path = save_nanodit(model, tmp_path / "ckpt" / "nanodit.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["nanodit.safetensors"]  # no temp file left
    loaded, report = load_nanodit(path)
    assert loaded.config == model.config and report.exact
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=False)
    )


def test_refuses_pickles_and_truncated_files_naming_the_path(tmp_path):
    pickle = tmp_path / "model.pt"
    torch.save(make_model().state_dict(), pickle)
    with pytest.raises(MppError, match=rf"{pickle}: not a .safetensors file"):
        load_nanodit(pickle, TINY)
    path = save_nanodit(make_model(), tmp_path / "full.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=rf"{truncated}: truncated or corrupt"):
        load_nanodit(truncated, TINY)


# -------------------------------------------------------------------------------------------------- overfit
def test_tiny_model_overfits_a_trivial_dataset():
    """Four solid-colour latents, each with its own conditioning: the loss halves within 100 steps (< 20 s)."""
    torch.manual_seed(0)
    model = NanoDiT(TINY).train()
    levels = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    x0 = levels[:, None, None, None].expand(4, TINY.in_channels, 8, 8).contiguous()  # (4, C, 8, 8)
    cond = make_cond(TINY, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)

    def eval_loss() -> float:  # 16 fixed draws of (case, t, noise) per sample, in one forward
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1000)
            return flow_matching_loss(model, x0.repeat(16, 1, 1, 1), cond.repeat(16), gen).item()

    start, before = time.perf_counter(), eval_loss()
    for step in range(100):
        opt.zero_grad()
        flow_matching_loss(model, x0, cond, torch.Generator().manual_seed(step)).backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)
    assert time.perf_counter() - start < 20
