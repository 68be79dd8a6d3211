"""layout.py: token indices against a brute-force reference, masks, DenseSample and Fourier features."""

from __future__ import annotations

import math

import pytest
import torch

from moviepostproduction.layout import (
    bbox_area,
    bbox_token_indices,
    bbox_token_mask,
    dense_sample_points,
    fourier_dim,
    fourier_features,
    gaussian_token_mask,
)


def brute_force_indices(bbox: list[float], h: int, w: int) -> list[int]:
    """Reference: tokens whose centre lies in the half-open box; if none along an axis, the midpoint's token."""
    x0, y0, x1, y1 = bbox

    def axis(lo: float, hi: float, n: int) -> list[int]:
        spans = [(lo, 1.0), (0.0, hi)] if lo > hi else [(lo, hi)]
        picked: set[int] = set()
        for a, b in spans:
            inside = [i for i in range(n) if a * n <= i + 0.5 < b * n]
            if not inside and b > a:
                inside = [min(max(math.floor((a + b) / 2 * n), 0), n - 1)]
            picked.update(inside)
        return sorted(picked)

    return sorted(r * w + c for r in axis(y0, y1, h) for c in axis(x0, x1, w))


@pytest.mark.parametrize("grid", [(8, 8), (5, 13), (16, 32)])
def test_token_indices_match_brute_force_on_random_boxes(grid):
    h, w = grid
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        a, b = sorted(torch.rand(2, generator=gen).tolist())
        c, d = sorted(torch.rand(2, generator=gen).tolist())
        if b - a < 1e-3 or d - c < 1e-3:
            continue
        box = [a, c, b, d]
        got = bbox_token_indices(torch.tensor(box, dtype=torch.float64), grid).tolist()
        assert got == brute_force_indices(box, h, w), box


def test_thin_and_edge_boxes_cover_at_least_one_token():
    boxes = torch.tensor(
        [[0.50, 0.50, 0.501, 0.501], [0.0, 0.0, 0.01, 0.01], [0.99, 0.99, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    )
    masks = bbox_token_mask(boxes, (8, 8))
    assert masks.shape == (4, 64)
    assert (masks.sum(-1) >= 1).all()
    assert masks[3].all()
    assert bbox_token_indices(boxes[1], (8, 8)).tolist() == [0]
    assert bbox_token_indices(boxes[2], (8, 8)).tolist() == [63]


def test_wrapping_box_covers_both_sides_of_the_seam():
    box = torch.tensor([0.8, 0.0, 0.2, 1.0], dtype=torch.float64)
    cols = sorted({i % 10 for i in bbox_token_indices(box, (4, 10)).tolist()})
    assert cols == [0, 1, 8, 9]
    assert cols == sorted({i % 10 for i in brute_force_indices(box.tolist(), 4, 10)})


def test_masks_are_batched_over_leading_dims():
    boxes = torch.rand(3, 5, 4)
    boxes[..., 2:] = boxes[..., :2] + 0.3
    boxes = boxes.clamp(max=1.0)
    batched = bbox_token_mask(boxes, (6, 7))
    assert batched.shape == (3, 5, 42)
    assert torch.equal(batched[2, 4], bbox_token_mask(boxes[2, 4], (6, 7)))


def test_soft_mask_is_one_inside_and_decays_outside():
    box = torch.tensor([0.25, 0.25, 0.5, 0.5])
    hard = bbox_token_mask(box, (16, 16))
    soft = gaussian_token_mask(box, (16, 16), sigma=1.0)
    assert torch.equal(soft[hard], torch.ones(int(hard.sum())))
    assert ((soft >= 0) & (soft <= 1)).all()
    grid = soft.view(16, 16)
    row = grid[5]  # a row through the box: columns 4..7 inside
    assert row[8] == pytest.approx(math.exp(-0.5 * 0.5**2), rel=1e-5)  # centre 8.5 is 0.5 tokens past x1=8
    assert row[8] > row[9] > row[10] > 0
    assert grid[15, 15] == 0  # beyond 3 sigma the support is cut


def test_dense_sample_includes_corners_and_stays_inside():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9]])
    pts = dense_sample_points(boxes, 4)
    assert pts.shape == (1, 16, 2)
    corners = {tuple(round(v, 6) for v in p) for p in pts[0].tolist()}
    assert {(0.1, 0.2), (0.5, 0.2), (0.1, 0.9), (0.5, 0.9)} <= corners
    assert (pts[..., 0] >= 0.1 - 1e-6).all() and (pts[..., 0] <= 0.5 + 1e-6).all()


def test_fourier_features_are_deterministic_with_known_values():
    pts = torch.rand(2, 3, 16, 2)
    a, b = fourier_features(pts, 8), fourier_features(pts.clone(), 8)
    assert torch.equal(a, b)
    assert a.shape == (2, 3, fourier_dim(4, 8)) == (2, 3, 16 * 2 * 2 * 8)
    zero = fourier_features(torch.zeros(1, 1, 2), 3)
    assert zero.tolist() == [[0.0, 1.0] * 6]  # sin 0, cos 0 for every frequency and coordinate
    half = fourier_features(torch.tensor([[0.5, 0.0]]), 1)
    assert half[:2].tolist() == pytest.approx([1.0, math.cos(math.pi / 2)], abs=1e-6)


def test_area_handles_wrapping_boxes():
    areas = bbox_area(torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.9, 0.0, 0.1, 1.0]]))
    assert areas.tolist() == pytest.approx([0.25, 0.2])


def test_fourier_features_stay_finite_and_exact_in_half_precision():
    """At FLUX.1-dev's 16 frequencies the angles reach 2^15 pi: computed in fp16 they overflow (NaN), in bf16 they
    are noise. The features are computed in float32 and cast, so each dtype gets the fp32 values rounded once."""
    points = torch.rand(3, 16, 2, generator=torch.Generator().manual_seed(0))
    exact = fourier_features(points, 16)
    for dtype in (torch.float16, torch.bfloat16):
        half = fourier_features(points.to(dtype), 16)
        assert half.dtype == dtype and bool(torch.isfinite(half).all())
        torch.testing.assert_close(half.float(), fourier_features(points.to(dtype).float(), 16).to(dtype).float())
    assert exact.dtype == torch.float32
