"""Rectified-flow sampling: schedules, packing, noise, guidance identities, the Euler loop (DESIGN 4, 9)."""

from __future__ import annotations

import math

import pytest
import torch

from moviepostproduction.errors import MppError
from moviepostproduction.noise import (
    batch_problem,
    check_packed_latents,
    diffusers_latent_hw,
    draw_latents,
    draw_packed,
    make_noise,
)
from moviepostproduction.sampling import (
    SCHEDULES,
    SamplingConfig,
    cfg,
    compute_mu,
    denoise,
    dual_cfg,
    get_timesteps,
    latent_image_ids,
    noise_latents,
    pack_latents,
    step_end,
    strength_timesteps,
    text_ids,
    time_shift,
    unpack_latents,
    use_true_cfg,
)

SHAPE = (2, 4, 6, 8)  # (B, C, H, W) latents


# ----------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("num_steps", [1, 2, 7, 28, 1000])
def test_schedule_is_strictly_decreasing_from_one_to_exactly_zero(schedule: str, num_steps: int) -> None:
    t = get_timesteps(num_steps, image_seq_len=4096, schedule=schedule)
    assert t.shape == (num_steps + 1,) and t.dtype == torch.float32
    assert t[0].item() == 1.0 and t[-1].item() == 0.0
    assert bool((t[1:] < t[:-1]).all())


def test_linear_and_cosine_grids_have_their_closed_forms() -> None:
    i = torch.arange(5, dtype=torch.float64)
    assert torch.allclose(get_timesteps(4, schedule="linear"), (1 - i / 4).float())
    expected = (1 + torch.cos(math.pi * i / 4)) / 2
    assert torch.allclose(get_timesteps(4, schedule="cosine"), expected.float(), atol=1e-7)


def test_mu_matches_flux_anchors_and_extrapolates_linearly() -> None:
    assert compute_mu(256) == pytest.approx(0.5)
    assert compute_mu(4096) == pytest.approx(1.15)
    assert compute_mu(2176) == pytest.approx((0.5 + 1.15) / 2)
    assert compute_mu(8192) == pytest.approx(1.15 + 0.65 / 3840 * 4096)


def test_time_shift_fixes_endpoints_and_matches_the_formula() -> None:
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = time_shift(1.15, 1.0, t)
    assert out[0].item() == 0.0 and out[-1].item() == 1.0
    assert out[2].item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 1.0))
    assert out[1].item() == pytest.approx(math.exp(1.15) / (math.exp(1.15) + 3.0))
    assert torch.equal(time_shift(0.0, 1.0, t), t.double())  # mu = 0, sigma = 1 is the identity


def test_shifted_schedule_uses_mu_from_resolution_or_the_static_shift() -> None:
    grid = torch.linspace(1, 0, 11, dtype=torch.float64)
    by_len = get_timesteps(10, image_seq_len=4096)
    assert torch.allclose(by_len, time_shift(1.15, 1.0, grid).float())
    by_shift = get_timesteps(10, shift=3.0)
    sd3 = 3.0 * grid / (1 + 2.0 * grid)  # SD3 static shift s t / (1 + (s - 1) t) is mu = ln s
    assert torch.allclose(by_shift, sd3.float())
    assert torch.equal(get_timesteps(10, mu=1.15), by_len)
    assert torch.equal(get_timesteps(10, shift=1.0), get_timesteps(10, schedule="linear"))
    # higher resolution spends more steps at high noise
    assert bool((get_timesteps(10, image_seq_len=4096)[1:-1] > get_timesteps(10, image_seq_len=256)[1:-1]).all())


@pytest.mark.parametrize(
    ("num_steps", "kwargs", "needle"),
    [
        (4, {"schedule": "karras"}, r"schedule: unknown schedule, .* \(got 'karras'\)"),
        (0, {"schedule": "linear"}, r"num_steps: .* \(got 0\)"),
        (4, {"schedule": "shifted"}, r"image_seq_len: .* \(got None\)"),
        (4, {"schedule": "linear", "shift": 3.0}, r"shift: only applies to 'shifted'"),
        (4, {"schedule": "shifted", "shift": -1.0}, r"shift: .* \(got -1.0\)"),
        (4, {"schedule": "shifted", "shift": 3.0, "mu": 1.0}, "either shift or mu"),
    ],
)
def test_bad_schedule_arguments_raise_naming_the_value(num_steps: int, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as info:
        get_timesteps(num_steps, **kwargs)
    assert isinstance(info.value, MppError)  # the CLI reports it as one line, exit code 2


# ------------------------------------------------------------------------------------------------- img2img
def test_strength_one_keeps_every_step() -> None:
    t = get_timesteps(10, image_seq_len=1024)
    assert torch.equal(strength_timesteps(t, 1.0), t)


def test_strength_starts_at_the_first_timestep_not_above_it() -> None:
    t = get_timesteps(10, schedule="linear")
    tail = strength_timesteps(t, 0.5)
    assert tail[0].item() == pytest.approx(0.5) and torch.equal(tail, t[5:])
    tail = strength_timesteps(t, 0.55)  # 0.6 > 0.55, so start at 0.5
    assert torch.equal(tail, t[5:])
    shifted = get_timesteps(10, image_seq_len=4096)
    tail = strength_timesteps(shifted, 0.5)
    assert tail[0] <= 0.5 < shifted[len(shifted) - len(tail) - 1]


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.5, float("nan"), 0.01])
def test_bad_strength_raises_naming_the_value(strength: float) -> None:
    with pytest.raises(MppError, match=rf"strength: .*\(got {strength!r}\)"):
        strength_timesteps(get_timesteps(10, schedule="linear"), strength)


def test_sampling_config_validates_and_truncates() -> None:
    assert len(SamplingConfig().timesteps(4096)) == 29
    assert SamplingConfig(num_steps=10, schedule="linear", strength=0.5).timesteps(64)[0].item() == 0.5
    with pytest.raises(MppError, match="schedule"):
        SamplingConfig(schedule="ddim")


def test_noise_latents_interpolates_per_batch_item() -> None:
    x0, noise = torch.zeros(SHAPE), torch.ones(SHAPE)
    out = noise_latents(x0, noise, torch.tensor([0.25, 0.75]))
    assert torch.equal(out[0], torch.full(SHAPE[1:], 0.25)) and torch.equal(out[1], torch.full(SHAPE[1:], 0.75))
    assert torch.equal(noise_latents(x0 + 2, noise, 1.0), noise)
    assert torch.equal(noise_latents(x0 + 2, noise, 0.0), x0 + 2)


# ------------------------------------------------------------------------------------------------- packing
def test_pack_unpack_round_trip_is_exact() -> None:
    x = torch.randn(SHAPE)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 3 * 4, 16)
    assert torch.equal(unpack_latents(tokens, 6, 8), x)


def test_pack_matches_an_independent_index_loop() -> None:
    b, c, h, w = SHAPE
    x = torch.randn(SHAPE)
    tokens = pack_latents(x)
    for row in range(h // 2):
        for col in range(w // 2):
            for ch in range(c):
                for dy in range(2):
                    for dx in range(2):
                        token = row * (w // 2) + col
                        feature = ch * 4 + dy * 2 + dx
                        assert torch.equal(tokens[:, token, feature], x[:, ch, 2 * row + dy, 2 * col + dx])


def test_pack_rejects_odd_sizes_and_unpack_rejects_wrong_sizes() -> None:
    with pytest.raises(MppError, match="latents"):
        pack_latents(torch.zeros(1, 4, 5, 8))
    with pytest.raises(MppError, match="8x8"):
        unpack_latents(pack_latents(torch.zeros(SHAPE)), 8, 8)


def test_position_ids_follow_the_packed_token_order() -> None:
    ids = latent_image_ids(3, 4)
    assert ids.shape == (12, 3) and ids.dtype == torch.float32
    for token in range(12):
        assert ids[token].tolist() == [0.0, float(token // 4), float(token % 4)]
    assert torch.equal(text_ids(5), torch.zeros(5, 3))


# --------------------------------------------------------------------------------------------------- noise
def test_same_seed_same_noise_and_different_seed_different_noise() -> None:
    a = make_noise(SHAPE, seed=7)
    assert torch.equal(a, make_noise(SHAPE, seed=7))
    assert torch.equal(a, make_noise(SHAPE, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, make_noise(SHAPE, seed=8))
    half = make_noise(SHAPE, seed=7, dtype=torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, a.half())  # drawn in fp32, then cast


def test_per_item_generators_make_each_item_independent_of_the_batch() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = make_noise(SHAPE, generator=gens)
    assert torch.equal(batch[1:], make_noise((1, *SHAPE[1:]), seed=2))
    with pytest.raises(MppError, match="generator"):
        make_noise(SHAPE, generator=gens[:1])


@pytest.mark.parametrize("kwargs", [{}, {"seed": 1, "generator": torch.Generator()}])
def test_noise_needs_exactly_one_source(kwargs: dict) -> None:
    with pytest.raises(MppError, match="exactly one of generator or seed"):
        make_noise(SHAPE, **kwargs)


def test_pipeline_noise_is_diffusers_randn_tensor_in_its_shape_then_packed() -> None:
    """FluxPipeline.prepare_latents: randn_tensor((B, 16, 2 (H // 16), 2 (W // 16))) in the pipeline dtype on the
    generator's device, then packed 2x2; a list of generators draws one item each (issue 41: mpp drew (1, N, 64))."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from diffusers.utils.torch_utils import randn_tensor

    assert diffusers_latent_hw(72, 100) == (8, 12)  # 2 (H // 16), as diffusers rounds down to whole tokens
    for dtype in (torch.float32, torch.bfloat16):
        ours = draw_packed(2, 16, (8, 12), torch.Generator("cpu").manual_seed(3), dtype=dtype)
        drawn = randn_tensor((2, 16, 8, 12), generator=torch.Generator("cpu").manual_seed(3), dtype=dtype)
        assert ours.dtype == dtype and torch.equal(ours, FluxPipeline._pack_latents(drawn, 2, 16, 8, 12))
    gens = [torch.Generator("cpu").manual_seed(s) for s in (1, 2)]
    expected = randn_tensor((2, 16, 4, 4), generator=[torch.Generator("cpu").manual_seed(s) for s in (1, 2)])
    assert torch.equal(draw_latents((2, 16, 4, 4), gens), expected)
    with pytest.raises(MppError, match=r"generator: need one generator per image \(3\)"):
        draw_latents((3, 16, 4, 4), [torch.Generator() for _ in range(2)])


def test_given_latents_must_be_packed_and_finite_one_line_naming_the_shape() -> None:
    check_packed_latents(torch.zeros(2, 16, 64), (2, 16, 64))
    with pytest.raises(MppError, match=r"^latents: must be packed latents of shape \(1, 16, 64\) \(B, N, 4C\)"):
        check_packed_latents(torch.zeros(1, 16, 4, 4), (1, 16, 64))
    with pytest.raises(MppError, match="latents: contains non-finite values"):
        check_packed_latents(torch.full((1, 16, 64), math.nan), (1, 16, 64))


# ------------------------------------------------------------------------------------------------ guidance
def test_cfg_endpoints() -> None:
    u, c = torch.randn(SHAPE), torch.randn(SHAPE)
    assert torch.equal(cfg(u, c, 1.0), c)
    assert torch.equal(cfg(u, c, 0.0), u)
    assert torch.allclose(cfg(u, c, 3.0), 3 * c - 2 * u, atol=1e-6)


def test_dual_cfg_identities() -> None:
    u, i, b = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    s_t, s = 4.5, 2.0
    # image scale 1: text guidance on top of the image-conditioned prediction
    assert torch.allclose(dual_cfg(u, i, b, s_t, 1.0), cfg(i, b, s_t), atol=1e-6)
    # equal scales: plain CFG between no condition and both conditions
    assert torch.allclose(dual_cfg(u, i, b, s, s), cfg(u, b, s), atol=1e-6)
    # text scale 0: image guidance only
    assert torch.allclose(dual_cfg(u, i, b, 0.0, s), cfg(u, i, s), atol=1e-6)
    assert torch.allclose(dual_cfg(u, i, b, 1.0, 1.0), b, atol=1e-6)
    assert torch.allclose(dual_cfg(u, i, b, 0.0, 0.0), u, atol=1e-6)


def test_true_cfg_needs_scale_above_one_and_a_negative_prompt() -> None:
    assert use_true_cfg(4.0, True)
    assert not use_true_cfg(4.0, False)
    assert not use_true_cfg(1.0, True)


# ---------------------------------------------------------------------------------------------- Euler loop
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_euler_follows_the_straight_line_to_x0_exactly(schedule: str) -> None:
    x0 = torch.randn(SHAPE, dtype=torch.float64)
    noise = make_noise(SHAPE, seed=0, dtype=torch.float64)

    def straight(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - x0) / t.to(x.dtype).view(-1, 1, 1, 1)  # = noise - x0 on the line x_t

    out = denoise(straight, noise, get_timesteps(7, image_seq_len=1024, schedule=schedule))
    assert torch.allclose(out, x0, atol=1e-6)


def test_constant_field_moves_by_exactly_minus_v() -> None:
    x, v = torch.randn(SHAPE), torch.randn(SHAPE)
    out = denoise(lambda x_, t: v, x, get_timesteps(5, image_seq_len=256))
    assert torch.allclose(out, x - v, atol=1e-6)


def test_velocity_fn_gets_a_float32_time_per_batch_item() -> None:
    seen: list[torch.Tensor] = []

    def record(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(t)
        assert x.dtype == torch.bfloat16
        return torch.zeros_like(x)

    timesteps = get_timesteps(3, schedule="linear")
    out = denoise(record, torch.ones(SHAPE, dtype=torch.bfloat16), timesteps)
    assert out.dtype == torch.bfloat16
    assert [t.shape for t in seen] == [(2,)] * 3 and all(t.dtype == torch.float32 for t in seen)
    assert [t[0].item() for t in seen] == timesteps[:-1].tolist()


def test_same_seed_gives_identical_samples() -> None:
    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * t.view(-1, 1, 1, 1)

    timesteps = get_timesteps(4, image_seq_len=256)
    a = denoise(field, make_noise(SHAPE, seed=3), timesteps)
    assert torch.equal(a, denoise(field, make_noise(SHAPE, seed=3), timesteps))
    assert not torch.equal(a, denoise(field, make_noise(SHAPE, seed=4), timesteps))


def test_callback_sees_every_step_and_can_replace_x() -> None:
    calls: list[tuple[int, float]] = []

    def clamp_first(i: int, t: float, x: torch.Tensor) -> torch.Tensor | None:
        calls.append((i, t))
        return torch.zeros_like(x) if i == 0 else None

    timesteps = get_timesteps(4, schedule="linear")
    out = denoise(lambda x, t: torch.ones_like(x), torch.randn(SHAPE), timesteps, callback=clamp_first)
    assert calls == [(i, timesteps[i + 1].item()) for i in range(4)]
    assert torch.allclose(out, torch.full(SHAPE, -0.75))  # zeroed at t = 0.75, then three steps of -0.25


def test_non_finite_state_raises_naming_the_step() -> None:
    def blow_up(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(x, math.inf) if t[0] < 0.7 else torch.zeros_like(x)

    with pytest.raises(MppError, match=r"non-finite values after step 3/5 \(t 0.6000 -> 0.4000\)"):
        denoise(blow_up, torch.randn(SHAPE), get_timesteps(5, schedule="linear"), progress=True)


def test_euler_rejects_bad_timesteps() -> None:
    with pytest.raises(MppError, match="timesteps"):
        denoise(lambda x, t: x, torch.randn(SHAPE), torch.tensor([0.0, 1.0]))


def test_step_end_is_diffusers_callback_on_step_end() -> None:
    """callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict: timestep = the step's own t x 1000 (as
    the scheduler's timesteps), callback_kwargs holds the tensor inputs, a returned "latents" replaces the state."""
    pipe, seen = object(), []
    timesteps = get_timesteps(4, schedule="linear")

    def zero_first(p, step: int, timestep: torch.Tensor, kwargs: dict) -> dict:
        seen.append((p is pipe, step, float(timestep), sorted(kwargs)))
        return {"latents": torch.zeros_like(kwargs["latents"])} if step == 0 else {}

    callback = step_end(pipe, zero_first, ["latents"], timesteps)
    out = denoise(lambda x, t: torch.ones_like(x), torch.randn(SHAPE), timesteps, callback=callback)
    assert seen == [(True, i, 1000.0 * (1 - i / 4), ["latents"]) for i in range(4)]
    assert torch.allclose(out, torch.full(SHAPE, -0.75))


@pytest.mark.parametrize(
    "callback, inputs, message",
    [
        (
            lambda i, t, x: None,
            ["latents"],
            r"callback_on_step_end: must take \(pipe, step, timestep, callback_kwargs\)",
        ),
        (lambda p, i, t, kw: {}, ["prompt_embeds"], r"callback_on_step_end_tensor_inputs: only \['latents'\]"),
    ],
)
def test_step_end_refuses_the_old_form_and_unknown_tensor_inputs(callback, inputs, message) -> None:
    with pytest.raises(MppError, match=message):
        step_end(None, callback, inputs, get_timesteps(2, schedule="linear"))


def test_step_end_needs_a_dict_back() -> None:
    callback = step_end(None, lambda p, i, t, kw: None, ["latents"], get_timesteps(2, schedule="linear"))
    with pytest.raises(MppError, match="callback_on_step_end: must return a dict"):
        denoise(lambda x, t: x, torch.randn(SHAPE), get_timesteps(2, schedule="linear"), callback=callback)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_num_images_per_prompt_is_an_integer_of_at_least_1(value) -> None:
    assert str(batch_problem("num_images_per_prompt", value)).startswith(
        "num_images_per_prompt: must be an integer >= 1"
    )
    assert batch_problem("num_images_per_prompt", 3) is None
