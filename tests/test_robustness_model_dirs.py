"""A broken model dir is one line naming the file (and the key and value where there is one), before any weights
load: every mutation below of a tiny random dir, through `ComposePipeline.from_model_dir` and `mpp compose --model`
(exit 2, no traceback), plus hypothesis-generated values for the keys of every config file (docs/robustness.md,
"Model dirs and recipes")."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moviepostproduction.compose.pipeline import ComposePipeline
from moviepostproduction.errors import MppError, shown
from moviepostproduction.model_dir import SHIPPED_MODEL_DIR
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.vary.nanodit_io import load_nanodit_dir

from helpers import fuzz, invoke_cli

FUZZ = fuzz(60)
NAN, INF = float("nan"), float("inf")
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
HUGE_INT = "1" * 5000  # json.loads: ValueError (Python's 4300-digit limit)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_random_model_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


def clone(source: Path, target: Path) -> Path:
    """A copy of a model dir made of hard links (fast); every mutation replaces a file, never writes through one."""
    return Path(shutil.copytree(source, target, copy_function=os.link))


def replace_file(path: Path, data: str | bytes | None) -> None:
    path.unlink(missing_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    elif data is not None:
        path.write_bytes(data)


def set_key(file: str, key: str, value: object) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = json.loads((root / file).read_text())
        replace_file(root / file, json.dumps({**data, key: value}))

    return mutate


def set_keys(file: str, **values: object) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        data = json.loads((root / file).read_text())
        replace_file(root / file, json.dumps({**data, **values}))

    return mutate


def write(file: str, data: str | bytes | None) -> Callable[[Path], None]:
    return lambda root: replace_file(root / file, data)


def fifo(file: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / file).unlink()
        os.mkfifo(root / file)  # reading it would block forever

    return mutate


def folder(file: str) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        (root / file).unlink()
        (root / file).mkdir()

    return mutate


@dataclass(frozen=True)
class Case:
    """One mutation: the message must name `names` (a file), and `key` and `value` when given."""

    mutate: Callable[[Path], None]
    names: str
    early: bool = True  # refused before any weights load
    key: str | None = None
    value: object = None


def key_cases() -> dict[str, Case]:
    return {
        f"{file} {key}={shown(value)}": Case(set_key(file, key, value), file, key=key, value=value)
        for file, key, values in KEY_CASES
        for value in values
    }


INDEX, TRANSFORMER, VAE = "model_index.json", "transformer/config.json", "vae/config.json"
CLIP, T5 = "text_encoder/config.json", "text_encoder_2/config.json"
VISION, DINO = "image_encoders/clip/config.json", "image_encoders/dino/config.json"
CLIP_PRE, DINO_PRE = "image_encoders/clip/preprocessor_config.json", "image_encoders/dino/preprocessor_config.json"
SCHEDULER, ADAPTER = "scheduler/scheduler_config.json", "adapter/config.json"
TOKENIZER, TOKENIZER_2 = "tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json"
TOKENIZER_CONFIG = "tokenizer/tokenizer_config.json"

KEY_CASES = [
    (INDEX, "max_text_tokens", ["abc", None, -5, 0, 10**9, 1.5, True]),
    (INDEX, "ref_guidance_scale", ["x", NAN, -1, INF, None]),
    (INDEX, "noise_temperature", [0, None, NAN, "warm"]),
    (INDEX, "tiny_random", ["no", 1]),
    (INDEX, "label", [[1], None, {"a": 1}]),
    (INDEX, "image_position_scale", [0.5, "half"]),
    (INDEX, "trained_steps", [-1, "many"]),
    (TRANSFORMER, "num_layers", ["abc", None, 10**9, -1, 2.0]),
    (TRANSFORMER, "num_single_layers", [1e9, "1"]),
    (TRANSFORMER, "num_attention_heads", [0, 100_000, None]),
    (TRANSFORMER, "attention_head_dim", ["16", 10**6]),
    (TRANSFORMER, "joint_attention_dim", [None, -32]),
    (TRANSFORMER, "in_channels", [1.5, [64]]),
    (TRANSFORMER, "axes_dims_rope", ["4,6,6", [4, "6", 6], [], [0, 8, 8]]),
    (TRANSFORMER, "guidance_embeds", ["yes", 1]),
    (TRANSFORMER, "patch_size", [0]),
    (TRANSFORMER, "pooled_projection_dim", [10**6]),
    (VAE, "block_out_channels", ["x", [], ["a", "b"], [32, 64.5], [0], [8] * 9, [[8]], None]),
    (VAE, "scaling_factor", [NAN, "x", 0, -1, INF, None]),
    (VAE, "shift_factor", [NAN, "0.1", -INF]),
    (VAE, "latent_channels", [0, "16"]),
    (VAE, "layers_per_block", [10**9, -1]),
    (VAE, "norm_num_groups", [None]),
    (VAE, "down_block_types", ["DownEncoderBlock2D", [1, 2]]),
    (CLIP, "num_hidden_layers", ["x", 1000]),
    (CLIP, "hidden_size", [None, 0]),
    (CLIP, "vocab_size", [10**9]),
    (CLIP, "max_position_embeddings", [10**9]),
    (CLIP, "layer_norm_eps", [0, NAN]),
    (T5, "d_model", ["x", 10**6]),
    (T5, "d_ff", [10**7]),
    (T5, "num_heads", [0]),
    (T5, "relative_attention_num_buckets", [-1]),
    (T5, "layer_norm_epsilon", [NAN]),
    (T5, "num_layers", [10**9]),
    (VISION, "image_size", [0, 10**5]),
    (VISION, "patch_size", [100_000]),
    (VISION, "projection_dim", ["24"]),
    (DINO, "patch_size", [0]),
    (DINO, "num_hidden_layers", [-2]),
    (DINO, "mlp_ratio", ["x", NAN, 0]),
    (CLIP_PRE, "size", [0, 100_000, {"shortest_edge": -1}, "big"]),
    (CLIP_PRE, "crop_size", [0, {"height": None, "width": 3}, [32, 32]]),
    (DINO_PRE, "image_mean", ["abc", [NAN, 0, 0], []]),
    (DINO_PRE, "image_std", [[0, 0, 0], [NAN, 1, 1], None]),
    (DINO_PRE, "resample", ["x", 9]),
    (DINO_PRE, "rescale_factor", [0, "1/255"]),
    (DINO_PRE, "do_resize", ["yes"]),
    (TOKENIZER_CONFIG, "model_max_length", ["x", 0]),
    (SCHEDULER, "shift", [NAN, "x", -1, 0]),
    (SCHEDULER, "base_shift", [NAN, None]),
    (SCHEDULER, "max_shift", [INF]),
    (SCHEDULER, "base_image_seq_len", [0]),
    (SCHEDULER, "num_train_timesteps", [10**9]),
    (SCHEDULER, "use_dynamic_shifting", ["true"]),
    (SCHEDULER, "_class_name", [5]),
    (ADAPTER, "max_refs", [0, -1, "50", 10**9]),
    (ADAPTER, "hidden_dim", ["x", None]),
    (ADAPTER, "dense_k", [None, 1, 10**6]),
    (ADAPTER, "grounding_ratio", [NAN, 1.5, "0.3"]),
    (ADAPTER, "num_double_blocks", [10**9]),
    (ADAPTER, "layout_blocks", ["x", [5], [0.5]]),
    (ADAPTER, "soft_sigma", [0, NAN]),
    (ADAPTER, "soft_masks", ["yes"]),
    (ADAPTER, "modulation_rank", [10**6]),
    (ADAPTER, "depth_priority", ["x", [1, 2]]),
    (ADAPTER, "order_priority", [-1]),
]
FILE_CASES = {
    "index garbage": Case(write(INDEX, "{not json"), INDEX),
    "index a list": Case(write(INDEX, "[1, 2]"), INDEX),
    "index empty": Case(write(INDEX, ""), INDEX),
    "index nested 100000 deep": Case(write(INDEX, DEEP), INDEX),
    "index 5000-digit integer": Case(write(INDEX, f'{{"max_text_tokens": {HUGE_INT}}}'), INDEX),
    "index not UTF-8": Case(write(INDEX, b'{"label": "\xff\xfe"}'), INDEX),
    "index a folder": Case(folder(INDEX), INDEX),
    "index a FIFO": Case(fifo(INDEX), INDEX),
    "transformer config missing": Case(write(TRANSFORMER, None), TRANSFORMER),
    "transformer config garbage": Case(write(TRANSFORMER, "garbage"), TRANSFORMER),
    "transformer of another class": Case(set_key(TRANSFORMER, "_class_name", "UNet2DModel"), TRANSFORMER),
    "transformer config wider than its weights": Case(
        set_keys(TRANSFORMER, num_attention_heads=24, attention_head_dim=128, axes_dims_rope=[16, 56, 56]), TRANSFORMER
    ),
    "T5 config far larger than its weights": Case(set_keys(T5, d_model=4096, d_ff=10240, num_layers=24), T5),
    "CLIP config of the wrong model type": Case(set_key(CLIP, "model_type", "t5"), CLIP),
    "VAE one more layer per block (loads, lacks tensors)": Case(
        set_key(VAE, "layers_per_block", 2), "vae", early=False
    ),
    "CLIP text two layers (loads, lacks tensors)": Case(
        set_key(CLIP, "num_hidden_layers", 2), "text_encoder", early=False
    ),
    "tokenizer.json garbage": Case(write(TOKENIZER, "garbage{"), TOKENIZER),
    "tokenizer.json an empty object": Case(write(TOKENIZER, "{}"), TOKENIZER),
    "tokenizer_2 tokenizer.json not UTF-8": Case(write(TOKENIZER_2, b"\xff\xfe\x00garbage"), TOKENIZER_2),
    "tokenizer.json a FIFO": Case(fifo(TOKENIZER), TOKENIZER),
    "tokenizer.json missing (no vocabulary)": Case(write(TOKENIZER, None), TOKENIZER),
    "tokenizer_config.json garbage": Case(write(TOKENIZER_CONFIG, "nope"), TOKENIZER_CONFIG),
    "tokenizer_config.json missing": Case(write(TOKENIZER_CONFIG, None), TOKENIZER_CONFIG),
    "preprocessor garbage": Case(write(CLIP_PRE, "[1,"), CLIP_PRE),
    "preprocessor missing": Case(write(DINO_PRE, None), DINO_PRE),
    "scheduler config missing": Case(write(SCHEDULER, None), SCHEDULER),
    "scheduler config garbage": Case(write(SCHEDULER, "xx"), SCHEDULER),
    "scheduler folder missing": Case(lambda root: shutil.rmtree(root / "scheduler"), SCHEDULER),
    "adapter config garbage": Case(write(ADAPTER, "{"), ADAPTER),
    "adapter config a list": Case(write(ADAPTER, "[]"), ADAPTER),
    "adapter config with an unknown key": Case(set_key(ADAPTER, "colour", "red"), ADAPTER),
    "adapter config far wider than its weights": Case(set_keys(ADAPTER, hidden_dim=4096, instance_dim=4096), ADAPTER),
    "adapter config of the removed learned occlusion": Case(set_key(ADAPTER, "occlusion_priority", True), ADAPTER),
    "adapter config missing": Case(write(ADAPTER, None), ADAPTER),
    "VAE weights truncated": Case(
        lambda root: replace_file(root / "vae/diffusion_pytorch_model.safetensors", b"\x10\x00\x00"), "vae"
    ),
    "transformer weights a FIFO": Case(fifo("transformer/diffusion_pytorch_model.safetensors"), "transformer"),
    "shard index weight_map not a mapping": Case(
        write("vae/diffusion_pytorch_model.safetensors.index.json", '{"weight_map": "x"}'), "vae"
    ),
}
CASES = {
    **key_cases(),
    **FILE_CASES,
}


def test_there_are_at_least_100_mutations():
    assert len(CASES) >= 100


class WeightsLoaded(AssertionError):
    pass


def forbid_weight_loads(monkeypatch) -> None:
    """Any weight file read from here on fails the test: the checks must refuse the dir first."""

    def loaded(*args, **kwargs):
        raise WeightsLoaded("weights were loaded before the problem was found")

    monkeypatch.setattr("moviepostproduction.encoders.frozen.load_frozen", loaded)
    monkeypatch.setattr("moviepostproduction.compose.modules.adapter.load_strict", loaded)


def check_line(message: str, case: Case, root: Path) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message
    assert case.names in message, message
    if case.key is not None:
        assert case.key in message and shown(case.value) in message, message


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scene") / "scene.json"
    path.write_text(json.dumps({"caption": "a red circle on grey", "width": 64, "height": 64, "refs": []}))
    return path


@pytest.mark.parametrize("name", list(CASES))
def test_a_broken_model_dir_is_one_line_naming_the_file(tiny, tmp_path, monkeypatch, capfd, scene, name):
    case = CASES[name]
    root = clone(tiny, tmp_path / "model")
    case.mutate(root)
    if case.early:
        forbid_weight_loads(monkeypatch)
    with pytest.raises(MppError) as err:
        ComposePipeline.from_model_dir(root)
    check_line(str(err.value), case, root)
    assert capfd.readouterr().err == ""  # transformers' and diffusers' multi-line reports are silenced
    result = invoke_cli(["compose", str(scene), "-o", str(tmp_path / "out.png"), "--model", str(root), "--steps", "1"])
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ") and (case.names in line or case.key is not None and case.key in line), line
    assert not (tmp_path / "out.png").exists()


# ------------------------------------------------------------------------------------------ NanoDiT (mpp vary)
NANODIT_CASES = {
    "depth 10**9": ({"depth": 10**9}, "depth"),
    "hidden_size a string": ({"hidden_size": "x"}, "hidden_size"),
    "mlp_ratio NaN": ({"mlp_ratio": NAN}, "mlp_ratio"),
    "qk_norm a string": ({"qk_norm": "x"}, "qk_norm"),
    "num_heads null": ({"num_heads": None}, "num_heads"),
    "an unknown key": ({"width": 3}, "width"),
    "hidden_size not divisible by num_heads": ({"hidden_size": 130}, "hidden_size"),
    "depth 12 (far more than its weights)": ({"depth": 12}, "NanoDiT of"),
}


@pytest.mark.parametrize("name", list(NANODIT_CASES))
def test_a_broken_nanodit_config_is_one_line_naming_it(tmp_path, name):
    changes, named = NANODIT_CASES[name]
    folder = clone(SHIPPED_MODEL_DIR / "nanodit", tmp_path / "nanodit")
    set_keys("config.json", **changes)(folder)
    with pytest.raises(MppError) as err:
        load_nanodit_dir(folder)
    message = str(err.value)
    assert "\n" not in message and (str(folder / "config.json") in message or "model.safetensors" in message), message
    assert named in message, message


# --------------------------------------------------------------------------------------------------- fuzzing
JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-5, 5000), st.text(max_size=3), st.none()), max_size=10),
    st.dictionaries(st.sampled_from(["height", "width", "shortest_edge", "x"]), st.integers(-5, 5000), max_size=3),
)
FILES = (INDEX, TRANSFORMER, VAE, CLIP, T5, VISION, DINO, CLIP_PRE, DINO_PRE, SCHEDULER, ADAPTER, TOKENIZER_CONFIG)


@st.composite
def mutations(draw) -> tuple[str, str, object]:
    file = draw(st.sampled_from(FILES))
    data = json.loads((SHIPPED_MODEL_DIR / file).read_text()) if (SHIPPED_MODEL_DIR / file).is_file() else {}
    keys = sorted(k for k in data if not k.startswith("_")) or ["max_text_tokens"]
    return file, draw(st.sampled_from(keys)), draw(JSON_VALUES)


@FUZZ
@given(mutation=mutations())
def test_fuzzed_config_values_load_or_fail_in_one_line(tiny, tmp_path_factory, mutation):
    """A random JSON value for a key of a config file: the dir loads, or one MppError line names that file."""
    file, key, value = mutation
    root = clone(tiny, tmp_path_factory.mktemp("fuzz") / "model")
    try:
        set_key(file, key, value)(root)
        ComposePipeline.from_model_dir(root)
    except MppError as err:
        message = str(err)
        assert message and "\n" not in message, message
        folder = file.rsplit("/", 1)[0] if "/" in file else file
        assert folder in message, message
    finally:
        shutil.rmtree(root)


def test_the_shipped_and_tiny_dirs_still_load(tiny):
    """The checks refuse nothing a real dir holds: the shipped toy model and the tiny dir load."""
    for root in (SHIPPED_MODEL_DIR, tiny):
        pipe = ComposePipeline.from_model_dir(root)
        assert pipe.defaults.max_text_tokens >= 1 and math.isfinite(pipe.model.adapter.cfg.soft_sigma)
