"""Layout geometry: normalised bboxes -> latent-token indices and masks, DenseSample points, Fourier features.

Boxes are normalised `[x0, y0, x1, y1]` (DESIGN 1). A token (row r, col c) of an (H, W) token grid belongs to a
box when its centre lies in the half-open box; a box too thin to contain any centre along an axis keeps the one
token that contains the box's midpoint, so every non-empty box covers at least one token. Panorama boxes with
x0 > x1 wrap the seam: they cover columns [start, W) and [0, stop).
All functions are batched over leading dims and pure.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange


def token_span(lo: torch.Tensor, hi: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-open index range [start, stop) of the tokens along one axis of length `n` for `lo < hi`.

    Tokens whose centre (i + 0.5) / n lies in [lo, hi); at least one token (the one holding (lo + hi) / 2).
    """
    start = torch.ceil(lo * n - 0.5).clamp(0, n).long()
    stop = torch.ceil(hi * n - 0.5).clamp(0, n).long()
    mid = torch.floor((lo + hi) * 0.5 * n).clamp(0, n - 1).long()
    empty = stop <= start
    return torch.where(empty, mid, start), torch.where(empty, mid + 1, stop)


def _axis_mask(lo: torch.Tensor, hi: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) bool membership along one axis; lo > hi means the range wraps around (panorama seam)."""
    idx = torch.arange(n, device=lo.device)
    wraps = lo > hi
    # A wrapping range [lo, 1) U [0, hi) is computed as the two ordinary spans [lo, 1) and [0, hi).
    s1, e1 = token_span(lo, torch.where(wraps, torch.ones_like(hi), hi), n)
    s2, e2 = token_span(torch.zeros_like(lo), hi, n)
    inside = (idx >= s1[..., None]) & (idx < e1[..., None])
    second = (idx >= s2[..., None]) & (idx < e2[..., None]) & wraps[..., None] & (hi[..., None] > 0)
    return inside | second


def bbox_token_mask(bboxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """bboxes (..., 4) normalised xyxy -> bool mask (..., H*W) over a row-major (H, W) token grid."""
    h, w = grid
    cols = _axis_mask(bboxes[..., 0], bboxes[..., 2], w)  # (..., W)
    rows = _axis_mask(bboxes[..., 1], bboxes[..., 3], h)  # (..., H)
    return rearrange(rows[..., :, None] & cols[..., None, :], "... h w -> ... (h w)")


def box_token_coords(bboxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """bboxes (..., 4) -> (..., H*W, 2): every token centre as (u, v) in the box's own frame.

    (0, 0) is the box's top-left corner and (1, 1) its bottom-right, whatever its size; the centres of the tokens
    the box covers lie in [0, 1). A wrapping box (x0 > x1, width 1 - x0 + x1) measures u across the seam.
    """
    h, w = grid
    x0, y0, x1, y1 = (c[..., None] for c in bboxes.unbind(-1))  # each (..., 1)
    wraps = x0 > x1
    width = box_width(bboxes)[..., None].clamp(min=1e-6)
    xc = (torch.arange(w, dtype=bboxes.dtype, device=bboxes.device) + 0.5) / w  # (W,)
    yc = (torch.arange(h, dtype=bboxes.dtype, device=bboxes.device) + 0.5) / h  # (H,)
    dx = xc - x0  # (..., W)
    dx = torch.where(wraps & (dx < 0), dx + 1.0, dx)  # the part of a wrapping box left of the seam
    u = dx / width  # (..., W)
    v = (yc - y0) / (y1 - y0).clamp(min=1e-6)  # (..., H)
    uu = u[..., None, :].expand(*u.shape[:-1], h, w)
    vv = v[..., :, None].expand(*v.shape[:-1], h, w)
    return rearrange(torch.stack([uu, vv], -1), "... h w c -> ... (h w) c")


def bbox_token_indices(bbox: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """One bbox (4,) -> sorted 1-D LongTensor of the row-major token indices it covers."""
    return bbox_token_mask(bbox, grid).nonzero().squeeze(-1)


def gaussian_token_mask(bboxes: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Soft mask (..., H*W) in [0, 1]: 1 on the hard mask, Gaussian falloff with distance (in tokens) outside.

    Values below exp(-4.5) (beyond 3 sigma) are set to 0 so the mask keeps a compact support.
    """
    h, w = grid
    hard = bbox_token_mask(bboxes, grid)
    ys = (torch.arange(h, dtype=bboxes.dtype, device=bboxes.device) + 0.5) / h
    xs = (torch.arange(w, dtype=bboxes.dtype, device=bboxes.device) + 0.5) / w
    x0, y0, x1, y1 = bboxes.unbind(-1)
    wraps = x0 > x1
    x1u = torch.where(wraps, x1 + 1.0, x1)  # unwrap the seam so the distance is measured around the cylinder
    dx = torch.stack([x0[..., None] - xs, xs - x1u[..., None]], -1).clamp(min=0).amax(-1)
    dx_wrapped = torch.stack([x0[..., None] - (xs + 1.0), (xs + 1.0) - x1u[..., None]], -1).clamp(min=0)
    dx = torch.where(wraps[..., None], torch.minimum(dx, dx_wrapped.amax(-1)), dx) * w  # (..., W) in tokens
    dy = torch.stack([y0[..., None] - ys, ys - y1[..., None]], -1).clamp(min=0).amax(-1) * h  # (..., H)
    dist2 = dy[..., :, None] ** 2 + dx[..., None, :] ** 2  # (..., H, W)
    soft = torch.exp(-dist2 / (2 * sigma**2))
    soft = torch.where(soft < math.exp(-4.5), torch.zeros_like(soft), soft)
    return torch.maximum(rearrange(soft, "... h w -> ... (h w)"), hard.to(soft.dtype))


def dense_sample_points(bboxes: torch.Tensor, k: int) -> torch.Tensor:
    """DenseSample: a K x K grid of points inside each box, corners included. (..., 4) -> (..., K*K, 2) as (x, y).

    Wrapping boxes (x0 > x1) sample across the seam and take x modulo 1.
    """
    x0, y0, x1, y1 = bboxes.unbind(-1)
    x1 = torch.where(x0 > x1, x1 + 1.0, x1)
    steps = torch.linspace(0.0, 1.0, k, dtype=bboxes.dtype, device=bboxes.device)  # (K,)
    xs = x0[..., None] + (x1 - x0)[..., None] * steps  # (..., K)
    ys = y0[..., None] + (y1 - y0)[..., None] * steps  # (..., K)
    xs = torch.remainder(xs, 1.0).where(xs > 1.0, xs)
    grid_x = xs[..., None, :].expand(*xs.shape[:-1], k, k)  # (..., Ky, Kx)
    grid_y = ys[..., :, None].expand(*ys.shape[:-1], k, k)
    return rearrange(torch.stack([grid_x, grid_y], -1), "... ky kx c -> ... (ky kx) c")


def fourier_features(points: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(..., P, 2) coordinates in [0, 1] -> (..., P * 2 * 2 * num_freqs) as sin/cos(2^f * pi * coord), in the
    points' dtype. The angles are computed in float32 at least: at 16 frequencies they reach 2^15 pi = 102944, past
    fp16's range (NaN) and far past bf16's precision (errors of about 200 rad); sin / cos are then exact to cast."""
    work = torch.promote_types(points.dtype, torch.float32)
    freqs = (2.0 ** torch.arange(num_freqs, dtype=work, device=points.device)) * math.pi  # (F,)
    angles = points.to(work)[..., None] * freqs  # (..., P, 2, F)
    feats = torch.stack([angles.sin(), angles.cos()], dim=-1)  # (..., P, 2, F, 2)
    return rearrange(feats, "... p c f s -> ... (p c f s)").to(points.dtype)


def fourier_dim(k: int, num_freqs: int) -> int:
    """Width of `fourier_features(dense_sample_points(., k), num_freqs)`."""
    return k * k * 2 * 2 * num_freqs


def box_width(bboxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (...) normalised width; a wrapping box (x0 > x1) has width 1 - x0 + x1."""
    x0, _, x1, _ = bboxes.unbind(-1)
    return torch.where(x0 > x1, 1.0 - x0 + x1, x1 - x0)


def bbox_area(bboxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) -> (...) normalised area (`box_width` x height)."""
    return box_width(bboxes) * (bboxes[..., 3] - bboxes[..., 1])


def token_extent(bboxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """bboxes (..., 4) -> (..., 2): one image token's width and height in the box's frame (the frame of
    `box_token_coords`, so a wrapping box is measured across the seam)."""
    h, w = grid
    width = box_width(bboxes).clamp(min=1e-6)
    height = (bboxes[..., 3] - bboxes[..., 1]).clamp(min=1e-6)
    return torch.stack([1.0 / (w * width), 1.0 / (h * height)], dim=-1)
