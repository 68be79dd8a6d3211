"""Resolution buckets reach training (issue 42 item 1): real-format targets of three aspect ratios are fitted to their
buckets when the feature cache is built (boxes mapped, refs the crop leaves out dropped and counted), stored with
their own token grids, batched one bucket at a time, and trained on by stage 1; a cache resumes exactly; and a
cache built with other image encoders is refused."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from itertools import count
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.datasets.buckets import BucketSpec, bucket_bbox, fit_bucket
from moviepostproduction.datasets.prepare import PrepareConfig, write_real_dataset
from moviepostproduction.datasets.problems import Tally
from moviepostproduction.datasets.real_format import RealRef, RealSample, iter_real_samples, split_of
from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae, load_transformer
from moviepostproduction.errors import WeightsError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.sampling import pack_latents
from moviepostproduction.toyworld.replica import write_flux_replica
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.training import feature_cache
from moviepostproduction.training.cache_encoders import CacheEncoders
from moviepostproduction.training.cache_key import encoder_fingerprint
from moviepostproduction.training.compose_task import ComposeTask, ComposeTaskConfig
from moviepostproduction.training.feature_cache import build_cache, open_cache, write_cache
from moviepostproduction.training.feature_shards import ShardedFeatures, read_index, sample_bytes
from moviepostproduction.training.recipe import Recipe, cached_features

from helpers import invoke_cli

TEXT, MAX_REFS = 32, 2
SPEC = BucketSpec(area=64 * 64, step=16, max_ratio=4)  # what `buckets: auto` gives TRAIN (largest: 96 x 48)
SQUARE, WIDE, TALL = (64, 64), (96, 48), (48, 96)  # buckets 64x64, 80x48, 48x80: token grids 4x4, 3x5, 5x3
GRIDS = {SQUARE: (4, 4), WIDE: (3, 5), TALL: (5, 3)}
TRAIN = [SQUARE, WIDE, TALL, SQUARE, WIDE, SQUARE, TALL, WIDE, SQUARE]
HELDOUT = [WIDE, SQUARE]
EDGE = {WIDE: (0.0, 0.2, 0.05, 0.6), TALL: (0.2, 0.0, 0.6, 0.05)}  # inside the 8 pixels the crop cuts off


def sample(size: tuple[int, int], i: int, rng) -> RealSample:
    """A target of `size` (width, height) with a ref at its centre and, for the wide and tall ones, one at the edge
    the bucket's centre crop cuts off."""
    boxes = [(0.3, 0.25, 0.7, 0.75)] + ([EDGE[size]] if size in EDGE else [])
    refs = [RealRef(rng.integers(0, 256, (8, 6, 4), dtype=np.uint8), box, "fg", f"thing {k}")
            for k, box in enumerate(boxes)]  # fmt: skip
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return RealSample("", image, f"scene {i} of {size[0]}x{size[1]}", refs, {})


def write_data(out: Path) -> Path:
    """A real-format data set whose train split holds TRAIN and heldout split HELDOUT, in order (names picked so
    that the stable hash split puts each where it belongs)."""
    rng, names, items = np.random.default_rng(0), count(), []
    for split, sizes in (("train", TRAIN), ("heldout", HELDOUT)):
        for i, size in enumerate(sizes):
            name = next(n for k in names if split_of(n := f"photo{k}.jpg", 0.5) == split)
            items.append((name, sample(size, i, rng)))
    config = PrepareConfig(heldout_frac=0.5, shard_size=4, lossless=True)
    write_real_dataset(out, items, config=config, tally=Tally(), source={"kind": "test"})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-buckets")
    data = write_data(root / "data")
    md = ModelDir.at(tiny_random_model_dir(tmp_path_factory.getbasetemp() / "tiny"))
    encoders = CacheEncoders.wrap(TextEncoder.load(md), ImageEncoder.load(md), Vae.load(md))
    return root, data, md, encoders


def build(world, root: Path, batch_size: int = 4, **kw) -> ShardedFeatures:
    _, data, _, enc = world
    sizes = {"max_text_tokens": TEXT, "batch_size": batch_size, "shard_size": 3, "progress": False}
    return write_cache(data / "train", root, enc, meta={"buckets": SPEC.key}, max_refs=MAX_REFS, buckets=SPEC.buckets,
                       **sizes | kw)  # fmt: skip


def test_targets_go_to_their_buckets_with_their_boxes_and_refs_mapped(world, tmp_path, caplog):
    """Every target is its bucket's crop, VAE-encoded in batches of one size (the build's batch of 4 is split by
    bucket) and stored in the data set's order with its own grid; boxes are `bucket_bbox`'s; the refs the crop
    leaves out are dropped and counted."""
    _, data, _, enc = world
    with caplog.at_level(logging.INFO, logger="moviepostproduction.training.feature_cache"):
        cache = build(world, tmp_path / "c")
    assert "5 refs dropped, their boxes outside the bucket crop" in caplog.text  # 3 wide + 2 tall
    index = read_index(tmp_path / "c")
    assert index["grid"] is None and cache.grid is None
    assert index["buckets"] == [{"grid": [3, 5], "samples": 3}, {"grid": [4, 4], "samples": 4},
                                {"grid": [5, 3], "samples": 2}]  # fmt: skip
    assert cache.sample_grids().tolist() == [list(GRIDS[s]) for s in TRAIN]
    with torch.no_grad():
        for i, s in enumerate(iter_real_samples(data / "train")):
            got = cache.sample(i)
            pixels, boxes = fit_bucket(s.image, s.bboxes, SPEC.buckets)
            assert (pixels.shape[1], pixels.shape[0]) == {SQUARE: (64, 64), WIDE: (80, 48), TALL: (48, 80)}[TRAIN[i]]
            alone = torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 127.5 - 1.0  # (1, 3, H, W)
            want = pack_latents(enc.vae.encode(alone)).half()[0]  # (L, C)
            torch.testing.assert_close(got["latents"], want, atol=2e-3, rtol=0)  # batched vs alone: rounding only
            assert got["grids"].tolist() == [list(GRIDS[TRAIN[i]])]
            text, _, _ = enc.text.encode_spans(s.caption, s.ref_captions[:1], TEXT)  # a dropped ref's caption too
            assert torch.equal(got["t5"], text.t5.half())  # the sample's own caption: the order is the data's
            kept = [bucket_bbox(tuple(b), s.width, s.height, pixels.shape[1::-1]) for b in s.bboxes.tolist()]
            assert [b for b in kept if b is not None] == boxes[:1]
            assert torch.equal(got["bboxes"], torch.tensor(boxes[:1], dtype=torch.float32))  # the edge ref dropped
            assert got["ref_counts"].tolist() == [1]


def test_sample_bytes_stays_exact_for_a_bucketed_cache(world, tmp_path):
    """Shard bytes = `sample_bytes(bucketed=True)` with each sample's own grid, + two int64 offsets per shard."""
    _, _, md, _ = world
    cache = build(world, tmp_path / "c", patches=False)
    total = 0
    for file in sorted((tmp_path / "c").glob("shard-*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            total += sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())  # noqa: SIM118
    first = cache.sample(0)
    clip, dino = first["clip"].shape[-1], first["dino"].shape[-1]
    dims = dict(latent_dim=first["latents"].shape[-1], text_tokens=TEXT, t5_dim=first["t5"].shape[-1])
    dims |= dict(pooled_dim=first["pooled"].shape[-1], clip_dim=clip, dino_dim=dino, bucketed=True)
    want = sum(sample_bytes(**dims, latent_tokens=h * w, refs=1) for h, w in cache.sample_grids().tolist())
    assert total == want + 16 * len(cache.shards)


def test_an_interrupted_bucketed_build_resumes_to_the_uninterrupted_one(world, tmp_path, monkeypatch):
    """Batches of 3 = shards of 3, so the resumed build's batches (and VAE groups) are the fresh build's."""
    fresh = build(world, tmp_path / "fresh", batch_size=3)
    encode, seen = feature_cache.encode_samples, []

    def interrupted(samples, *args):  # batch 2's first bucket never finishes: shard 0 (samples 0-2) is complete
        if sum(seen) >= 3:
            raise KeyboardInterrupt
        seen.append(len(samples))
        return encode(samples, *args)

    monkeypatch.setattr(feature_cache, "encode_samples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(world, tmp_path / "c", batch_size=3)
    index = read_index(tmp_path / "c")
    assert [s["samples"] for s in index["shards"]] == [3] and not index["complete"]
    assert index["buckets"] == [{"grid": [3, 5], "samples": 1}, {"grid": [4, 4], "samples": 1},
                                {"grid": [5, 3], "samples": 1}]  # fmt: skip
    seen.clear()
    monkeypatch.setattr(feature_cache, "encode_samples", lambda s, *a: seen.append(len(s)) or encode(s, *a))
    resumed = build(world, tmp_path / "c", batch_size=3)
    assert sum(seen) == 6 and len(seen) == 5  # samples 3..8 only, in 2 batches of 3 split into 2 + 3 bucket groups
    assert read_index(tmp_path / "c")["buckets"] == read_index(tmp_path / "fresh")["buckets"]
    for i in range(len(TRAIN)):
        a, b = resumed.sample(i), fresh.sample(i)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i


def test_batches_hold_one_bucket_each_and_drop_each_buckets_remainder(world, tmp_path):
    """Batches of 2 from buckets of 4, 3 and 2 samples: 2 + 1 + 1 per epoch (one wide sample left out), each of
    one grid, the same for the same (seed, epoch), its losses (flow, decoded bbox alignment, region) at that grid,
    the previews of the first scenes a grid at a time; a cache of one grid keeps the plain random-permutation
    batches."""
    root, data, md, enc = world
    cache = build(world, tmp_path / "c")
    model = ConditionedFlux(load_transformer(md), CompositionAdapter.from_pretrained(md.adapter.root))
    config = ComposeTaskConfig(batch_size=2, drop_refs=0.0, aux_prob=1.0, region_prob=1.0, num_preview=2)
    task = ComposeTask(model, cache, enc.vae, enc.image, config=config)
    task.param_groups("1")
    for batch in task.batches(0, seed=5):
        logs = task.loss(batch, torch.Generator().manual_seed(0)).logs
        assert {"flow", "bbox", "region"} <= logs.keys() and all(np.isfinite(v) for v in logs.values())
    assert cache.sample_grids()[:2].tolist() == [[4, 4], [3, 5]]
    assert task.samples(torch.Generator().manual_seed(0)).size == (2 * 64, 2 * 64)  # 2 scenes x (target, sample)
    epochs = [[b.tolist() for b in task.batches(epoch, seed=5)] for epoch in (0, 1)]
    assert epochs[0] == [b.tolist() for b in task.batches(0, seed=5)] and epochs[0] != epochs[1]
    for batches in epochs:
        grids = [cache.grid_of(b) for b in batches]  # one grid per batch (grid_of refuses a mixed one)
        assert sorted(grids) == [(3, 5), (4, 4), (4, 4), (5, 3)]
        assert len({i for b in batches for i in b}) == 8
    with pytest.raises(ValueError, match=r"mix the token grids \[\(3, 5\), \(4, 4\)\]"):
        cache.grid_of([0, 1])
    one = build_cache(data / "train", enc.text, enc.image, enc.vae, max_refs=MAX_REFS, max_text_tokens=TEXT, limit=1,
                      buckets=SPEC.buckets, progress=False)  # fmt: skip
    with pytest.raises(
        WeightsError, match=r"several token grids \(3x5, 4x4, 5x3\); an in-memory FeatureCache holds one"
    ):
        build_cache(data / "train", enc.text, enc.image, enc.vae, max_refs=MAX_REFS, max_text_tokens=TEXT,
                    buckets=SPEC.buckets, progress=False)  # fmt: skip
    assert one.grid == (4, 4) and one.latents.shape[:2] == (1, 16)
    single = ComposeTask(model, one, config=ComposeTaskConfig(batch_size=1))
    order = torch.randperm(1, generator=torch.Generator().manual_seed(5 * 7919 + 3))
    assert [b.tolist() for b in single.batches(3, seed=5)] == [order[:1].tolist()]


def test_batch_tokens_sizes_each_buckets_batches_by_its_token_count(world, tmp_path):
    """`batch_tokens` (issue 44): a batch of grid (h, w) holds max(1, batch_tokens // (h w)) samples, so the 4x4
    bucket (4 samples) and the 3x5 and 5x3 ones (3 and 2) batch by 3 at 48 tokens, leaving the 5x3 bucket out; one
    sample a batch when a grid alone is over the budget; batches stay one grid each and the same for (seed, epoch)."""
    root, data, md, enc = world
    cache = build(world, tmp_path / "c")
    model = ConditionedFlux(load_transformer(md), CompositionAdapter.from_pretrained(md.adapter.root))

    def epoch(tokens: int | None, size: int = 2) -> list[list[int]]:
        task = ComposeTask(model, cache, config=ComposeTaskConfig(batch_size=size, batch_tokens=tokens))
        batches = [b.tolist() for b in task.batches(0, seed=5)]
        assert batches == [b.tolist() for b in task.batches(0, seed=5)]
        for b in batches:
            cache.grid_of(b)  # raises for a batch that mixes token grids
        return batches

    assert epoch(32) == epoch(None)  # 32 tokens: 2 of every grid here, as batch_size 2
    by_grid = sorted((cache.grid_of(b), len(b)) for b in epoch(48, size=7))  # batch_size is not used
    assert by_grid == [((3, 5), 3), ((4, 4), 3)]
    singles = epoch(10)
    assert sorted(len(b) for b in singles) == [1] * 9 and len({i for b in singles for i in b}) == 9


@pytest.mark.parametrize(
    ("value", "line"),
    [
        (0, "compose.batch_tokens: must be an integer >= 1 (or null: batch_size) (got 0)"),
        (-3, "compose.batch_tokens: must be an integer >= 1 (or null: batch_size) (got -3)"),
        (2.5, "compose.batch_tokens: must be an integer or null (got 2.5)"),
        ("many", "compose.batch_tokens: must be an integer or null (got 'many')"),
    ],
)
def test_a_bad_batch_tokens_is_one_line(tmp_path, value, line):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d", "out": "o", "compose": {"batch_tokens": value}}))
    result = invoke_cli(["train", str(path)])
    assert result.exit_code == 2 and line in result.output and "Traceback" not in result.output, result.output


def test_stage_1_trains_on_three_buckets_and_its_previews_span_two(world, tmp_path):
    """`mpp train` stage 1 on the tiny FLUX replica with `buckets: auto` (the default): the caches are bucketed at
    the largest square within the largest target (96 x 48 -> 64^2 = SPEC), the stage-1 step runs on batches of three
    grids, and the heldout previews are of two."""
    root, data, md, _ = world
    clip = shutil.copytree(md.image_clip, tmp_path / "clip")
    dino = shutil.copytree(md.image_dino, tmp_path / "dino")
    recipe = {
        "model": str(write_flux_replica(root.parent / "replicas")),
        "data": str(data),
        "out": str(tmp_path / "run"),
        "stage": "1",
        "max_refs": MAX_REFS,
        "max_text_tokens": TEXT,
        "adapter_dir": str(tmp_path / "adapter"),
        "init_adapter": {"clip": str(clip), "dino": str(dino)},
        "trainer": {"max_steps": 3, "progress": False, "tensorboard": False, "log_every": 1},
        "compose": {"batch_size": 2, "sample_steps": 1, "num_preview": 2, "aux_prob": 1.0, "region_prob": 1.0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = invoke_cli(["train", str(tmp_path / "r.yaml")])
    assert result.exit_code == 0, result.output
    train = read_index(tmp_path / "run" / "cache" / "train")
    assert train["meta"]["buckets"] == "auto" and train["meta"]["image_encoders"].startswith("clip ")
    assert {tuple(b["grid"]): b["samples"] for b in train["buckets"]} == {(3, 5): 3, (4, 4): 4, (5, 3): 2}
    assert read_index(tmp_path / "run" / "cache" / "heldout")["buckets"] == [
        {"grid": [3, 5], "samples": 1}, {"grid": [4, 4], "samples": 1}]  # fmt: skip
    assert list((tmp_path / "run" / "samples").glob("*.png"))
    assert (tmp_path / "run" / "checkpoints" / "step-000003").is_dir()


def test_auto_buckets_never_upscale_past_the_largest_target():
    assert BucketSpec.auto(4000 * 3000) == BucketSpec()  # 1024^2, sides x64
    assert BucketSpec.auto(640 * 480) == BucketSpec(area=512 * 512, step=64)  # the largest square within 640 x 480
    assert (512, 512) in BucketSpec.auto(640 * 480).buckets
    assert BucketSpec.auto(96 * 48) == SPEC and BucketSpec.auto(1) == BucketSpec(area=256, step=16)


def test_a_cache_of_other_image_encoders_is_refused(world, tmp_path):
    """The cache key names the adapter's CLIP / DINOv2 by content: the same weights in another folder reuse the
    cache; other weights of the same size in the same folder are refused with "delete it to rebuild"."""
    _, data, md, enc = world
    recipe = Recipe(model=str(md.root), data=str(data), out=str(tmp_path / "run"), max_refs=MAX_REFS,
                    max_text_tokens=TEXT, buckets={"area": 4096, "step": 16})  # fmt: skip
    encoders = CacheEncoders(md, "cpu")
    encoders.loaded = dict(enc.loaded)  # the encoders of this model dir, already loaded
    built = cached_features(recipe, "train", encoders, limit=2, patches=False)
    assert read_index(built.root)["meta"]["buckets"] == "4096/16/4"
    moved = shutil.copytree(md.image_dino, tmp_path / "dino-copy")
    assert encoder_fingerprint(moved) == encoder_fingerprint(md.image_dino)
    assert cached_features(recipe, "train", encoders, limit=2, patches=False).root == built.root  # reused
    weights = next(moved.glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) + 1 for k in fh.keys()}  # noqa: SIM118
    save_file(tensors, str(weights), metadata={"format": "pt"})
    encoders.model_dir = replace(md, image_dino=moved)  # the adapter names this DINOv2 folder now
    with pytest.raises(
        WeightsError, match=r"built with image_encoders='clip \w+, dino \w+', not .*delete it to rebuild"
    ):
        cached_features(recipe, "train", encoders, limit=2, patches=False)
    assert open_cache(built.root, MAX_REFS, expect=read_index(built.root)["meta"]) is not None


@pytest.mark.parametrize(
    ("value", "line"),
    [
        ("fast", "buckets: must be auto, native, null (no buckets) or a mapping {area, step, max_ratio} (got 'fast')"),
        ({"area": 100}, "buckets: need area >= step^2, step a multiple of 16, max_ratio >= 1"),
        ({"step": "64"}, "buckets.step: must be an integer (got '64')"),
        ({"size": 3}, "buckets.size: unknown key (known: area, step, max_ratio)"),
    ],
)
def test_a_bad_buckets_field_is_one_line(tmp_path, value, line):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "data": "d", "out": "o", "buckets": value}))
    result = invoke_cli(["train", str(path)])
    assert result.exit_code == 2 and line in result.output, result.output
