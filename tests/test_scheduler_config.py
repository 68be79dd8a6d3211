"""scheduler/scheduler_config.json bends the "shifted" schedule as diffusers' FluxPipeline reads it (issue 41:
FLUX.1-schnell got FLUX.1-dev's resolution shift through the CLI)."""

from __future__ import annotations

import json
import shutil

import pytest

from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import MppError
from moviepostproduction.model_dir import FlowShift, ModelDir
from moviepostproduction.sampling import get_timesteps
from moviepostproduction.toyworld.tiny import tiny_random_model_dir

from helpers import example_scene


@pytest.fixture
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirs") / "tiny"
    shutil.copytree(tiny_random_model_dir(tmp_path_factory.getbasetemp() / "cache"), root)
    return root


def scheduler(root, **changes):
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def sampled_times(root, steps=4) -> list[float]:
    """Each step's start time, as diffusers' callback_on_step_end gets it (x 1000)."""
    seen = []
    pipe = ComposePipeline.from_model_dir(root)
    pipe(example_scene("a blue square", (64, 64), []), num_inference_steps=steps, output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(round(float(t) / 1000, 5)) or {})  # fmt: skip
    return seen


def test_a_static_shift_of_1_is_the_linear_schedule_of_flux_schnell(tiny):
    scheduler(tiny, use_dynamic_shifting=False, shift=1.0)
    assert ModelDir.at(tiny).sampling_defaults().flow_shift == FlowShift(dynamic=False, shift=1.0)
    assert sampled_times(tiny) == [1.0, 0.75, 0.5, 0.25]


def test_a_static_shift_of_3_bends_it_as_sd3(tiny):
    scheduler(tiny, use_dynamic_shifting=False, shift=3.0)
    expected = get_timesteps(4, schedule="shifted", shift=3.0)[:-1].tolist()
    assert sampled_times(tiny) == [round(t, 5) for t in expected]


def test_flux_dev_dynamic_shifting_is_the_built_in_resolution_shift(tiny):
    scheduler(tiny, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    expected = get_timesteps(4, image_seq_len=16)[:-1].tolist()  # a 64 x 64 shot: 16 tokens
    assert sampled_times(tiny) == [round(t, 5) for t in expected]
    scheduler(tiny, max_shift=3.0)  # a dir naming other anchors is followed
    assert sampled_times(tiny) != [round(t, 5) for t in expected]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"time_shift_type": "linear"}, "time_shift_type must be exponential"),
        ({"shift": float("nan"), "use_dynamic_shifting": False}, "shift"),
        ({"base_image_seq_len": 4096}, "max_image_seq_len: must differ from base_image_seq_len"),
    ],
)
def test_a_schedule_it_cannot_follow_is_one_line(tiny, changes, message):
    scheduler(tiny, **changes)
    with pytest.raises(MppError, match=message) as err:
        sampled_times(tiny)
    assert len(str(err.value).splitlines()) == 1
