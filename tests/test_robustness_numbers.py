"""Numbers at every entry point, and the pre-flight of every command (docs/robustness.md, "Numbers, outputs and
pre-flight"): seeds outside [0, 2**64), NaN / Inf scales and steps above `sampling.MAX_STEPS` are refused by the
Python API and the CLI with one line per bad value, before any work; a size or a model config that cannot fit is
refused before a weight loads. Fuzzed with hypothesis, derandomized (MPP_FUZZ_RANDOM=1 explores new examples)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import MppError
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.model_dir import SamplingDefaults, default_model_dir
from moviepostproduction.noise import make_noise
from moviepostproduction.panorama.pipeline import PanoramaPipeline
from moviepostproduction.resources import LOADS, ModelDims, Request, ResourceError, preflight
from moviepostproduction.sampling import (
    MAX_SEED,
    MAX_STEPS,
    SamplingValueError,
    get_timesteps,
    seed_problem,
    steps_problem,
)
from moviepostproduction.vary.pipeline import VaryPipeline

from helpers import fuzz

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.json"
REF = ROOT / "examples" / "refs" / "red_circle.png"
TOY = default_model_dir()  # the shipped toy model: on disk already, read only here (copied before a mutation)


class Reached(Exception):
    """Raised by a stand-in for the first real work (preparing a scene, loading weights): the checks let it by."""


def reach(*args, **kwargs):
    raise Reached


# What the generators draw: the edges of each range, values past them, NaN and both infinities.
SEEDS = st.integers(-(2**70), 2**70) | st.sampled_from([-1, 0, 1, MAX_SEED - 1, MAX_SEED, -(2**63), 2**63]) | st.none()
STEPS = st.integers(-5, 2 * MAX_STEPS) | st.sampled_from([0, 1, MAX_STEPS, MAX_STEPS + 1, 10**9, 2**70])
SCALES = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, 3.5, -0.5, math.nan, math.inf])


def valid_seed(value) -> bool:
    return value is None or 0 <= value < MAX_SEED


def valid_steps(value) -> bool:
    return 1 <= value <= MAX_STEPS


def scale_ok(value) -> bool:  # guidance, true CFG, reference guidance
    return math.isfinite(value) and value >= 0


def assert_names_exactly(err: Exception, bad: set[str]) -> None:
    """One line per bad argument, each `<field>: <message> (got <value>)`, and no line for a good one."""
    lines = str(err).splitlines()
    assert {line.split(":")[0] for line in lines} == bad, str(err)
    assert len(lines) == len(bad)


# ------------------------------------------------------------------------------------------- the checks
@fuzz(300)
@given(value=st.integers(-(2**80), 2**80) | st.floats() | st.booleans() | st.text(max_size=3) | st.none())
def test_seed_and_steps_checks_accept_exactly_their_ranges(value):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    assert (seed_problem("seed", value) is None) == (value is None or (is_int and 0 <= value < 2**64))
    assert (steps_problem("steps", value) is None) == (is_int and 1 <= value <= MAX_STEPS)


@fuzz(60)
@given(seed=st.integers(0, MAX_SEED - 1))
def test_every_accepted_seed_draws_noise(seed):
    assert make_noise((1, 2), seed=seed).shape == (1, 2)  # torch.Generator.manual_seed takes all of them


def test_absurd_steps_fail_at_once_without_allocating_a_schedule():
    start = time.perf_counter()
    with pytest.raises(SamplingValueError, match=r"^num_steps: must be an integer in \[1, 1000\] \(got 1000000000\)$"):
        get_timesteps(10**9, image_seq_len=256)
    assert time.perf_counter() - start < 0.5
    assert len(get_timesteps(MAX_STEPS, image_seq_len=256)) == MAX_STEPS + 1  # the maximum itself still samples


# ------------------------------------------------------------------------------------------ Python API
def bare(cls, **attrs):
    """A pipeline object without weights: the numeric checks run before anything else of it is used."""
    pipe = cls.__new__(cls)
    pipe.__dict__.update(defaults=SamplingDefaults(), **attrs)
    return pipe


@fuzz(150)
@given(steps=STEPS, seed=SEEDS, guidance=SCALES, true_cfg=SCALES, ref=SCALES, temperature=SCALES)
@example(steps=MAX_STEPS, seed=MAX_SEED - 1, guidance=0.0, true_cfg=1.0, ref=0.0, temperature=1e-9)  # all good
@example(steps=28, seed=None, guidance=3.5, true_cfg=4.0, ref=2.0, temperature=0.8)
def test_pipelines_refuse_bad_numbers_before_any_work(monkeypatch, steps, seed, guidance, true_cfg, ref, temperature):
    """compose, panorama and fill: the same checks, the same lines; only good numbers reach the first real work."""
    monkeypatch.setattr("moviepostproduction.panorama.pipeline.panorama_grid", reach)
    monkeypatch.setattr("moviepostproduction.fill.pipeline.read_fill_inputs", reach)
    numbers = dict(num_inference_steps=steps, seed=seed, guidance_scale=guidance)
    sampling = dict(ref_guidance_scale=ref, noise_temperature=temperature)
    calls = {
        "compose": lambda: bare(
            ComposePipeline, prepare=reach, vae=SimpleNamespace(latent_channels=16), model=torch.nn.Linear(1, 1)
        )([SimpleNamespace(height=64, width=64, refs=[], seed=None)], **numbers, true_cfg_scale=true_cfg, **sampling),
        "panorama": lambda: bare(PanoramaPipeline, vae_scale_factor=8)(
            prompt_embeds=None, pooled_prompt_embeds=None, **numbers, true_cfg_scale=true_cfg, **sampling
        ),
        "fill": lambda: bare(FillPipeline)(None, **numbers, **sampling),
    }
    for name, call in calls.items():
        bad = {f for f, ok in [("num_inference_steps", valid_steps(steps)), ("seed", valid_seed(seed)),
                               ("guidance_scale", scale_ok(guidance))] if not ok}  # fmt: skip
        if name != "fill" and not scale_ok(true_cfg):
            bad.add("true_cfg_scale")
        later = {
            f
            for f, ok in [
                ("ref_guidance_scale", scale_ok(ref)),
                ("noise_temperature", math.isfinite(temperature) and temperature > 0),
            ]
            if not ok
        }  # fmt: skip; the model-dir defaults' check
        with pytest.raises((SamplingValueError, Reached)) as err:
            call()
        if bad:
            assert_names_exactly(err.value, bad)
        elif later:
            assert_names_exactly(err.value, later)
        else:
            assert err.type is Reached, name


@fuzz(100)
@given(steps=STEPS, seed=SEEDS, text_scale=SCALES, image_scale=SCALES)
@example(steps=1, seed=0, text_scale=-2.0, image_scale=0.0)  # all good: a dual-CFG scale may be negative
def test_vary_refuses_bad_numbers_before_any_work(steps, seed, text_scale, image_scale):
    pipe = bare(VaryPipeline, model=SimpleNamespace(config=None), decode=None, _conditioning=reach)
    bad = {f for f, ok in [("num_inference_steps", valid_steps(steps)), ("seed", valid_seed(seed)),
                           ("text_scale", math.isfinite(text_scale)), ("image_scale", math.isfinite(image_scale))]
           if not ok}  # fmt: skip
    with pytest.raises((SamplingValueError, Reached)) as err:
        pipe(text_embeds=None, image_cls=None, image_patches=None, num_inference_steps=steps, seed=seed,
             text_scale=text_scale, image_scale=image_scale)  # fmt: skip
    if bad:
        assert_names_exactly(err.value, bad)
    else:
        assert err.type is Reached


# ------------------------------------------------------------------------------------------------- CLI
def run(args: list[str]):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


def option_text(value) -> str:
    return repr(value) if isinstance(value, float) and math.isnan(value) else str(value)


OPTIONS = {  # each sampling option of `mpp compose`: what is drawn for it, and which of those are good
    "steps": (STEPS, valid_steps),
    "seed": (st.integers(-(2**70), 2**70) | st.sampled_from([0, MAX_SEED - 1, MAX_SEED]), valid_seed),
    "guidance": (SCALES, scale_ok),
    "true_cfg": (SCALES, scale_ok),
    "ref_guidance": (SCALES, scale_ok),
    "noise_temperature": (SCALES, lambda v: math.isfinite(v) and v > 0),
}


@fuzz(120)
@given(options=st.fixed_dictionaries({}, optional={name: drawn for name, (drawn, _) in OPTIONS.items()}))
@example(options={"steps": 1000, "seed": 2**64 - 1, "guidance": 0.0, "true_cfg": 7.5, "noise_temperature": 1e-3})
def test_cli_compose_refuses_bad_numbers_in_one_line_each_before_loading(monkeypatch, tmp_path, options):
    monkeypatch.setattr(ComposePipeline, "from_model_dir", reach)
    args = ["compose", SCENE, "-o", tmp_path / "o.png"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", option_text(value)]
    result = run(args)
    bad = {f"--{name.replace('_', '-')}" for name, value in options.items() if not OPTIONS[name][1](value)}
    if bad:
        assert result.exit_code == 2
        lines = result.output.strip().splitlines()
        assert all(line.startswith("error: --") for line in lines), lines
        assert {line.split(":")[1].strip() for line in lines} == bad
    else:
        assert isinstance(result.exception, Reached), result.output


COMMANDS = {  # each command with its good arguments, and what it would load first
    "panorama": (["panorama", "--caption", "sky", "--height", "32"], PanoramaPipeline),
    "fill": (["fill", "--image", REF, "--mask", REF], FillPipeline),
    "vary": (["vary", "--ref", REF], VaryPipeline),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--steps", "1000000000", "must be an integer in [1, 1000] (got 1000000000)"),
        ("--steps", "0", "must be an integer in [1, 1000] (got 0)"),
        ("--seed", "-1", "must be an integer in [0, 2**64) (got -1)"),
        ("--seed", str(2**64), f"must be an integer in [0, 2**64) (got {2**64})"),
    ],
)
def test_every_sampling_command_refuses_bad_steps_and_seeds(monkeypatch, tmp_path, command, option, value, message):
    args, pipeline = COMMANDS[command]
    monkeypatch.setattr(pipeline, "from_model_dir", reach)
    start = time.perf_counter()
    result = run([*args, "-o", tmp_path / "o.png", option, value])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [f"error: {option}: {message}"]
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["panorama", "--caption", "x", "--guidance", "nan"], "error: --guidance: must be a finite number >= 0"),
        (["panorama", "--caption", "x", "--noise-temperature", "inf"], "error: --noise-temperature: must be a"),
        (["fill", "--image", REF, "--ref-guidance", "-inf"], "error: --ref-guidance: must be a finite number >= 0"),
        (["vary", "--ref", REF, "--text-scale", "nan"], "error: --text-scale: must be a finite number (got nan)"),
        (["vary", "--ref", REF, "--image-scale", "inf"], "error: --image-scale: must be a finite number (got inf)"),
        (["eval", "--steps", "1001"], "error: --steps: must be an integer in [1, 1000] (got 1001)"),
        (["eval", "--n", "1000000000"], "error: --n: must be at most 100000 (got 1000000000)"),
        (["eval", "--seeds", "5000"], "error: --seeds: must be at most 1000 (got 5000)"),
        (["eval", "--ref-guidance", "nan"], "error: --ref-guidance: must be a finite number >= 0 (got nan)"),
    ],
)
def test_cli_refuses_non_finite_scales_and_absurd_counts(tmp_path, args, line):
    result = run([*args, *(["-o", tmp_path / "o.png"] if args[0] != "eval" else [])])
    (got,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and got.startswith(line), got


def test_steps_help_names_the_maximum():
    from moviepostproduction.cli.common import STEPS_HELP  # every --steps shows it

    assert f"1 to {MAX_STEPS}." in STEPS_HELP


# -------------------------------------------------------------------------------------------- pre-flight
def test_panorama_caption_path_has_a_preflight(monkeypatch, tmp_path):
    monkeypatch.setattr(PanoramaPipeline, "from_model_dir", reach)
    result = run(["panorama", "--caption", "sky", "--height", "100000", "-o", tmp_path / "p.png"])
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2
    assert line.startswith("error: panorama at 100000x200000 (height x width) on cpu needs at least "), line


@pytest.fixture(scope="module")
def toy_copy(tmp_path_factory) -> Path:
    return Path(shutil.copytree(TOY, tmp_path_factory.mktemp("toy") / "toy"))


def mutated(toy: Path, tmp: Path, file: str, **changes) -> Path:
    """A copy of the toy model dir whose `file` has `changes`; weights are linked, not copied."""
    out = tmp / "dir"
    shutil.copytree(toy, out, copy_function=os.link)
    path = out / file
    data = json.loads(path.read_text())
    path.unlink()  # a hard link: write a new file, never through the link into the toy copy
    path.write_text(json.dumps({**data, **changes}))
    return out


ABSURD = [  # a config naming a size nothing can hold; the file and what the bound says
    ("transformer/config.json", {"num_layers": 10**9}, "the weights alone need", "transformer/config.json"),
    ("transformer/config.json", {"num_attention_heads": 10**9}, "the weights alone need", "transformer/config.json"),
    ("text_encoder_2/config.json", {"num_layers": 10**9}, "the weights alone need", "text_encoder_2/config.json"),
    ("text_encoder/config.json", {"vocab_size": 10**12}, "the weights alone need", "text_encoder/config.json"),
    ("vae/config.json", {"block_out_channels": [10**9, 64]}, "the weights alone need", "vae/config.json"),
    ("model_index.json", {"max_text_tokens": 10**9}, "the weights and 1000000000 text tokens need", ""),
]


@pytest.mark.parametrize(("file", "changes", "needle", "source"), ABSURD, ids=lambda v: str(v)[:30])
def test_absurd_model_configs_are_refused_before_anything_is_built(
    monkeypatch, tmp_path, toy_copy, file, changes, needle, source
):
    model = mutated(toy_copy, tmp_path, file, **changes)
    monkeypatch.setattr(ComposePipeline, "from_model_dir", reach)
    monkeypatch.setattr(PanoramaPipeline, "from_model_dir", reach)
    for args in (["compose", SCENE], ["panorama", "--caption", "sky"]):
        start = time.perf_counter()
        result = run([*args, "-o", tmp_path / "o.png", "--model", model])
        (line,) = result.output.strip().splitlines()
        assert result.exit_code == 2 and needle in line and source in line, line
        assert time.perf_counter() - start < 5


def test_vary_preflight_reads_nanodit_and_skips_the_flux_transformer(monkeypatch, tmp_path, toy_copy):
    monkeypatch.setattr(VaryPipeline, "from_model_dir", reach)
    deep = mutated(toy_copy, tmp_path, "nanodit/config.json", depth=10**9)
    result = run(["vary", "--ref", REF, "-o", tmp_path / "v.png", "--model", deep])
    assert result.exit_code == 2 and "(the sizes in nanodit/config.json)" in result.output
    flux_only = mutated(toy_copy, tmp_path / "b", "transformer/config.json", num_layers=10**9)
    assert isinstance(run(["vary", "--ref", REF, "-o", tmp_path / "v.png", "--model", flux_only]).exception, Reached)


def test_fill_and_eval_have_a_preflight(monkeypatch, tmp_path, toy_copy):
    model = mutated(toy_copy, tmp_path, "transformer/config.json", num_layers=10**9)
    monkeypatch.setattr(FillPipeline, "from_model_dir", reach)
    monkeypatch.setattr(ComposePipeline, "from_model_dir", reach)
    fill = run(["fill", "--image", REF, "--mask", REF, "-o", tmp_path / "f.png", "--model", model])
    evaluated = run(["eval", "--n", "1", "--model", model])
    for result, what in ((fill, "fill at 64x64"), (evaluated, "eval at 128x128")):
        (line,) = result.output.strip().splitlines()
        assert result.exit_code == 2 and line.startswith(f"error: {what} (height x width)") and "weights alone" in line


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
SIZE_KEYS = ["num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "hidden_size", "d_model",
             "d_ff", "intermediate_size", "vocab_size", "num_hidden_layers", "mlp_ratio", "block_out_channels",
             "layers_per_block", "max_text_tokens", "depth", "sample_size", "patch_size"]  # fmt: skip
CONFIGS = ["transformer/config.json", "text_encoder/config.json", "text_encoder_2/config.json", "vae/config.json",
           "image_encoders/dino/config.json", "model_index.json", "nanodit/config.json"]  # fmt: skip


@fuzz(120)
@given(
    file=st.sampled_from(CONFIGS),
    changes=st.dictionaries(st.sampled_from(SIZE_KEYS), JSON | st.integers(1, 10**12), min_size=1, max_size=3),
    raw=st.none() | st.sampled_from(["", "{", "[]", "null", "[" * 5000, "\x00"]),
)
def test_model_dims_never_fail_and_bound_what_a_config_builds(tmp_path_factory, toy_copy, file, changes, raw):
    """Any value in any config: ModelDims reads what it can (the loaders report the rest), never raises, and a
    config whose sizes cannot fit in 64 GiB is refused by the pre-flight before anything is built."""
    tmp = tmp_path_factory.mktemp("dims")
    model = mutated(toy_copy, tmp, file, **changes)
    if raw is not None:
        (model / file).write_text(raw)
    for transformer, loads in (("transformer", LOADS["compose"]), ("nanodit", LOADS["vary"])):
        dims = ModelDims.from_model_dir(model, components=loads, transformer=transformer)
        assert all(isinstance(v, int) and v >= 0 for v in (dims.hidden, dims.text_tokens, dims.weights_bytes))
        side = dims.sample_pixels if transformer == "nanodit" else 128
        request = Request("compose", side, side, refs=3)
        try:
            preflight(request, dims, capacity=64 * 1024**3)
        except ResourceError as err:
            assert len(str(err).splitlines()) == 1
        else:  # accepted: every size the bound reads is one a machine can hold
            assert dims.weights_bytes <= 64 * 1024**3 and dims.text_tokens * dims.hidden < 64 * 1024**3


def test_the_shipped_model_dirs_pass_their_own_preflight():
    """The bound stays a lower bound: the config estimate never exceeds the real weights of the shipped model."""
    for transformer, loads in (("transformer", LOADS["compose"]), ("nanodit", LOADS["vary"])):
        dims = ModelDims.from_model_dir(TOY, components=loads, transformer=transformer)
        assert dims.weights_from == ""  # the weight files dominate, as they do for any consistent dir
    assert ModelDims.from_model_dir(TOY, torch.float32).text_tokens == 64  # its model_index.json max_text_tokens


def test_every_from_model_dir_refuses_absurd_configs_before_building_anything(tmp_path, toy_copy):
    """The Python API (and the ComfyUI loader, which calls it): `from_model_dir` refuses a dir naming sizes nothing
    can hold in one line naming the config, in well under the time building it would take. The model dir's own
    checks (engineer C's: each size bounded, the config's parameter count against its weights) or the weights
    pre-flight (`resources.preflight_weights`, the first thing each `from_model_dir` does after them) say it."""
    # Each size within the model dir checks' bounds (512 layers, 65536 wide), together about 1 TB of weights.
    flux = mutated(toy_copy, tmp_path / "flux", "transformer/config.json", num_layers=512, num_attention_heads=512)
    deep = mutated(toy_copy, tmp_path / "deep", "nanodit/config.json", depth=10**9)
    with pytest.raises(MppError):
        ComposePipeline.from_model_dir(flux)  # the first call imports diffusers (seconds): not timed
    for load, model, config in [
        (ComposePipeline.from_model_dir, flux, "transformer/config.json"),
        (PanoramaPipeline.from_model_dir, flux, "transformer/config.json"),
        (FillPipeline.from_model_dir, flux, "transformer/config.json"),
        (VaryPipeline.from_model_dir, deep, "nanodit/config.json"),
    ]:
        start = time.perf_counter()
        with pytest.raises(MppError) as err:
            load(model)
        assert config in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)
        assert time.perf_counter() - start < 2


@pytest.mark.parametrize("device", ["gpu", "cuda:99", "cpu:x"])
def test_an_unknown_device_is_one_line(tmp_path, device):
    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    result = run(["compose", SCENE, "-o", tmp_path / "o.png", "--device", device])
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and line.startswith("error: --device: "), line


def test_train_checks_its_output_folders_and_the_weights_before_it_starts(monkeypatch, tmp_path, toy_copy):
    monkeypatch.setattr("moviepostproduction.training.recipe.run_recipe", reach)
    (tmp_path / "afile").write_text("kept")
    data = tmp_path / "data"  # a data set as far as the whole-recipe check reads one (recipe_preflight.py)
    (data / "train").mkdir(parents=True)
    (data / "manifest.json").write_text("{}")
    deep = mutated(toy_copy, tmp_path / "deep", "transformer/config.json", num_layers=10**9)
    for fields, line in [
        ({"model": str(TOY), "out": str(tmp_path / "afile")}, "out {}: is an existing file; give a folder name"),
        ({"model": str(TOY), "out": str(tmp_path / "run"), "export": str(tmp_path / "afile")}, "export: is an exist"),
        ({"model": str(deep), "out": str(tmp_path / "run")}, "num_layers must be an integer in [0, 512]"),
    ]:
        recipe = tmp_path / "r.json"
        recipe.write_text(json.dumps({"data": str(data), **fields}))
        result = run(["train", recipe])
        (got,) = result.output.strip().splitlines()
        expected = line.format(tmp_path / "afile")
        assert result.exit_code == 2 and expected in got, got
    assert not (tmp_path / "run").exists() and (tmp_path / "afile").read_text() == "kept"


def test_the_python_api_bounds_each_request_before_any_work(monkeypatch):
    """A pipeline loaded from a model dir refuses a request that cannot fit (here: a 1M x 1M shot, a 160000 px high
    panorama) in one line before drawing noise or running the model, as the CLI does."""
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.errors import MppError
    from moviepostproduction.panorama.pipeline import PanoramaPipeline
    from moviepostproduction.scene import scene_from_dict

    compose = ComposePipeline.from_model_dir(TOY)
    monkeypatch.setattr(compose, "prepare", lambda *a, **k: pytest.fail("prepared a scene that cannot fit"))
    huge = scene_from_dict({"caption": "x", "width": 2**20, "height": 2**20, "refs": []}, base_dir=ROOT)
    with pytest.raises(MppError, match=r"^compose at 1048576x1048576 .* needs at least"):
        compose(huge, num_inference_steps=2)
    panorama = PanoramaPipeline.from_model_dir(TOY)
    with pytest.raises(MppError, match=r"^panorama at 160000x320000 .* needs at least"):
        panorama(prompt_embeds=torch.zeros(1, 4, 64), pooled_prompt_embeds=torch.zeros(1, 64), height=160000)
