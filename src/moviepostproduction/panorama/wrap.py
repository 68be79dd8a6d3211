"""360-degree panoramas on the packed FLUX token grid (DESIGN 7, seed 002): token-grid wrap and latent rolling.

Token-grid wrap (DiT360 fact): the packed (h, w) token grid gets `pad` extra columns on each side holding the
opposite edge's tokens (left pad = last columns, right pad = first columns), the model runs on the (h, w + 2 pad)
grid and the pads are cropped from its output. DiT360 gives the pad columns the *position ids of the opposite
edge* ("opposite"); "continuous" ids (-pad .. w + pad - 1) instead put the wrapped neighbours next to the edge
in RoPE terms. With opposite ids a pad token is an exact duplicate (content and position) of its source, so its
output equals its source's: the pads only add the edge columns a second time as keys.

Latent rolling: before each model call the latent is rolled by `shift` token columns (positions stay, content
moves), the output is rolled back, so the model's edge never sits at the same content column twice. Rolling
every call and rolling back is the same as rolling the state and unrolling it at the end.

Both are gathers with one index (`token_sources`): the per-scene `Conditioning` (masks, regions, Assemble-Attn
packing) is prepared once on the real (h, w) grid and gathered the same way (`remap_conditioning`), so a pad or
rolled token is modulated and grouped exactly like its source token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange

from moviepostproduction.compose.conditioning import Conditioning, LayoutPacking, RegionMap, build_packing
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.sampling import is_count

__all__ = [
    "PAD_IDS",
    "ROLL_MODES",
    "ModelFn",
    "PanoramaConfig",
    "PanoramaValueError",
    "column_sources",
    "crop_tokens",
    "panorama_grid",
    "remap_conditioning",
    "roll_offsets",
    "token_sources",
    "wrap_ids",
    "wrap_tokens",
    "wrapped_forward",
]

PAD_IDS = ("opposite", "continuous")
ROLL_MODES = ("off", "fixed", "random")

# (hidden_states (B, N', C_in), img_ids (N', 3), conditioning on the same N' tokens) -> velocity (B, N', C_out)
ModelFn = Callable[[torch.Tensor, torch.Tensor, "Conditioning | None"], torch.Tensor]


class PanoramaValueError(ValidationError, ValueError):
    """A bad panorama argument: an `MppError` for the CLI and a `ValueError` for library callers."""


def _invalid(field: str, value: object, message: str) -> PanoramaValueError:
    return PanoramaValueError([Problem(field, value, message)])


@dataclass(frozen=True)
class PanoramaConfig:
    """How a panorama is kept seamless; the defaults follow DiT360 plus circular VAE padding (DESIGN 7)."""

    pad: int = 1  # wrapped token columns on each side (DiT360: 1); 0 = no token wrap
    pad_ids: str = "opposite"  # position ids of the pads: "opposite" edge (DiT360) or "continuous"
    periodic_rope: bool = False  # column RoPE frequencies = multiples of 2 pi / w (exact roll equivariance)
    circular_vae: bool = True  # VAE convs pad circularly along the width
    vae_height_padding: str = "zeros"  # how those convs pad along the height: "zeros" or "replicate"
    roll: str = "off"  # latent rolling between steps: "off", "fixed" (roll_step per step) or "random"
    roll_step: int = 1  # token columns added to the offset at every step when roll="fixed"

    def __post_init__(self) -> None:
        if not is_count(self.pad):
            raise _invalid("pad", self.pad, "must be an integer >= 0")
        if self.pad_ids not in PAD_IDS:
            raise _invalid("pad_ids", self.pad_ids, f"must be one of {', '.join(PAD_IDS)}")
        if self.roll not in ROLL_MODES:
            raise _invalid("roll", self.roll, f"must be one of {', '.join(ROLL_MODES)}")
        if isinstance(self.roll_step, bool) or not isinstance(self.roll_step, int):
            raise _invalid("roll_step", self.roll_step, "must be an integer")
        if self.vae_height_padding not in ("zeros", "replicate"):
            raise _invalid("vae_height_padding", self.vae_height_padding, "must be zeros or replicate")

    def check_grid(self, grid: tuple[int, int]) -> None:
        """The pads must come from real columns: pad <= w."""
        if self.pad > grid[1]:
            raise _invalid("pad", self.pad, f"exceeds the {grid[1]} token columns of the panorama")


def panorama_grid(height: int, vae_scale_factor: int = 8) -> tuple[int, int]:
    """Packed token grid (h, w) of a height x 2 height panorama: one token per 2x2 latent pixels."""
    token = 2 * vae_scale_factor
    if isinstance(height, bool) or not isinstance(height, int) or height < token or height % token:
        raise _invalid("height", height, f"must be a positive multiple of {token} (VAE x 2x2 packing)")
    return height // token, 2 * height // token


# --------------------------------------------------------------------------------------------- index maths
def column_sources(width: int, pad: int = 0, shift: int = 0) -> torch.Tensor:
    """(width + 2 pad,) long: the real column whose content sits at each column of the rolled, padded grid.

    Rolled content follows `torch.roll`: column j shows column (j - shift) mod width.
    """
    return (torch.arange(width + 2 * pad) - pad - shift) % width


def token_sources(grid: tuple[int, int], pad: int = 0, shift: int = 0) -> torch.Tensor:
    """(h * (w + 2 pad),) long: row-major source token of every token of the rolled, padded grid."""
    h, w = grid
    cols = column_sources(w, pad, shift)  # (w')
    return (torch.arange(h)[:, None] * w + cols[None, :]).flatten()  # (h * w')


def wrap_tokens(tokens: torch.Tensor, grid: tuple[int, int], pad: int, shift: int = 0) -> torch.Tensor:
    """(B, h*w, C) packed tokens -> (B, h*(w + 2 pad), C): rolled by `shift` columns, then edge-padded."""
    return tokens[:, token_sources(grid, pad, shift).to(tokens.device)]


def crop_tokens(tokens: torch.Tensor, grid: tuple[int, int], pad: int, shift: int = 0) -> torch.Tensor:
    """Inverse of `wrap_tokens` on the model output: (B, h*(w + 2 pad), C) -> (B, h*w, C), pads dropped."""
    h, w = grid
    inner = rearrange(tokens, "b (h w) c -> b h w c", h=h)[:, :, pad : pad + w]  # (B, h, w, C)
    return rearrange(torch.roll(inner, -shift, dims=2), "b h w c -> b (h w) c")


def wrap_ids(
    grid: tuple[int, int],
    pad: int,
    mode: str = "opposite",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Position ids (h*(w + 2 pad), 3) = [0, row, col] of the padded grid (positions never roll).

    "opposite": a pad column carries the ids of the edge column it copies (DiT360); "continuous": columns
    are numbered -pad .. w + pad - 1 so the wrapped neighbours sit next to the edge.
    """
    if mode not in PAD_IDS:
        raise _invalid("pad_ids", mode, f"must be one of {', '.join(PAD_IDS)}")
    h, w = grid
    cols = column_sources(w, pad) if mode == "opposite" else torch.arange(-pad, w + pad)  # (w')
    rows, cols = torch.meshgrid(torch.arange(h), cols, indexing="ij")  # (h, w') each
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)  # (h, w', 3)
    return rearrange(ids, "h w c -> (h w) c").to(dtype=dtype, device=device)


def roll_offsets(config: PanoramaConfig, num_steps: int, width: int, generator: torch.Generator | None = None):
    """Per-step roll offsets in token columns, in [0, width): zeros, i * roll_step, or uniform random."""
    if config.roll == "off":
        return [0] * num_steps
    if config.roll == "fixed":
        return [(i * config.roll_step) % width for i in range(num_steps)]
    return torch.randint(0, width, (num_steps,), generator=generator).tolist()


# ------------------------------------------------------------------------------------------- conditioning
def _gather_regions(regions: RegionMap, src: torch.Tensor, text_len: int = 0) -> RegionMap:
    """Region index of each new token = that of its source; text tokens (first `text_len`) stay."""
    index = torch.cat([regions.index[:, :text_len], regions.index[:, text_len:][:, src]], dim=1)
    return RegionMap(index=index, coef=regions.coef)


def _packing_masks(
    packing: LayoutPacking, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Recover the hard (B, R, N) box masks a LayoutPacking was built from, its (B, R, N, 2) box coordinates and its
    (B, R) occlusion priority (each None when it has none; refs that cover no token get priority 1, never read)."""
    b, r, n = shape
    masks = torch.zeros(b, r, n, dtype=torch.bool, device=packing.token_index.device)
    real = packing.key_mask[:, 1:]  # (G, L)
    group = packing.slot_groups()  # (M,)
    tokens = packing.token_index[real] % n  # (M,)
    where = (packing.group_batch[group], packing.group_ref[group], tokens)
    masks[where] = True
    priority = None
    if packing.group_weight is not None:
        priority = packing.group_weight.new_ones(b, r)
        priority[packing.group_batch, packing.group_ref] = packing.group_weight
    if packing.coords is None:
        return masks, None, priority
    coords = packing.coords.new_zeros(b, r, n, 2)
    coords[where] = packing.coords[real]
    return masks, coords, priority


def remap_conditioning(cond: Conditioning, grid: tuple[int, int], pad: int, shift: int = 0) -> Conditioning:
    """A `Conditioning` prepared on the real (h, w) grid, gathered onto the rolled, padded grid.

    Every per-token entry of a pad or rolled token is its source token's; feedback pooling (`pool_weights`)
    counts each real token once, so pads get weight 0. Per-ref entries are unchanged.
    """
    h, w = grid
    if tuple(cond.grid) != (h, w):
        raise ValueError(f"conditioning grid {cond.grid} is not the panorama grid {grid}")
    if pad == 0 and shift == 0:
        return cond
    device = cond.alpha.device
    src = token_sources(grid, pad, shift).to(device)  # (N',)
    cols = torch.arange(w + 2 * pad, device=device)
    real = ((cols >= pad) & (cols < pad + w)).repeat(h)  # (N',) True on the interior (non-pad) tokens
    b, r, n = cond.pool_weights.shape
    masks, coords, priority = _packing_masks(cond.packing, (b, r, n))
    masks = masks[..., src]  # (B, R, N')
    coords = coords[:, :, src] if coords is not None else None  # pads hold their source token's place in the box
    text_len = cond.joint_regions.index.shape[1] - n
    return Conditioning(
        alpha=cond.alpha,
        valid=cond.valid,
        foreground=cond.foreground,
        layout_tokens=cond.layout_tokens,
        shared_offsets=cond.shared_offsets,
        pool_weights=cond.pool_weights[..., src] * real.to(cond.pool_weights.dtype),
        image_regions=_gather_regions(cond.image_regions, src),
        text_regions=cond.text_regions,
        joint_regions=_gather_regions(cond.joint_regions, src, text_len),
        packing=build_packing(masks, cond.valid, coords, priority),
        grid=(h, w + 2 * pad),
        ref_patches=cond.ref_patches,
        token_extent=cond.token_extent,
    )


# ---------------------------------------------------------------------------------------------- forward
def wrapped_forward(
    model_fn: ModelFn,
    tokens: torch.Tensor,
    grid: tuple[int, int],
    *,
    pad: int = 1,
    pad_ids: str = "opposite",
    shift: int = 0,
    conditioning: Conditioning | None = None,
    ids: torch.Tensor | None = None,
    padded_conditioning: Conditioning | None = None,
) -> torch.Tensor:
    """Roll, edge-pad, run `model_fn`, crop, unroll. tokens (B, h*w, C_in) -> (B, h*w, C_out).

    `conditioning` is on the real (h, w) grid; `model_fn` receives it remapped to the padded tokens. A sampler that
    calls this at every step passes what does not change instead, built once: the padded grid's `ids` (`wrap_ids`)
    and `padded_conditioning` (`remap_conditioning` for this shift).
    """
    h, w = grid
    if tokens.shape[1] != h * w:
        raise ValueError(f"{tokens.shape[1]} tokens do not fill a {h}x{w} grid")
    if pad > w:
        raise _invalid("pad", pad, f"exceeds the {w} token columns of the panorama")
    if conditioning is not None and padded_conditioning is not None:
        raise ValueError("give conditioning (real grid) or padded_conditioning, not both")
    if ids is None:
        ids = wrap_ids(grid, pad, pad_ids, dtype=tokens.dtype, device=tokens.device)  # (N', 3)
    cond = remap_conditioning(conditioning, grid, pad, shift) if conditioning is not None else padded_conditioning
    out = model_fn(wrap_tokens(tokens, grid, pad, shift), ids, cond)  # (B, N', C_out)
    return crop_tokens(out, grid, pad, shift)
