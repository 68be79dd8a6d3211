"""Metrics (DESIGN 8): every metric against a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from moviepostproduction.toyworld.metrics import (
    bbox_iou,
    centre_error,
    classify_shape,
    classify_sprite,
    colour_match,
    identity_match,
    leakage,
    locate_sprite,
    seam_ratio,
    shape_descriptor,
)
from moviepostproduction.toyworld.regions import convex_hull_area, holes, label_components
from moviepostproduction.toyworld.sprites import render_sprite
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene


def test_bbox_iou_known_answers():
    box = [0.1, 0.2, 0.5, 0.6]
    assert bbox_iou(box, box) == pytest.approx(1.0)
    assert bbox_iou(box, [0.6, 0.2, 0.9, 0.6]) == 0.0
    # 0.25^2 overlap of two 0.5^2 boxes: 0.0625 / (0.25 + 0.25 - 0.0625) = 1/7
    assert bbox_iou([0, 0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(1 / 7)
    batched = bbox_iou(np.array([[box], [[0, 0, 1, 1]]]), np.array([box, [0, 0, 0.5, 0.5], [0.6, 0, 1, 1]]))
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched[0], [1.0, 0.4 * 0.3 / (0.16 + 0.25 - 0.12), 0.0])
    np.testing.assert_allclose(batched[1], [0.16, 0.25, 0.4])


def test_bbox_iou_and_centre_error_across_the_seam():
    wrap = [0.9, 0.0, 0.1, 1.0]  # x0 > x1: covers [0.9, 1) and [0, 0.1), width 0.2
    assert bbox_iou(wrap, wrap) == pytest.approx(1.0)
    assert bbox_iou(wrap, [0.95, 0.0, 0.05, 1.0]) == pytest.approx(0.5)
    assert bbox_iou(wrap, [0.0, 0.0, 0.1, 1.0]) == pytest.approx(0.5)
    assert bbox_iou(wrap, [0.3, 0.0, 0.6, 1.0]) == 0.0
    assert centre_error([0.9, 0, 1.0, 1], [0.0, 0, 0.1, 1]) == pytest.approx(0.9)
    assert centre_error([0.9, 0, 1.0, 1], [0.0, 0, 0.1, 1], periodic=True) == pytest.approx(0.1)
    assert centre_error(wrap, [0.95, 0.2, 0.05, 0.8], periodic=True) == pytest.approx(0.0, abs=1e-12)


def test_centre_error_known_answer():
    assert centre_error([0, 0, 0.2, 0.2], [0.3, 0.4, 0.5, 0.6]) == pytest.approx(0.5)  # (0.3, 0.4) apart
    np.testing.assert_allclose(centre_error([[0, 0, 1, 1]] * 2, [[0, 0, 1, 1], [0.5, 0, 1.5, 1]]), [0.0, 0.5])


def test_leakage_known_answers():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert leakage(a, a, [[0.25, 0.25, 0.75, 0.75]]) == 0.0
    b = a.copy()
    b[8:24, 8:24] = 0  # changed only inside the box
    assert leakage(a, b, [[0.25, 0.25, 0.75, 0.75]]) == 0.0
    assert leakage(a, b, np.zeros((0, 4))) > 0.0
    zeros, ones = np.zeros((10, 10)), np.ones((10, 10))
    assert leakage(zeros, ones * 0.1, [[0.0, 0.0, 0.5, 1.0]]) == pytest.approx(0.1)
    white = np.full((4, 4), 255, dtype=np.uint8)  # uint8 compares in [0, 1]
    assert leakage(np.zeros((4, 4), np.uint8), white, [[0.5, 0.0, 0.5, 1.0]]) == pytest.approx(1.0)
    assert leakage(zeros, ones, [[0.95, 0.0, 0.05, 1.0]]) == pytest.approx(1.0)  # wrapping box, narrow
    assert np.isnan(leakage(zeros, ones, [[0.0, 0.0, 1.0, 1.0]]))


def _periodic_image(rng, height=256, width=96):
    x = np.arange(width) / width
    img = np.zeros((height, width))
    for k in (1, 2, 3, 5):  # integer frequencies, a random phase per row: stationary along x, seam included
        img += np.sin(2 * np.pi * (k * x[None, :] + rng.random((height, 1)))) / k
    return img


def test_seam_ratio_periodic_vs_cut():
    rng = np.random.default_rng(0)
    periodic = _periodic_image(rng)
    assert seam_ratio(periodic) == pytest.approx(1.0, abs=0.15)
    assert seam_ratio(periodic, rotated=True) == pytest.approx(1.0, abs=0.2)
    halves = np.concatenate([_periodic_image(rng)[:, :48], _periodic_image(rng)[:, 48:]], axis=1)
    assert seam_ratio(halves) > 5.0 and seam_ratio(halves, rotated=True) > 5.0
    ramp = np.tile(np.arange(16.0), (4, 1))  # |col 0 - col 15| = 15, every step 1
    assert seam_ratio(ramp) == pytest.approx(15.0) and seam_ratio(ramp, rotated=True) == pytest.approx(15.0)
    assert seam_ratio(np.zeros((4, 8, 3))) == 1.0


def test_regions_known_answers():
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    mask[3, 3] = False
    labels, count = label_components(mask)
    assert count == 1 and labels[1, 1] == 1
    assert holes(mask).sum() == 1 and holes(mask)[3, 3]
    assert convex_hull_area(mask) == pytest.approx(25.0)
    diag = np.eye(4, dtype=bool)
    assert label_components(diag, connectivity=8)[1] == 1 and label_components(diag, connectivity=4)[1] == 4


def _sprite_mask(shape, size=64):
    sprite = render_sprite(
        shape, "red", "solid", canvas_hw=(size, size), centre=(32, 32), radius=26, angle_deg=0.0, phase=(0, 0)
    )
    return sprite.full_mask((size, size))


def test_shape_descriptor_known_values():
    square = np.zeros((40, 40), dtype=bool)
    square[10:30, 10:30] = True
    hole, solidity, elongation = shape_descriptor(square)[:3]
    assert hole == 0.0 and solidity == pytest.approx(1.0) and elongation == pytest.approx(1.0)
    hole, _, _ = shape_descriptor(_sprite_mask("ring"))[:3]
    assert hole == pytest.approx(0.55**2, abs=0.03)  # inner radius 0.55
    assert shape_descriptor(_sprite_mask("diamond"))[2] == pytest.approx(0.62, abs=0.03)
    assert np.isnan(shape_descriptor(np.zeros((8, 8), dtype=bool))).all()
    assert classify_shape(np.zeros((8, 8), dtype=bool)) is None


def test_shape_and_colour_classifier_on_generated_sprites():
    refs = [r for i in range(40) for r in generate_scene(i, 21).refs][:80]
    correct = [classify_sprite(r.image) == (r.colour, r.shape) for r in refs]
    assert np.mean(correct) >= 0.97
    masks = [classify_shape(r.mask) == r.shape for r in refs]
    assert np.mean(masks) >= 0.97


def test_locate_sprite_recovers_the_foreground_box():
    checked = 0
    for i in range(12):
        scene = generate_scene(i, 5)
        fg = scene.refs[0]
        if fg.visible < 0.99:
            continue
        checked += 1
        assert bbox_iou(locate_sprite(scene.image, fg.image), fg.bbox) > 0.8
    assert checked >= 8
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert locate_sprite(generate_scene(0, 5).image, blank) is None


def test_colour_and_identity_match_on_scene_crops():
    scene = next(s for s in (generate_scene(i, 8) for i in range(20)) if len(s.refs) >= 2)
    fg, other = scene.refs[0], scene.refs[1]
    size = scene.image.shape[0]
    x0, y0, x1, y1 = (np.asarray(fg.bbox) * size).round().astype(int)
    crop = scene.image[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2]
    assert colour_match(fg.image, crop) and identity_match(fg.image, crop)
    assert not colour_match(other.image, crop) and not identity_match(other.image, crop)


def test_works_at_64_pixels():
    scene = generate_scene(3, 0, ToyWorldConfig(size=64, ref_size=32))
    assert bbox_iou(locate_sprite(scene.image, scene.refs[0].image), scene.refs[0].bbox) > 0.7
