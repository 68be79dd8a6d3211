"""Rectified-flow sampling shared by every pipeline: schedules, packing, guidance, the denoise loop (noise: noise.py).

Convention (FLUX / SD3 rectified flow): x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0, and
sampling integrates dx/dt = v from t = 1 (pure noise) down to t = 0 (data). The model is a pure velocity
predictor; nothing here knows about it. Every pipeline (compose, panorama, fill, vary) prepares what depends only
on its inputs once, then calls `denoise` with its own velocity function; the guidance combinations (reference
guidance and true CFG: `scene_guidance`; dual CFG: `dual_cfg`) are the small functions beside `cfg`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from einops import rearrange
from tqdm.auto import tqdm

from moviepostproduction.errors import MppError, Problem, ValidationError

__all__ = [
    "CALLBACK_TENSOR_INPUTS",
    "MAX_SEED",
    "MAX_STEPS",
    "SCHEDULES",
    "SamplingConfig",
    "SamplingValueError",
    "cfg",
    "check_call",
    "compute_mu",
    "denoise",
    "dual_cfg",
    "finite_problem",
    "get_timesteps",
    "latent_image_ids",
    "noise_latents",
    "pack_latents",
    "positive_problem",
    "require_valid",
    "scale_problem",
    "scene_guidance",
    "seed_problem",
    "step_end",
    "steps_problem",
    "strength_timesteps",
    "text_ids",
    "time_shift",
    "unpack_latents",
    "use_true_cfg",
]

SCHEDULES = ("shifted", "linear", "cosine")
MAX_STEPS = 1000  # the most denoising steps any entry point accepts (CLI, Python API, ComfyUI nodes)
MAX_SEED = 2**64  # seeds are integers in [0, MAX_SEED): what torch.Generator.manual_seed takes, made non-negative

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], "torch.Tensor | None"]


class SamplingValueError(ValidationError, ValueError):
    """A bad sampling argument: an `MppError` for the CLI and a `ValueError` for library callers."""


def _invalid(field: str, value: object, message: str) -> SamplingValueError:
    return SamplingValueError([Problem(field, value, message)])


# ----------------------------------------------------------------------------------------------- schedules
def compute_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX resolution shift: the line through (base_seq_len, base_shift) and (max_seq_len, max_shift).

    Extrapolates outside the two anchor points, as FLUX and diffusers do (a 2048^2 image gets mu > 1.15).
    """
    if max_seq_len == base_seq_len:
        raise _invalid("max_image_seq_len", max_seq_len, "must differ from base_image_seq_len (the shift is a line)")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def time_shift(mu: float, sigma: float, t: torch.Tensor) -> torch.Tensor:
    """exp(mu) / (exp(mu) + (1/t - 1)^sigma): moves steps towards t = 1 for mu > 0; fixes t = 0 and 1."""
    t = torch.as_tensor(t, dtype=torch.float64)
    inner = torch.where(t > 0, t, torch.ones_like(t))  # avoid 1/0; t = 0 is set exactly below
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / inner - 1.0) ** sigma)
    shifted = torch.where(t <= 0, torch.zeros_like(t), shifted)
    return torch.where(t >= 1, torch.ones_like(t), shifted)


def get_timesteps(
    num_steps: int,
    *,
    image_seq_len: int | None = None,
    schedule: str = "shifted",
    shift: float | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """Timesteps (num_steps + 1,) float32, strictly decreasing from exactly 1.0 to exactly 0.0.

    shifted: `time_shift` of a linear grid with mu = compute_mu(image_seq_len), or mu = ln(shift) when the
    static `shift` factor is given (SD3 / diffusers `FlowMatchEulerDiscreteScheduler(shift=...)` meaning), or
    the explicit `mu`. linear: the plain grid. cosine: (1 + cos(pi i / N)) / 2, denser near both ends.
    """
    require_valid(steps_problem("num_steps", num_steps))
    if schedule not in SCHEDULES:
        raise _invalid("schedule", schedule, f"unknown schedule, expected one of {', '.join(SCHEDULES)}")
    if schedule != "shifted" and (shift is not None or mu is not None):
        raise _invalid("shift", shift if shift is not None else mu, f"only applies to 'shifted', not {schedule!r}")
    if shift is not None and mu is not None:
        raise _invalid("shift", shift, "give either shift or mu, not both")

    grid = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if schedule == "cosine":
        grid = (1.0 + torch.cos(math.pi * (1.0 - grid))) / 2.0
    elif schedule == "shifted":
        if shift is not None:
            if not shift > 0 or not math.isfinite(shift):
                raise _invalid("shift", shift, "must be a finite number > 0")
            mu = math.log(shift)
        elif mu is None:
            if image_seq_len is None or image_seq_len < 1:
                raise _invalid("image_seq_len", image_seq_len, "the shifted schedule needs the token count")
            mu = compute_mu(image_seq_len)
        grid = time_shift(mu, 1.0, grid)
    grid[0], grid[-1] = 1.0, 0.0  # exact endpoints whatever the rounding of the formulas above
    timesteps = grid.to(torch.float32)
    if not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise _invalid("num_steps", num_steps, f"too many steps for the {schedule!r} schedule in float32")
    return timesteps


def strength_timesteps(timesteps: torch.Tensor, strength: float) -> torch.Tensor:
    """img2img: the tail of `timesteps` that starts at the first t <= strength (strength 1 keeps them all).

    Unlike diffusers (which keeps int(N * strength) steps) this cuts by time value, so the start noise level
    never exceeds `strength` whatever the schedule. At least one step must remain.
    """
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 < strength <= 1.0:
        raise _invalid("strength", strength, "must be in (0, 1]")
    start = int(torch.nonzero(timesteps <= strength)[0])  # exists: the last timestep is 0
    if start >= len(timesteps) - 1:
        raise _invalid("strength", strength, f"leaves no denoising step of {len(timesteps) - 1}")
    return timesteps[start:]


@dataclass(frozen=True)
class SamplingConfig:
    """How to step: defaults equal diffusers' FluxPipeline (28 steps, resolution-shifted schedule)."""

    num_steps: int = 28
    schedule: str = "shifted"
    shift: float | None = None  # static SD3-style shift factor; None = FLUX resolution-dependent mu
    strength: float = 1.0  # img2img / denoise strength; 1.0 = from pure noise

    def __post_init__(self) -> None:
        self.timesteps(image_seq_len=256)  # validates every field with the same messages as the functions

    def timesteps(self, image_seq_len: int) -> torch.Tensor:
        """(S + 1,) timesteps for `image_seq_len` packed image tokens, truncated by `strength`."""
        full = get_timesteps(self.num_steps, image_seq_len=image_seq_len, schedule=self.schedule, shift=self.shift)
        return strength_timesteps(full, self.strength)


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise; `t` is a scalar or one value per batch item (B,)."""
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    t = t.reshape(-1, *([1] * (x0.ndim - 1)))  # (B or 1, 1, ...) broadcasts over all but the batch dim
    return (1.0 - t) * x0 + t * noise


# ------------------------------------------------------------------------------------------------- packing
def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents (B, C, H, W) -> FLUX tokens (B, (H/2)(W/2), 4C), one token per 2x2 patch, row-major."""
    _, _, h, w = latents.shape
    if h % 2 or w % 2:
        raise _invalid("latents", tuple(latents.shape), "height and width must be even to pack 2x2 patches")
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, (H/2)(W/2), 4C) -> (B, C, H, W); height/width in latent pixels."""
    if height % 2 or width % 2 or tokens.shape[1] != (height // 2) * (width // 2) or tokens.shape[2] % 4:
        raise _invalid("tokens", tuple(tokens.shape), f"do not pack a {height}x{width} latent")
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)


def latent_image_ids(
    h: int,
    w: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """RoPE position ids (h * w, 3) for an h x w token grid: [0, row, col], row-major as `pack_latents` (FLUX)."""
    rows = torch.arange(h, dtype=dtype, device=device)
    cols = torch.arange(w, dtype=dtype, device=device)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # (h, w, 2)
    ids = torch.cat([torch.zeros(h, w, 1, dtype=dtype, device=device), grid], dim=-1)  # (h, w, 3)
    return rearrange(ids, "h w c -> (h w) c")


def text_ids(n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE position ids (n, 3) for text tokens: all zero, as FLUX uses."""
    return torch.zeros(n, 3, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------ guidance
def scale_problem(field: str, value: object) -> Problem | None:
    """The problem with a guidance scale, if any: it must be a finite number >= 0 (a config file may hand over a
    bool or a string)."""
    if not (is_finite_number(value) and value >= 0):
        return Problem(field, value, "must be a finite number >= 0")
    return None


def positive_problem(field: str, value: object) -> Problem | None:
    """The problem with a factor that must be a finite number > 0 (e.g. a noise temperature), if any."""
    return None if is_positive_number(value) else Problem(field, value, "must be a positive number")


def finite_problem(field: str, value: object) -> Problem | None:
    """The problem with a factor that may have any sign but must be a finite number (e.g. a dual-CFG scale)."""
    return None if is_finite_number(value) else Problem(field, value, "must be a finite number")


def steps_problem(field: str, value: object) -> Problem | None:
    """The problem with a number of denoising steps, if any: an integer in [1, MAX_STEPS]. The bound keeps a typo
    such as 10**9 from allocating its schedule (and rolling offsets) before the first step."""
    if not (_is_integer(value) and 1 <= value <= MAX_STEPS):
        return Problem(field, value, f"must be an integer in [1, {MAX_STEPS}]")
    return None


def seed_problem(field: str, value: object) -> Problem | None:
    """The problem with a seed, if any: None (the default seed) or an integer in [0, 2**64), the range of
    torch.Generator.manual_seed without its negative half (which aliases the top half)."""
    if value is not None and not (_is_integer(value) and 0 <= value < MAX_SEED):
        return Problem(field, value, "must be an integer in [0, 2**64)")
    return None


def _is_integer(value: object) -> bool:
    """An integer of any integer type (numpy's too), not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_call(num_inference_steps: object, seed: object, guidance_scale: object, true_cfg_scale: object = 1.0) -> None:
    """The numbers every FLUX pipeline's `__call__` takes, checked together before any work (one line per problem)."""
    require_valid(
        steps_problem("num_inference_steps", num_inference_steps),
        seed_problem("seed", seed),
        scale_problem("guidance_scale", guidance_scale),
        scale_problem("true_cfg_scale", true_cfg_scale),
    )


def require_valid(*problems: Problem | None) -> None:
    """Raise one `SamplingValueError` listing every problem given (None entries are no problem)."""
    found = [p for p in problems if p is not None]
    if found:
        raise SamplingValueError(found)


def is_finite_number(value: object) -> bool:
    """A finite real number (not a bool or a string, which a config file may hand over)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def is_positive_number(value: object) -> bool:
    """A finite real number > 0: e.g. a noise temperature."""
    return is_finite_number(value) and value > 0


def is_count(value: object) -> bool:
    """An integer >= 0 (not a bool, which is an int to Python): e.g. a number of blocks or repeats."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= 0


def is_probability(value: object) -> bool:
    """A finite real number in [0, 1]: e.g. a dropout rate."""
    return is_finite_number(value) and 0 <= value <= 1


def use_true_cfg(true_cfg_scale: float, has_negative_prompt: bool) -> bool:
    """True CFG (a second, unconditional pass) runs only when scale > 1 and a negative prompt is given."""
    return true_cfg_scale > 1.0 and has_negative_prompt


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance v_uncond + scale (v_cond - v_uncond); exactly v_cond at scale 1."""
    return torch.lerp(v_uncond, v_cond, scale)  # lerp is exact at both endpoints, the plain formula is not


def scene_guidance(
    velocity: Callable[[str], torch.Tensor], *, ref_guidance_scale: float = 1.0, true_cfg_scale: float = 1.0
) -> torch.Tensor:
    """Reference guidance, then true CFG on top, from `velocity(case)` for case "scene" (caption + refs), "caption"
    (the same caption without refs) and "negative" (the negative prompt); a case is evaluated only when its scale
    needs it. Reference guidance extrapolates away from the caption alone: v = v_caption + s (v_scene - v_caption).
    Pass true_cfg_scale 1 when there is no negative prompt (`use_true_cfg`)."""
    v = velocity("scene")
    if ref_guidance_scale != 1.0:
        v = cfg(velocity("caption"), v, ref_guidance_scale)
    if true_cfg_scale > 1.0:
        v = cfg(velocity("negative"), v, true_cfg_scale)
    return v


def dual_cfg(
    v_uncond: torch.Tensor, v_img: torch.Tensor, v_both: torch.Tensor, text_scale: float, image_scale: float
) -> torch.Tensor:
    """InstructPix2Pix two-condition guidance (Brooks et al. 2023, eq. 3): image first, then text on top."""
    return v_uncond + text_scale * (v_both - v_img) + image_scale * (v_img - v_uncond)


# ---------------------------------------------------------------------------------------------- Euler loop
def denoise(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = velocity_fn(x, t) along `timesteps` (decreasing) with Euler steps.

    `velocity_fn` gets x in its input dtype and t as float32 (B,) on x's device. The state is carried in
    float32 between steps so low-precision models do not accumulate rounding. After step i,
    `callback(i, t, x)` sees x at time t = timesteps[i + 1] and may return a replacement x (or None).
    """
    if timesteps.ndim != 1 or len(timesteps) < 2 or not bool((timesteps[1:] < timesteps[:-1]).all()):
        raise _invalid("timesteps", timesteps.tolist(), "must be 1-D, >= 2 entries, strictly decreasing")
    dtype, batch, num_steps = x.dtype, x.shape[0], len(timesteps) - 1
    times = timesteps.detach().to(device="cpu", dtype=torch.float32).tolist()
    state = x.to(torch.float32)
    for i in tqdm(range(num_steps), desc="sampling", disable=not progress):
        t_cur, t_next = times[i], times[i + 1]
        t_vec = torch.full((batch,), t_cur, dtype=torch.float32, device=x.device)  # (B,)
        v = velocity_fn(state.to(dtype), t_vec)
        if v.shape != x.shape:
            raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for x of shape {tuple(x.shape)}")
        state = state + (t_next - t_cur) * v.to(torch.float32)
        if not bool(torch.isfinite(state).all()):
            raise MppError(
                f"sampling: non-finite values after step {i + 1}/{num_steps} (t {t_cur:.4f} -> {t_next:.4f})"
            )
        if callback is not None:
            replaced = callback(i, t_next, state.to(dtype))
            if replaced is not None:
                state = replaced.to(torch.float32)
    return state.to(dtype)


# ------------------------------------------------------------------------------- diffusers' step-end callback
CALLBACK_TENSOR_INPUTS = ("latents",)  # what callback_kwargs may hold (diffusers' `_callback_tensor_inputs`)


def step_end(
    pipe: object, callback: Callable | None, tensor_inputs: Sequence[str], timesteps: torch.Tensor
) -> StepCallback | None:
    """diffusers' `callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict` as `denoise`'s callback: after
    step i, the step's diffusers timestep (timesteps[i] x 1000, 0-d float32) and {name: tensor} for `tensor_inputs`;
    a returned "latents" replaces the state. The old `callback(i, t, x)` form is refused in one line."""
    bad = [name for name in tensor_inputs if name not in CALLBACK_TENSOR_INPUTS]
    if bad:
        raise _invalid("callback_on_step_end_tensor_inputs", bad, f"only {list(CALLBACK_TENSOR_INPUTS)} can be passed")
    if callback is None:
        return None
    if not callable(callback) or _positional_count(callback) == 3:
        raise _invalid(
            "callback_on_step_end", getattr(callback, "__name__", type(callback).__name__),
            "must take (pipe, step, timestep, callback_kwargs) and return a dict, as in diffusers (not (i, t, x))",
        )  # fmt: skip
    times = (timesteps.detach().to("cpu", torch.float32) * 1000.0).unbind()

    def call(i: int, _t_next: float, x: torch.Tensor) -> torch.Tensor | None:
        out = callback(pipe, i, times[i], {name: x for name in tensor_inputs})
        if not isinstance(out, dict):
            raise _invalid("callback_on_step_end", type(out).__name__, "must return a dict (callback_kwargs)")
        return out.get("latents")

    return call


def _positional_count(fn: Callable) -> int | None:
    """How many positional parameters `fn` takes (None with *args or without an inspectable signature)."""
    try:
        kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
    except (TypeError, ValueError):
        return None
    positional = sum(k <= inspect.Parameter.POSITIONAL_OR_KEYWORD for k in kinds)
    return None if inspect.Parameter.VAR_POSITIONAL in kinds else positional
