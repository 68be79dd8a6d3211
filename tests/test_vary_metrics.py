"""Validation metrics of `mpp vary` (evaluation/vary_metrics.py), each against a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from moviepostproduction.toyworld.sprites import COLOURS
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.vary_metrics import colour_presence, feature_swap, reconstruction_error, text_only


def grey(values: list[float], size: int = 4) -> np.ndarray:
    """(B, size, size, 3) float images, image i filled with values[i]."""
    return np.stack([np.full((size, size, 3), v) for v in values])


def test_reconstruction_error_is_per_sample_mse_in_unit_range():
    assert reconstruction_error(grey([0.2, 0.5]), grey([0.2, 0.5])).tolist() == [0.0, 0.0]
    assert reconstruction_error(grey([0.2, 0.5]), grey([0.3, 0.1])) == pytest.approx([0.01, 0.16])
    white, black = np.full((1, 2, 2, 3), 255, np.uint8), np.zeros((1, 2, 2, 3), np.uint8)
    assert reconstruction_error(white, black).tolist() == [1.0]  # uint8 is read in [0, 1] units
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_error(grey([0.0]), grey([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"must be a \(B, H, W, C\) batch"):
        reconstruction_error(np.zeros((4, 4, 3)), np.zeros((4, 4, 3)))


def test_feature_swap_counts_which_source_the_output_follows():
    features, caption = grey([0.0, 0.0, 0.0, 0.0]), grey([1.0, 1.0, 1.0, 1.0])
    same = feature_swap(features, features, caption)
    assert (same.to_features, same.to_caption, same.follows_features) == (0.0, 1.0, 1.0)
    assert feature_swap(caption, features, caption).follows_features == 0.0
    mixed = grey([0.1, 0.9, 0.5, 0.2])  # closer to features, caption, a tie (counts 1/2), features
    assert feature_swap(mixed, features, caption).follows_features == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_text_only_gain_is_the_error_the_image_features_remove():
    target = grey([0.5, 0.5])
    score = text_only(grey([0.0, 1.0]), grey([0.4, 0.5]), target)
    assert score.error_text_only == pytest.approx(0.25)
    assert score.error_with_image == pytest.approx(0.005)
    assert score.image_gain == pytest.approx(0.245)


def test_colour_presence_finds_the_foreground_sprite_of_a_toy_scene():
    scenes = [generate_scene(i, 0, ToyWorldConfig(size=64)) for i in range(4)]
    images = np.stack([s.image for s in scenes])
    assert colour_presence(images, [s.refs[0].colour for s in scenes]) == 1.0
    absent = [next(c for c in COLOURS if c not in {r.colour for r in s.refs}) for s in scenes]
    assert colour_presence(images, absent) == 0.0
    assert colour_presence(images.astype(np.float64) / 255, [s.refs[0].colour for s in scenes]) == 1.0
    with pytest.raises(ValueError, match="expected 3 images"):
        colour_presence(images, ["red"] * 3)
