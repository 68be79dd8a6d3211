"""Everything that depends only on the scene is built once per generation, not once per step (issue 39): over a
28-step run the adapter's conditioning, its packed Assemble-Attn rows and panorama's padded conditioning are each
built once (per guidance case that needs them), whatever the number of steps."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

import moviepostproduction.compose.flux as flux
import moviepostproduction.panorama.pipeline as panorama_pipeline
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.encoders import TextEncoder
from moviepostproduction.model_dir import default_model_dir
from moviepostproduction.panorama.pipeline import compose_panorama

from helpers import example_scene

STEPS = 28


@pytest.fixture
def counts(monkeypatch):
    """Counts of the per-scene builds, wherever the samplers would call them."""
    seen = {"conditioning": 0, "rows": 0, "padded": 0, "text": 0, "conditioned_flux": 0}

    def counting(key, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            seen[key] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(CompositionAdapter, "prepare", counting("conditioning", CompositionAdapter.prepare))
    monkeypatch.setattr(flux, "pack_rows", counting("rows", flux.pack_rows))
    monkeypatch.setattr(
        panorama_pipeline, "remap_conditioning", counting("padded", panorama_pipeline.remap_conditioning)
    )
    monkeypatch.setattr(TextEncoder, "encode_spans", counting("text", TextEncoder.encode_spans))
    monkeypatch.setattr(flux.ConditionedFlux, "__init__", counting("conditioned_flux", flux.ConditionedFlux.__init__))
    return seen


def scene(**extra):
    wrapping = extra.get("panorama", False)  # a panorama's fg box wraps the seam
    circle = (0.8, 0.3, 0.2, 0.8) if wrapping else (0.1, 0.3, 0.4, 0.8)
    refs = [
        ("refs/red_circle.png", circle, "fg", "a red striped circle"),
        ("refs/blue_square.png", (0.3, 0.2, 0.6, 0.6), "mg", "a blue square"),
    ]
    caption = "a red striped circle in front of a blue square"
    return example_scene(caption, (128, 64 if wrapping else 128), refs, **extra)


@pytest.fixture(scope="module")
def pipe():
    return ComposePipeline.from_model_dir(default_model_dir())


def test_compose_builds_the_scene_once_over_28_steps(pipe, counts):
    assert pipe.model.adapter.assemble  # the shipped model has layout blocks (and reference guidance: a second case)
    pipe(scene(), num_inference_steps=STEPS, seed=0, output_type="latent")
    assert counts == {"conditioning": 1, "rows": 1, "padded": 0, "text": 1, "conditioned_flux": 0}


def test_compose_with_true_cfg_builds_each_case_once(pipe, counts):
    pipe(scene(), num_inference_steps=STEPS, seed=0, output_type="latent", true_cfg_scale=2.0, negative_prompt="blur")
    assert (counts["conditioning"], counts["rows"], counts["text"]) == (2, 2, 1)  # scene and negative: once each


def test_panorama_builds_its_padded_conditioning_once_over_28_steps(pipe, counts):
    compose_panorama(pipe, scene(panorama=True), seed=0, num_inference_steps=STEPS, output_type="latent")
    assert counts == {"conditioning": 1, "rows": 1, "padded": 1, "text": 1, "conditioned_flux": 0}


def test_fill_with_refs_builds_the_scene_and_the_model_once(counts, tmp_path):
    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.toyworld.toy_model import tiny_random_fill_dir

    fill = FillPipeline.from_model_dir(tiny_random_fill_dir(tmp_path), refs=True)
    counts.update(dict.fromkeys(counts, 0))
    plate = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    square = ("refs/blue_square.png", (0.25, 0.25, 0.75, 0.75), "fg", "a blue square")
    fill(plate, scene=example_scene("a blue square", (64, 64), [square]), num_inference_steps=STEPS, seed=0)
    assert counts == {"conditioning": 1, "rows": counts["rows"], "padded": 0, "text": 1, "conditioned_flux": 0}
    assert counts["rows"] <= 1  # 1 where the tiny adapter has a layout block
