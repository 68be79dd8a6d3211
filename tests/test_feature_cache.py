"""The feature cache at scale: sharded, unpadded, lazily read, resumable, flat in memory (training/feature_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.datasets.prepare import PrepareConfig, write_real_dataset
from moviepostproduction.datasets.problems import Tally
from moviepostproduction.datasets.real_format import RealRef, RealSample, iter_real_samples
from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
from moviepostproduction.errors import WeightsError
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.sampling import pack_latents
from moviepostproduction.toyworld.shards import iter_shards, write_dataset
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import TinySpec, write_tiny_model_dir
from moviepostproduction.training import feature_cache
from moviepostproduction.training.cache_encoders import CacheEncoders
from moviepostproduction.training.feature_cache import build_cache, open_cache, write_cache
from moviepostproduction.training.feature_shards import ShardedFeatures, read_index, sample_bytes

TEXT = 48
SIZES = {"max_text_tokens": TEXT, "batch_size": 2, "shard_size": 3, "progress": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature-cache")
    md = ModelDir.at(write_tiny_model_dir(root / "model"))
    write_dataset(root / "data", 7, 1, ToyWorldConfig(size=32, ref_size=16, max_refs=3), heldout_frac=0.0, shard_size=4)
    encoders = CacheEncoders.wrap(TextEncoder.load(md), ImageEncoder.load(md), Vae.load(md))
    return root / "data" / "train", md, encoders


def shard_tensor_bytes(root: Path) -> int:
    total = 0
    for file in sorted(root.glob("shard-*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            total += sum(fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys())  # noqa: SIM118
    return total


def test_the_round_trip_equals_the_encoders_output(world, tmp_path):
    """Every stored row is what the encoders give for that sample alone (batches of 1 here, so no batching
    rounding), in the stored 16 bits; a ref's caption span is its T5 token range."""
    shards, md, enc = world
    reader = write_cache(shards, tmp_path / "c", enc, meta={}, max_refs=3, **{**SIZES, "batch_size": 1})
    samples = list(iter_shards(shards))
    assert len(reader) == len(samples) == 7 and len(reader.shards) == 3  # shards of 3, 3, 1
    with torch.no_grad():
        for i, s in enumerate(samples):
            got = reader.sample(i)
            pixels = torch.from_numpy(s.scene).permute(2, 0, 1).float()[None] / 127.5 - 1.0  # (1, 3, H, W)
            assert torch.equal(got["latents"], pack_latents(enc.vae.encode(pixels)).half())
            text, spans, _ = enc.text.encode_spans(s.caption, s.ref_captions, TEXT)
            assert torch.equal(got["t5"], text.t5.half()) and torch.equal(got["pooled"], text.pooled)
            image = enc.image.encode([Image.fromarray(r) for r in s.refs])
            assert got["ref_counts"].tolist() == [len(s.refs)]
            assert torch.equal(got["clip"], image.clip.half()) and torch.equal(got["dino"], image.dino_cls.half())
            assert torch.equal(got["dino_patches"], image.dino_patches.half())  # (r, P, G)
            assert got["spans"].tolist() == [list(span) for span in spans]
            assert torch.equal(got["bboxes"], torch.from_numpy(s.bboxes).float())
    assert read_index(tmp_path / "c")["info"] == {"device": "cpu", "dtype": "float32"}  # fp32 encoders, fp16 stored


def test_no_padding_is_stored_and_batches_are_padded_when_collated(world, tmp_path):
    """Bytes on disk follow the refs each scene has, not max_refs: max_refs 3 and 12 write the same bytes, which are
    `sample_bytes` summed over the samples (+ one offset per shard); a batch is padded to max_refs with zeros."""
    shards, md, enc = world
    small = write_cache(shards, tmp_path / "r3", enc, meta={}, max_refs=3, **SIZES)
    large = write_cache(shards, tmp_path / "r12", enc, meta={}, max_refs=12, **SIZES)
    lean = write_cache(shards, tmp_path / "lean", enc, meta={}, max_refs=12, patches=False, **SIZES)
    refs = [int(large.sample(i)["ref_counts"]) for i in range(len(large))]
    assert len(set(refs)) > 1  # scenes with different numbers of refs
    spec, (h, w) = TinySpec(), large.grid
    dims = dict(latent_tokens=h * w, latent_dim=4 * spec.latent_channels, text_tokens=TEXT, t5_dim=spec.t5_dim)
    dims |= dict(pooled_dim=spec.clip_text_dim, clip_dim=spec.clip_image_dim, dino_dim=spec.dino_dim)
    patches = (spec.image_size // spec.patch_size) ** 2
    want = sum(sample_bytes(**dims, refs=r, patch_tokens=patches) for r in refs) + 8 * len(large.shards)
    assert shard_tensor_bytes(tmp_path / "r3") == shard_tensor_bytes(tmp_path / "r12") == want
    no_patches = sum(sample_bytes(**dims, refs=r) for r in refs) + 8 * len(lean.shards)
    assert shard_tensor_bytes(tmp_path / "lean") == no_patches and not lean.has_patches
    batch = large.select(torch.arange(len(large)))
    assert batch["dino_patches"].shape == (7, 12, patches, spec.dino_dim) and batch["spans"].shape == (7, 12, TEXT)
    assert batch["valid"].sum(1).tolist() == refs
    assert (batch["dino_patches"].flatten(2).abs().sum(-1) > 0).eq(batch["valid"]).all()  # padded refs hold zeros
    for name, value in small.select(torch.arange(7)).items():  # the same features, padded to fewer refs
        assert torch.equal(value, batch[name][:, :3] if value.dim() > 1 and value.shape[1] == 3 else value), name
    memory = build_cache(shards, enc.text, enc.image, enc.vae, max_refs=12, max_text_tokens=TEXT, batch_size=2)
    for name in memory.fields:  # the in-memory build of a small set (same batches of 2) holds the same batch
        assert torch.equal(memory.select(torch.arange(7))[name], batch[name]), name
    assert "dino_patches" not in lean.select(torch.arange(2))


def test_the_lazy_reader_opens_only_the_shard_it_reads(world, tmp_path):
    shards, md, enc = world
    write_cache(shards, tmp_path / "c", enc, meta={}, max_refs=3, **SIZES)
    reader = ShardedFeatures(tmp_path / "c", max_refs=3)
    batch = reader.select(torch.tensor([4, 3]))  # both in the second shard
    assert reader.ever_opened == {"shard-000001.safetensors"} and batch["latents"].shape[0] == 2
    (tmp_path / "c" / "shard-000000.safetensors").unlink()  # the other shards are never read
    assert torch.equal(reader.select(torch.tensor([5]))["t5"], ShardedFeatures(tmp_path / "c", 3).select([5])["t5"])
    with pytest.raises(WeightsError, match=r"shard-000000.safetensors: missing or corrupt cache shard .* to rebuild"):
        reader.sample(0)


def test_an_interrupted_build_resumes_after_its_last_complete_shard(world, tmp_path, monkeypatch):
    shards, md, enc = world
    sizes = {**SIZES, "batch_size": 1}  # batches of 1: the resumed build's VAE batches are the fresh one's
    fresh = write_cache(shards, tmp_path / "fresh", enc, meta={"model": "m"}, max_refs=3, **sizes)
    encode, seen = feature_cache.encode_samples, []

    def interrupted(samples, *args):  # the 5th sample never finishes: shard 0 (3 samples) is complete, the 4th lost
        if len(seen) == 4:
            raise KeyboardInterrupt
        seen.append(len(samples))
        return encode(samples, *args)

    monkeypatch.setattr(feature_cache, "encode_samples", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_cache(shards, tmp_path / "c", enc, meta={"model": "m"}, max_refs=3, **sizes)
    index = read_index(tmp_path / "c")
    assert not index["complete"] and [s["samples"] for s in index["shards"]] == [3]
    assert open_cache(tmp_path / "c", 3, expect={"model": "m"}) is None  # still to be built
    with pytest.raises(WeightsError, match="incomplete"):
        ShardedFeatures(tmp_path / "c", 3)
    with pytest.raises(WeightsError, match="built with model='m', not 'other'; delete it to rebuild"):
        write_cache(shards, tmp_path / "c", enc, meta={"model": "other"}, max_refs=3, **SIZES)
    seen.clear()
    monkeypatch.setattr(feature_cache, "encode_samples", lambda s, *a: seen.append(len(s)) or encode(s, *a))
    resumed = write_cache(shards, tmp_path / "c", enc, meta={"model": "m"}, max_refs=3, **sizes)
    assert sum(seen) == 4  # samples 3..6 only
    everything = torch.arange(7)
    for name, value in resumed.select(everything).items():
        assert torch.equal(value, fresh.select(everything)[name]), name
    assert open_cache(tmp_path / "c", 3, expect={"model": "m"}) is not None


def real_dataset(out: Path, sizes: list[tuple[int, int]]) -> Path:
    """A real-format data set (datasets/real_format.py): scene i of (width, height) sizes[i] with i % 3 RGBA refs."""
    rng, items = np.random.default_rng(0), []
    for i, (width, height) in enumerate(sizes):
        refs = [RealRef(rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), (0.1, 0.2, 0.5, 0.9), "fg", f"thing {k}")
                for k in range(i % 3)]  # fmt: skip
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        items.append((f"img{i}.png", RealSample("", image, f"scene {i}", refs, {})))
    config = PrepareConfig(heldout_frac=0.0, shard_size=2, lossless=True)
    write_real_dataset(out, items, config=config, tally=Tally(), source={"kind": "test"})
    return out / "train"


def test_real_data_shards_are_cached_as_the_toy_ones(world, tmp_path):
    """The real-data format (RGBA crops, refs with captions, scenes without refs) caches through the same
    path, its RGBA refs encoded as the encoder sees them at inference; a split of mixed sizes is one line."""
    _, md, enc = world
    shards = real_dataset(tmp_path / "real", [(48, 32)] * 5)
    reader = write_cache(shards, tmp_path / "c", enc, meta={}, max_refs=3, **{**SIZES, "batch_size": 1})
    assert len(reader) == 5 and reader.grid == (2, 3)
    with torch.no_grad():
        for i, s in enumerate(iter_real_samples(shards)):
            got = reader.sample(i)
            assert got["ref_counts"].tolist() == [i % 3] and got["bboxes"].shape == (i % 3, 4)
            if s.refs:
                image = enc.image.encode([Image.fromarray(r.crop) for r in s.refs])  # RGBA, composited over white
                assert torch.equal(got["dino_patches"], image.dino_patches.half())
    mixed = real_dataset(tmp_path / "mixed", [(48, 32), (32, 48), (48, 32)])
    with pytest.raises(
        WeightsError,
        match=r"token grid 3x2 differs from the cache's 2x3: every scene of a split .* buckets: recipe `buckets:`",
    ):
        write_cache(mixed, tmp_path / "m", enc, meta={}, max_refs=3, **{**SIZES, "batch_size": 1})


def test_an_old_single_file_cache_is_refused_with_the_command_that_rebuilds_it(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "train.safetensors").write_bytes(b"old")
    with pytest.raises(WeightsError, match=r"old single-file format .*: rm .*train.safetensors and run mpp train"):
        open_cache(tmp_path / "cache" / "train", 4, expect={})


def test_an_unusable_cache_device_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {tmp_path}/m\ndata: {tmp_path}/d\nout: {tmp_path}/o\ncache_device: tpu\n")
    bad = CliRunner().invoke(app, ["train", str(recipe)])
    assert bad.exit_code == 2 and "cache_device: must be auto, cpu, cuda, cuda:N or mps (got 'tpu')" in bad.output
    recipe.write_text(f"model: {tmp_path}/m\ndata: {tmp_path}/d\nout: {tmp_path}/o\n")
    flag = CliRunner().invoke(app, ["train", str(recipe), "--cache-device", "cuda:99"])
    lines = flag.output.strip().splitlines()
    assert flag.exit_code == 2 and len(lines) == 1 and "--cache-device" in lines[0] and "'cuda:99'" in lines[0]
    assert "Traceback" not in flag.output


def test_peak_rss_of_the_build_is_flat_as_the_samples_double(tmp_path):
    """N and 2N samples, each built alone in a fresh process (tests/cache_build_rss.py; the two run side by side).
    The 2N cache is ~34 MB larger (T5 states of 1024 tokens x 256, 0.5 MB a sample): a build that held the cache in
    memory would peak at least that much higher. The bound is half the extra cache (~17 MB). glibc's mmap threshold is
    pinned at 128 KiB: left dynamic, it keeps freed 1 MB buffers in the heap and the RSS wanders by up to 35 MB
    between shards (measured) whatever the sample count; pinned, the RSS after each shard stays within 2 MB over 384
    samples, so the peaks compare live memory. Measured: 565.7 vs 566.4 MB; the in-memory `build_cache` of the same
    samples peaks at 669.5 vs 838.9 MB."""
    model = write_tiny_model_dir(tmp_path / "model", spec=TinySpec(t5_dim=256))
    world = ToyWorldConfig(size=32, ref_size=16, max_refs=2)
    write_dataset(tmp_path / "data", 128, 0, world, heldout_frac=0.0, shard_size=64)
    probe = Path(__file__).with_name("cache_build_rss.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                str(probe),
                str(model),
                str(tmp_path / "data" / "train"),
                str(tmp_path / f"c{n}"),
                str(n),
                "1024",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )  # fmt: skip
        for n in (64, 128)
    ]
    small, large = (json.loads(run.communicate(timeout=300)[0].strip().splitlines()[-1]) for run in runs)
    assert (small["samples"], large["samples"]) == (64, 128)
    extra = large["cache_bytes"] - small["cache_bytes"]
    assert extra > 30e6
    assert large["peak_rss"] - small["peak_rss"] < extra / 2, (small, large)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_encoders_run_in_bf16_and_the_cache_stores_bf16(world, tmp_path):
    shards, md, cpu = world
    reader = write_cache(shards, tmp_path / "c", CacheEncoders(md, "cuda"), meta={}, max_refs=3, **SIZES)
    assert read_index(tmp_path / "c")["info"] == {"device": "cuda", "dtype": "bfloat16"}
    reference = write_cache(shards, tmp_path / "cpu", cpu, meta={}, max_refs=3, **SIZES)
    got, want = reader.sample(0), reference.sample(0)
    assert got["t5"].dtype == torch.bfloat16 and want["t5"].dtype == torch.float16
    for name in ("latents", "t5", "clip", "dino", "dino_patches"):
        torch.testing.assert_close(got[name].float(), want[name].float(), atol=0.1, rtol=0.05)
