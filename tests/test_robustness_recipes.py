"""A bad training recipe is one line per bad field, before anything loads, through `mpp train RECIPE` (exit 2, no
traceback): wrong types for every field, seeds outside [0, 2**64), counts past their maxima, hostile files (alias
bombs, deep nesting, tags, duplicate keys, FIFOs); and a corrupt state.json in the latest checkpoint stops a resumed
run with one line naming it, never a silent start from scratch (docs/robustness.md, "Model dirs and recipes")."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from moviepostproduction.errors import MppError, ValidationError, WeightsError, shown
from moviepostproduction.training.checkpoints import CheckpointStore
from moviepostproduction.training.recipe import Recipe
from moviepostproduction.training.trainer import Trainer
from test_trainer import LinearTask, config

from helpers import fuzz, invoke_cli

FUZZ = fuzz(150)
BASE = {"model": "models/toy", "data": "build/data", "out": "runs/toy"}
NAN, INF = float("nan"), float("inf")

# (field path, bad value, what the line must say); a dotted path sets a key of a section.
FIELDS = [
    ("model", 5, "must be a string"),
    ("model", None, "must be a string"),
    ("model", "", "must be a path"),
    ("data", ["a"], "must be a string"),
    ("out", ["a"], "must be a string"),
    ("out", {"dir": "x"}, "must be a string"),
    ("task", "paint", "expected one of compose, fill, vary"),
    ("task", 1, "must be a string"),
    ("stage", "9", "expected one of 1, 2, 3, toy"),
    ("stage", 1, "must be a string"),
    ("max_refs", "4", "must be an integer"),
    ("max_refs", 0, "must be an integer in [1, 4096]"),
    ("max_refs", 10**9, "must be an integer in [1, 4096]"),
    ("max_text_tokens", "abc", "must be an integer"),
    ("max_text_tokens", -5, "must be an integer in [1, 4096]"),
    ("max_text_tokens", 10**9, "must be an integer in [1, 4096]"),
    ("max_text_tokens", 1.5, "must be an integer"),
    ("limit", 0, "must be an integer >= 1 or null"),
    ("limit", "all", "must be an integer or null"),
    ("cache_workers", 0, "must be a positive integer"),
    ("cache_workers", True, "must be an integer"),
    ("init_from", 3, "must be a string or null"),
    ("adapter", "x", "must be a mapping of ConditioningConfig fields"),
    ("adapter", [4], "must be a mapping"),
    ("export", [], "must be a string or null"),
    ("export_dtype", "fp8", "expected one of fp16, bf16, fp32"),
    ("ref_guidance", "x", "must be a finite number"),
    ("ref_guidance", NAN, "must be a finite number"),
    ("ref_guidance", -1, "must be a finite number >= 0"),
    ("noise_temperature", 0, "must be a positive number"),
    ("noise_temperature", INF, "must be a finite number"),
    ("trainer", "x", "must be a mapping of TrainConfig fields"),
    ("trainer", [1], "must be a mapping"),
    ("compose", 3, "must be a mapping"),
    ("fill", "x", "must be a mapping"),
    ("vary", None, "must be a mapping"),
    ("trainer.max_steps", "x", "must be an integer"),
    ("trainer.max_steps", 0, "must be a positive integer"),
    ("trainer.max_steps", 2.5, "must be an integer"),
    ("trainer.seed", -1, "must be an integer in [0, 2**64)"),
    ("trainer.seed", 2**64, "must be an integer in [0, 2**64)"),
    ("trainer.seed", 2**70, "must be an integer in [0, 2**64)"),
    ("trainer.seed", "1", "must be an integer"),
    ("trainer.seed", 1.5, "must be an integer"),
    ("trainer.seed", None, "must be an integer"),
    ("trainer.grad_accum", 0, "must be a positive integer"),
    ("trainer.mixed_precision", "fp8", "expected one of"),
    ("trainer.max_grad_norm", "x", "must be a finite number or null"),
    ("trainer.lr_scale", 0, "must be a positive number"),
    ("trainer.lr_scale", NAN, "must be a finite number"),
    ("trainer.ema_decay", 1.0, "must be a number in [0, 1)"),
    ("trainer.warmup_steps", -1, "must be an integer in [0, max_steps=1000]"),
    ("trainer.resume", "yes", "must be true or false"),
    ("trainer.progress", 1, "must be true or false"),
    ("trainer.out_dir", "elsewhere", "unknown field"),
    ("trainer.learning_rate", 1e-4, "unknown field"),
    ("compose.batch_size", "16", "must be an integer"),
    ("compose.drop_refs", 2, "must be a probability in [0, 1]"),
    ("compose.drop_caption", NAN, "must be a probability in [0, 1]"),
    ("compose.lora_rank", None, "must be an integer"),
    ("compose.box_loss_weight", 1, "unknown field"),
    ("vary.batch_size", 0, "must be an integer >= 1"),
    ("vary.ref_prob", 3, "must be a probability in [0, 1]"),
    ("vary.lr", "fast", "must be a finite number"),
    ("fill.data_seed", -3, "must be an integer in [0, 2**64)"),
    ("fill.data_seed", 2**70, "must be an integer in [0, 2**64)"),
    ("fill.semantic", "yes", "must be true or false"),
    ("fill.scenes", "many", "must be an integer"),
    ("api_key", "sk-secret-value", "unknown field"),
]
TASK_OF = {"vary": {"task": "vary", "stage": "full"}, "fill": {"task": "fill", "stage": "all"}}


def recipe_with(path: str, value: object) -> dict:
    section, _, key = path.partition(".")
    recipe = {**BASE, **TASK_OF.get(section, {})}
    if key:
        recipe[section] = {key: value}
    else:
        recipe[section] = value
    return recipe


def train_lines(path: Path) -> list[str]:
    result = invoke_cli(["train", str(path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert all(line.startswith(f"error: {path}: ") for line in lines), lines
    return lines


def test_there_are_at_least_60_recipes():
    assert len(FIELDS) + len(FILES) + len(STATES) >= 60


@pytest.mark.parametrize(("field", "value", "message"), FIELDS, ids=[f"{f}={shown(v)}" for f, v, _ in FIELDS])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_bad_field_is_one_line_naming_it(tmp_path, field, value, message, suffix):
    path = tmp_path / f"recipe{suffix}"
    recipe = recipe_with(field, value)
    path.write_text(json.dumps(recipe) if suffix == ".json" else yaml.safe_dump(recipe))
    (line,) = train_lines(path)
    assert f": {field}: {message}" in line, line
    if "unknown field" in message:
        assert "sk-secret" not in line and "(got" not in line  # an unknown key's value is never echoed
    elif "2**70" not in field:
        assert f"(got {shown(value)})" in line, line


def test_every_bad_field_of_one_recipe_gets_its_own_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": 5, "out": ["a"], "max_refs": 0, "trainer": {"seed": -1, "lr": 1}}))
    lines = train_lines(path)
    named = sorted(line.split(": ")[2] for line in lines)
    assert named == ["data", "max_refs", "model", "out", "trainer.lr", "trainer.seed"], lines


BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
FILES = {
    "a YAML alias bomb": (BOMB, "alias"),
    "YAML nested 1000 deep": ("model: " + "[" * 1000 + "]" * 1000, "nested more than"),
    "JSON nested 100000 deep": ('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested more than"),
    "a duplicate key": ("model: a\nmodel: b\ndata: d\nout: o\n", "duplicate key"),
    "a python tag": ("model: !!python/object/apply:os.system ['touch MARKER']\ndata: d\nout: o\n", "tags"),
    "a 5000-digit integer": ("model: m\ndata: d\nout: o\nlimit: " + "9" * 5000 + "\n", "digits"),
    "not UTF-8": (b"model: \xff\xfe\ndata: d\nout: o\n", "not UTF-8"),
    "a syntax error": ("model: [unclosed\n", "invalid YAML"),
    "a list": ("- model\n- data\n", "must be a mapping"),
    "a scalar": ("just text\n", "must be a mapping"),
    "empty": ("", "must be a mapping"),
    "a lone surrogate": ('{"model": "\\ud800", "data": "d", "out": "o"}', "surrogate"),
}


@pytest.mark.parametrize("name", list(FILES))
def test_a_hostile_recipe_file_is_one_line(tmp_path, name):
    text, message = FILES[name]
    path = tmp_path / ("r.json" if name.startswith("JSON") or "surrogate" in name else "r.yaml")
    marker = tmp_path / "ran"
    path.write_bytes(text if isinstance(text, bytes) else text.replace("MARKER", str(marker)).encode())
    (line,) = train_lines(path)
    assert message in line, line
    assert not marker.exists()  # no YAML tag ever runs code


@pytest.mark.parametrize("kind", ["fifo", "folder", "missing", "too large"])
def test_a_recipe_path_that_is_no_small_regular_file_is_refused_unread(tmp_path, kind):
    path = tmp_path / "r.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block
    elif kind == "folder":
        path.mkdir()
    elif kind == "too large":
        path.write_text("model: m\n" + "#" * (2 << 20))
    result = invoke_cli(["train", str(path)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert str(path) in result.output


# ------------------------------------------------------------------------------------------ fuzzing
KEYS = sorted(
    {field.split(".")[0] for field, _, _ in FIELDS} | {"trainer.max_steps", "trainer.seed", "compose.aux_prob"}
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["max_steps", "seed", "batch_size", "x"]), st.integers(-3, 10**6), max_size=2),
)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4), json_file=st.booleans())
def test_fuzzed_recipes_are_read_or_refused_line_by_line(tmp_path_factory, changes, json_file):
    recipe = dict(BASE)
    for path, value in changes.items():
        section, _, key = path.partition(".")
        if key:
            recipe[section] = {key: value}
        else:
            recipe[section] = value
    path = tmp_path_factory.mktemp("fuzz") / ("r.json" if json_file else "r.yaml")
    path.write_text(json.dumps(recipe) if json_file else yaml.safe_dump(recipe, allow_unicode=True))
    try:
        read = Recipe.from_file(path)
    except ValidationError as err:
        assert len(str(err).splitlines()) == len(err.problems) >= 1
        assert all(line.startswith(f"{path}: ") for line in str(err).splitlines())
        return
    except MppError as err:  # a file-level refusal
        assert "\n" not in str(err)
        return
    assert isinstance(read.model, str) and isinstance(read.trainer, dict) and 1 <= read.max_text_tokens <= 4096
    assert 0 <= read.trainer.get("seed", 0) < 2**64


# ------------------------------------------------------------------------------ a corrupt checkpoint state
DROP = object()  # a key removed from the state
STATES = {
    "garbage": "{not json",
    "empty": "",
    "a list": "[1, 2]",
    "not UTF-8": b"\xff\xfe{}",
    "nested 100000 deep": "[" * 100_000 + "]" * 100_000,
    "step missing": {"step": DROP},
    "step a string": {"step": "4"},
    "step negative": {"step": -4},
    "losses not a list": {"losses": "x"},
    "a NaN loss": {"losses": [0.5, NAN]},
    "stage a number": {"stage": 3},
    "logs not mappings": {"logs": [1, 2]},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of the test trainer's regression task with checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    Trainer(LinearTask(), config(out, max_steps=4, checkpoint_every=2, tensorboard=False)).run()
    return out


@pytest.mark.parametrize("name", list(STATES))
def test_a_corrupt_state_json_stops_the_resume_in_one_line_naming_it(finished_run, tmp_path, name):
    import shutil

    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    state_file = out / "checkpoints" / "step-000004" / "state.json"
    change = STATES[name]
    if isinstance(change, dict):
        state = {**json.loads(state_file.read_text()), **change}
        change = json.dumps({k: v for k, v in state.items() if v is not DROP})
    state_file.write_bytes(change if isinstance(change, bytes) else change.encode())
    task = LinearTask()
    with pytest.raises(WeightsError) as err:
        Trainer(task, config(out, max_steps=6, checkpoint_every=2, tensorboard=False)).run()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{state_file}: ") and "trainer.resume: false" in message
    assert task.calls == 0  # not a single step: no silent start from scratch
    assert CheckpointStore(out / "checkpoints").latest().name == "step-000004"  # nothing removed or overwritten
