"""`buckets: native` (issue 44): a toy data set of two sizes, linked together by scripts/mix_toy_data.py, is cached
with every target at its own size (its latents those of a one-size cache of its own data set) and trained on by
`mpp train` (batches of one size: tests/test_train_buckets.py); a target whose sides are not multiples of 16 px is
one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from moviepostproduction.datasets.buckets import NATIVE
from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
from moviepostproduction.errors import WeightsError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.shards import write_dataset
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.training.cache_encoders import CacheEncoders
from moviepostproduction.training.feature_cache import write_cache
from moviepostproduction.training.feature_shards import read_index

from helpers import invoke_cli

MAX_REFS, TEXT = 3, 32
SIZES = {"max_text_tokens": TEXT, "batch_size": 4, "shard_size": 3, "progress": False}
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "mix_toy_data.py"


def mix_module():
    spec = importlib.util.spec_from_file_location("mix_toy_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Small scenes (32 px: 2 x 2 tokens, 5 train) and large ones (64 px: 4 x 4 tokens, 4 train), mixed."""
    root = tmp_path_factory.mktemp("native-buckets")
    md = ModelDir.at(write_tiny_model_dir(root / "model"))
    write_dataset(root / "small", 6, 1, ToyWorldConfig(size=32, ref_size=16, max_refs=2), heldout_frac=0.2,
                  shard_size=3)  # fmt: skip
    write_dataset(root / "large", 5, 2, ToyWorldConfig(size=64, ref_size=16, max_refs=3), heldout_frac=0.2,
                  shard_size=2)  # fmt: skip
    mix_module().main(["--out", str(root / "mixed"), str(root / "small"), str(root / "large")])
    encoders = CacheEncoders.wrap(TextEncoder.load(md), ImageEncoder.load(md), Vae.load(md))
    return root, md, encoders


def test_the_mix_links_the_shards_interleaved_under_the_first_sources_world(world):
    root, _, _ = world
    manifest = json.loads((root / "mixed" / "manifest.json").read_text())
    small = json.loads((root / "small" / "manifest.json").read_text())
    assert manifest["config"] == small["config"] and manifest["seed"] == small["seed"]  # the export's toy world
    assert manifest["splits"]["train"]["count"] == 5 + 4 and manifest["splits"]["heldout"]["count"] == 1 + 1
    links = [(root / "mixed" / name).resolve() for name in manifest["splits"]["train"]["shards"]]
    want = ["small/train/shard-000000.tar", "large/train/shard-000000.tar", "small/train/shard-000001.tar",
            "large/train/shard-000001.tar"]  # fmt: skip
    assert links == [(root / w).resolve() for w in want]
    assert [m["data"] for m in manifest["mixed_from"]] == [str((root / s).resolve()) for s in ("small", "large")]


def test_the_mix_takes_the_first_k_shards_and_refuses_bad_sources(world, tmp_path):
    root, _, _ = world
    module = mix_module()
    module.main(["--out", str(tmp_path / "two"), str(root / "small"), f"{root / 'large'}:1"])
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 5 + 2
    for args, line in [
        ([f"{root / 'large'}:0"], "expected DIR or DIR:K with K a positive number of shards"),
        ([str(tmp_path)], "no manifest.json (expected `mpp prepare-data` output)"),
    ]:
        with pytest.raises(SystemExit, match=line.replace("(", r"\(").replace(")", r"\)")):
            module.main(["--out", str(tmp_path / "bad"), *args])
    with pytest.raises(SystemExit, match="already exists"):
        module.main(["--out", str(tmp_path / "two"), str(root / "small")])


def test_native_targets_keep_their_size_and_their_own_latents(world, tmp_path):
    """Each sample of the mixed cache has its own grid and the latents of a one-size cache of its own data set
    (VAE batches split by size: rounding only), in the mixed data set's order."""
    root, _, enc = world
    mixed = write_cache(root / "mixed" / "train", tmp_path / "m", enc, meta={}, max_refs=MAX_REFS, buckets=NATIVE,
                        **SIZES)  # fmt: skip
    assert read_index(tmp_path / "m")["buckets"] == [{"grid": [2, 2], "samples": 5}, {"grid": [4, 4], "samples": 4}]
    alone = {name: write_cache(root / name / "train", tmp_path / name, enc, meta={}, max_refs=MAX_REFS, **SIZES)
             for name in ("small", "large")}  # fmt: skip
    order = [("small", 0), ("small", 1), ("small", 2), ("large", 0), ("large", 1), ("small", 3), ("small", 4),
             ("large", 2), ("large", 3)]  # fmt: skip
    assert mixed.sample_grids().tolist() == [[2, 2] if name == "small" else [4, 4] for name, _ in order]
    for i, (name, k) in enumerate(order):
        got, want = mixed.sample(i), alone[name].sample(k)  # a one-size cache's sample keeps its batch axis
        torch.testing.assert_close(got["latents"].float(), want["latents"][0].float(), atol=2e-3, rtol=0)
        assert torch.equal(got["t5"].flatten(), want["t5"].flatten())
        assert torch.equal(got["bboxes"].flatten(), want["bboxes"].flatten())


def test_a_target_off_the_16_px_grid_is_one_line(world, tmp_path):
    _, _, enc = world
    write_dataset(tmp_path / "odd", 2, 0, ToyWorldConfig(size=40, ref_size=16, max_refs=1), heldout_frac=0.0)
    with pytest.raises(WeightsError) as err:
        write_cache(tmp_path / "odd" / "train", tmp_path / "c", enc, meta={}, max_refs=1, buckets=NATIVE, **SIZES)
    assert str(err.value) == (
        f"{tmp_path / 'odd' / 'train'}: a target of 40x40 px: with buckets: native both sides must be multiples of 16 "
        "(recipe `buckets:`)"
    )


def test_mpp_train_trains_the_toy_stage_on_both_sizes(world, tmp_path):
    root, md, _ = world
    recipe = {
        "model": str(md.root),
        "data": str(root / "mixed"),
        "out": str(tmp_path / "run"),
        "stage": "toy",
        "max_refs": MAX_REFS,
        "max_text_tokens": TEXT,
        "buckets": "native",
        "export": str(tmp_path / "exported"),
        "trainer": {"max_steps": 4, "progress": False, "tensorboard": False, "sample_every": 0},
        "compose": {"batch_size": 2, "aux_prob": 1.0, "region_prob": 1.0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke_cli(["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    train = read_index(tmp_path / "run" / "cache" / "train")
    assert train["meta"]["buckets"] == "native"
    assert {tuple(b["grid"]): b["samples"] for b in train["buckets"]} == {(2, 2): 5, (4, 4): 4}
    index = json.loads((tmp_path / "exported" / "model_index.json").read_text())
    assert index["toy_world_data"]["config"]["size"] == 32  # the first source's world
