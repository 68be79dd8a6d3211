"""A compose recipe is checked whole before the first step (training/recipe_preflight.py): paths, the adapter's fit to
the model, the export target for the stage, free disk for the feature cache; one line per problem, exit 2, nothing
trained or cached."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import pytest
import yaml

from moviepostproduction.toyworld.shards import write_dataset
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.training import recipe_preflight
from moviepostproduction.training.recipe import Recipe
from moviepostproduction.training.recipe_preflight import CacheDims, cache_bytes
from moviepostproduction.training.recipe_preflight import recipe_preflight as preflight

from helpers import invoke_cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """stock/: a FLUX folder without adapter/ or image encoders; clip/, dino/; adapter/ from init-adapter; data/."""
    root = tmp_path_factory.mktemp("preflight")
    tiny = tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny")
    stock = shutil.copytree(tiny, root / "stock", ignore=shutil.ignore_patterns("adapter", "image_encoders"))
    clip = shutil.copytree(tiny / "image_encoders" / "clip", root / "clip")
    dino = shutil.copytree(tiny / "image_encoders" / "dino", root / "dino")
    args = ["init-adapter", "--model", str(stock), "--clip", str(clip), "--dino", str(dino)]
    assert invoke_cli([*args, "-o", str(root / "adapter")]).exit_code == 0
    write_dataset(root / "data", 4, 3, ToyWorldConfig(size=64, ref_size=32, max_refs=2), shard_size=2)
    return root, tiny


def recipe(root, **fields) -> Recipe:
    base = {
        "model": str(root / "stock"),
        "data": str(root / "data"),
        "out": str(root / "run"),
        "stage": "1",
        "adapter_dir": str(root / "adapter"),
        "export": str(root / "out-adapter"),
    }
    return Recipe(**{**base, **fields})


def lines(problems) -> list[str]:
    return [str(p) for p in problems]


def test_a_good_recipe_has_no_problems_in_either_layout(world):
    root, tiny = world
    assert preflight(recipe(root)) == []
    combined = recipe(root, model=str(tiny), adapter_dir=None, stage="toy", export=str(root / "model-out"))
    assert preflight(combined) == []  # the toy model's adapter/ inside its model dir


def test_each_bad_field_is_one_line_and_mpp_train_trains_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the lines show them whole
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    bad = {"model": "nowhere", "data": "empty", "out": "run", "stage": "1", "adapter_dir": "missing", "export": "afile"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(bad))
    result = invoke_cli(["train", "r.yaml"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: r.yaml: model: not a directory (expected a FLUX-layout model folder) (got 'nowhere')",
        "error: r.yaml: data: holds no manifest.json (expected `mpp prepare-data` output) (got 'empty')",
        "error: r.yaml: adapter_dir: not found; make it with `mpp init-adapter` or give init_adapter (got 'missing')",
        "error: r.yaml: export: is an existing file; give a folder name (got 'afile')",
    ]
    assert not (tmp_path / "run").exists()  # no cache, no checkpoint


def test_the_export_of_a_lora_stage_never_replaces_a_model_dir_or_other_folder(world, tmp_path):
    root, tiny = world
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    for target, kind in ((root / "stock", "a model dir"), (tmp_path / "notes", "not an adapter folder")):
        (problem,) = preflight(recipe(root, export=str(target)))
        assert str(problem).startswith(f"export: exists and is {kind}; an export replaces only an adapter folder")
    assert preflight(recipe(root, export=str(root / "adapter"))) == []  # an adapter folder: replaced by the export
    toy = recipe(root, model=str(tiny), adapter_dir=None, stage="toy", export=str(root / "adapter"))
    (problem,) = preflight(toy)
    assert str(problem).startswith("export: is an adapter folder; stage toy trains the whole backbone")


def test_an_adapter_that_does_not_fit_the_model_is_named_per_size(world, tmp_path):
    root, _ = world
    other = shutil.copytree(root / "adapter", tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "hidden_dim": 8, "num_single_blocks": 9}))
    problems = preflight(recipe(root, adapter_dir=str(other)))
    assert [(p.field, p.value, p.message) for p in problems] == [
        ("adapter_dir", str(other), f"hidden_dim 8 does not fit the model ({config['hidden_dim']})"),
        ("adapter_dir", str(other), f"num_single_blocks 9 does not fit the model ({config['num_single_blocks']})"),
    ]
    (problem,) = preflight(recipe(root, adapter_dir=str(root / "stock")))
    assert str(problem).startswith("adapter_dir: is not an adapter folder (mpp init-adapter)")


def test_stage_3_needs_an_adapter_with_a_feedback_bridge(world, tmp_path):
    root, _ = world  # the tiny FLUX has one double block: bridges sit between double blocks
    (problem,) = preflight(recipe(root, stage="3"))
    assert str(problem) == (
        "stage: trains the feedback bridge, which this adapter does not have (feedback_rank 0 or one double block) "
        "(got '3')"
    )


def test_init_adapter_is_checked_before_it_creates_anything(world, tmp_path):
    root, _ = world
    target = str(tmp_path / "new")
    good = {"clip": str(root / "clip"), "dino": str(root / "dino")}
    assert preflight(recipe(root, adapter_dir=target, init_adapter=good)) == []
    assert preflight(recipe(root, init_adapter=good)) == []  # adapter_dir exists: a resumed run uses it
    bad = {"clip": str(root / "nowhere"), "dino": 3, "seed": -1, "shape": "x"}
    assert lines(preflight(recipe(root, adapter_dir=target, init_adapter=bad))) == [
        "init_adapter.dino: must be a folder path (got 3)",
        "init_adapter.seed: must be an integer >= 0 (got -1)",
        "init_adapter.shape: unknown key (known: clip, dino, copy_encoders, seed)",
    ]
    missing = {"clip": str(root / "nowhere"), "dino": str(root / "dino")}
    (problem,) = preflight(recipe(root, adapter_dir=target, init_adapter=missing))
    assert str(problem).startswith(f"init_adapter: model dir {root / 'stock'}: missing {root / 'nowhere'}")
    (problem,) = preflight(recipe(root, adapter_dir=None, init_adapter=good))
    assert str(problem).startswith("init_adapter: needs adapter_dir: the folder to create")
    assert not (tmp_path / "new").exists()


def test_too_little_disk_for_the_feature_cache_is_one_line(world, monkeypatch):
    root, _ = world
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(recipe_preflight.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    (problem,) = preflight(recipe(root))
    assert str(problem).startswith("out: needs about 0.")
    assert "GB free for the feature cache (4 samples), " in str(problem)


def test_the_cache_estimate_counts_every_stored_value_as_fp32():
    dims = CacheDims(latent_channels=16, t5=4096, pooled=768, clip=768, dino=1024, dino_patches=37 * 37)
    per_sample = cache_bytes(dims, 1024 * 1024, max_refs=10, max_text_tokens=512)
    floats = 4096 * 64 + 512 * 4096 + 768 + 10 * (4 + 768 + 1024 + 1369 * 1024)
    assert per_sample == 4 * floats + 10 * (512 + 1 + 8)
    assert round(per_sample / 1e6, 1) == 65.6  # FLUX.1-dev at 1024^2 with 10 refs: 65.6 MB per sample


def test_the_cache_estimate_takes_explicit_buckets_larger_than_the_stored_targets():
    """Real data's largest target is the manifest's max_pixels; buckets of a larger area are what the cache stores."""
    manifest = {"splits": {"train": {"count": 10}, "heldout": {"count": 2}}, "config": {"max_pixels": 512 * 512}}
    auto = Recipe(model="m", data="d", out="o")
    larger = Recipe(model="m", data="d", out="o", buckets={"area": 1024 * 1024, "step": 64, "max_ratio": 4})
    assert recipe_preflight.manifest_samples(auto, manifest) == (12, 512 * 512)
    assert recipe_preflight.manifest_samples(larger, manifest) == (12, 1024 * 1024)


def test_the_cache_estimate_of_a_mixed_toy_set_takes_its_largest_scenes():
    """scripts/mix_toy_data.py keeps the first source's world (128 px) and lists every source: 320 px scenes count."""
    sources = [{"config": {"size": 128}}, {"config": {"size": 320}}]
    manifest = {"splits": {"train": {"count": 4}}, "config": {"size": 128}, "mixed_from": sources}
    assert recipe_preflight.manifest_samples(Recipe(model="m", data="d", out="o"), manifest) == (4, 320 * 320)
