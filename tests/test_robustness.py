"""Robustness under bad input and faults: fuzzed scene files, corrupt / pickled checkpoints, NaN / Inf inputs,
out-of-memory, and a training run killed with SIGKILL in the middle of writing a checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import MppError, ValidationError, WeightsError
from moviepostproduction.files import load_safetensors, read_metadata, save_safetensors, staged_copy
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.resources import (
    ModelDims,
    Request,
    ResourceError,
    memory_guard,
    minimum_bytes,
    preflight,
    require_finite,
    run_guarded,
)
from moviepostproduction.scene import Scene, load_scene, scene_from_dict
from moviepostproduction.toyworld.tiny import tiny_random_model_dir
from moviepostproduction.training.checkpoints import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
# Derandomized so CI sees the same 200 examples each run; MPP_FUZZ_RANDOM=1 explores new ones.
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=not os.environ.get("MPP_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_random_model_dir(tmp_path_factory.getbasetemp() / "shared-tiny")


# ------------------------------------------------------------------------------------ scene fuzzing
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    """Image files of every kind a scene can point at: fine, corrupt, truncated, a folder, missing."""
    folder = tmp_path_factory.mktemp("fuzz")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "good.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (folder / "truncated.png").write_bytes((folder / "good.png").read_bytes()[:30])
    (folder / "dir.png").mkdir()
    return folder


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
NUMBER = st.integers(-5, 2**70) | st.floats() | st.sampled_from([0, 1, 0.5, 16, 1024, 2048, -16])
IMAGE = st.sampled_from(["good.png", "corrupt.png", "truncated.png", "dir.png", "missing.png", "", " ", "a\nb.png"])
REF = st.fixed_dictionaries(
    {},
    optional={
        "image": IMAGE | JSON,
        "bbox": st.lists(NUMBER | JSON, max_size=6) | JSON,
        "depth": st.sampled_from(["fg", "mg", "bg", "top", "FG"]) | JSON,
        "caption": st.text(max_size=10) | JSON,
        "extra": JSON,
        "imgae": JSON,
    },
)
SCENE = st.fixed_dictionaries(
    {},
    optional={
        "caption": st.text(max_size=20) | JSON,
        "width": NUMBER | JSON,
        "height": NUMBER | JSON,
        "seed": NUMBER | JSON,
        "panorama": st.booleans() | JSON,
        "refs": st.lists(REF | JSON, max_size=4) | JSON,
        "captoin": JSON,
    },
)


def check_rejection(err: MppError, source: str | None = None) -> None:
    """A rejection is one line per problem, each naming its field (or the file) first."""
    lines = str(err).splitlines()
    if isinstance(err, ValidationError):
        assert err.problems and len(lines) == len(err.problems)
        prefix = f"{source}: " if source else ""
        for line, problem in zip(lines, err.problems, strict=True):
            assert problem.field and line == prefix + str(problem)
    else:
        assert len(lines) == 1


def check_scene(scene: Scene) -> None:
    """What every accepted scene guarantees, and that it round-trips through its plain form."""
    assert scene.caption.strip() and scene.width % 16 == 0 and scene.height % 16 == 0 and scene.width > 0
    for ref in scene.refs:
        assert all(0.0 <= v <= 1.0 for v in ref.bbox) and ref.bbox[1] < ref.bbox[3]
        assert ref.bbox[0] < ref.bbox[2] or (scene.panorama and ref.wraps)
        assert ref.image.is_file()
    assert scene_from_dict(scene.to_dict(), base_dir=scene.base_dir) == scene


@FUZZ
@given(data=SCENE | JSON, max_refs=st.integers(0, 5))
@example(data={"caption": "a key with a line break", "ke\ny": 1}, max_refs=1)  # found by this test
@example(data={"caption": "c", "refs": [{"image": "a\nb.png", "bbox": [0, 0, 1, 1]}]}, max_refs=1)
@example(data={"caption": "a panorama at the default size", "panorama": True}, max_refs=0)  # found by this test
def test_fuzzed_scene_data_is_accepted_or_rejected_line_by_line(image_dir, data, max_refs):
    try:
        scene = scene_from_dict(data, base_dir=image_dir, max_refs=max_refs)
    except ValidationError as err:
        check_rejection(err)
    else:
        check_scene(scene)


def scene_text(data: object, suffix: str, cut: int | None) -> str:
    text = json.dumps(data) if suffix == ".json" else yaml.safe_dump(data)
    return text if cut is None else text[:cut]


@FUZZ
@given(
    data=SCENE,
    suffix=st.sampled_from([".json", ".yaml"]),
    cut=st.none() | st.integers(0, 60),
    noise=st.none() | st.text(max_size=30),
)
def test_fuzzed_scene_files_never_crash(image_dir, data, suffix, cut, noise):
    path = image_dir / f"scene{suffix}"
    path.write_text(noise if noise is not None else scene_text(data, suffix, cut), encoding="utf-8")
    try:
        scene = load_scene(path)
    except MppError as err:
        check_rejection(err, source=str(path))
    else:
        check_scene(scene)


# ------------------------------------------------------------------------------------ checkpoints
class Payload:
    """Unpickling this runs code (it creates a file): what a malicious .ckpt does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def write_case(path: Path, case: str) -> Path:
    tensors = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8)}
    if case == "torch-save":  # a torch.save zip under a .safetensors name
        torch.save(tensors, path)
    elif case == "raw-pickle":
        path.write_bytes(pickle.dumps(Payload(path.with_name("pwned"))))
    elif case == "truncated":
        save_safetensors(tensors, path)
        path.write_bytes(path.read_bytes()[:-40])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "huge-header":  # a header length far beyond the file
        path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    elif case == "bad-header":
        path.write_bytes((7).to_bytes(8, "little") + b"{not js")
    return path


@pytest.mark.parametrize("case", ["torch-save", "raw-pickle", "truncated", "empty", "huge-header", "bad-header"])
def test_corrupt_and_pickled_checkpoints_are_refused_in_one_line(tmp_path, case):
    path = write_case(tmp_path / "model.safetensors", case)
    with pytest.raises(WeightsError) as err:
        load_safetensors(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if case in ("torch-save", "raw-pickle"):
        assert message == f"{path}: is a pickle/torch.save file, not safetensors; refusing to unpickle it"
    else:
        assert "truncated or corrupt safetensors file" in message
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_metadata(path)
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


@pytest.mark.parametrize("mask", [0o022, 0o007])
def test_saved_safetensors_get_the_umask_mode_not_0600(tmp_path, mask):
    """safetensors itself creates 0600 files: an exported model dir on a shared disk would be unreadable to the
    rest of the team. The atomic writer gives its files the mode any file the process creates would get."""
    old = os.umask(mask)
    try:
        path = save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(plain.stat().st_mode & 0o777) == oct(0o666 & ~mask)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left behind


def folder_files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture
def source_folder(tmp_path) -> Path:
    src = tmp_path / "src"
    for name, text in {"model_index.json": "{}", "vae/config.json": "v", "adapter/config.json": "a"}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


def test_staged_copy_renames_the_finished_folder_into_place(source_folder, tmp_path):
    out = tmp_path / "sub" / "out"
    with staged_copy(source_folder, out, leave_out=("adapter",)) as tmp:
        assert not out.exists() and tmp.parent == out.parent  # built beside, under another name
        assert sorted(folder_files(tmp)) == ["model_index.json", "vae/config.json"]
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "config.json").write_text("new")
    assert folder_files(out) == {"adapter/config.json": b"new", "model_index.json": b"{}", "vae/config.json": b"v"}
    assert [p.name for p in out.parent.iterdir()] == ["out"]  # no temporary folder left


def test_staged_copy_that_fails_leaves_the_old_folder_whole_and_no_temporary_one(source_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(source_folder, out)
    before = folder_files(out)
    with (
        pytest.raises(RuntimeError, match="killed"),
        staged_copy(source_folder, out, leave_out=("adapter",), replace=True) as tmp,
    ):
        (tmp / "vae" / "config.json").write_text("half written")
        raise RuntimeError("killed")
    assert folder_files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    with staged_copy(source_folder, out, replace=True) as tmp:  # replace=True: the new one takes its place
        (tmp / "vae" / "config.json").write_text("v2")
    assert folder_files(out)["vae/config.json"] == b"v2"


def test_staged_copy_refuses_an_existing_folder_before_copying(source_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(WeightsError) as err, staged_copy(source_folder, out):
        raise AssertionError("the block must not run")
    assert str(err.value) == f"{out} exists; pick a new directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth", ".pkl"])
def test_pickle_suffixes_are_refused_before_the_file_is_opened(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps(Payload(tmp_path / "pwned")))
    with pytest.raises(WeightsError) as err:
        load_safetensors(path, "the adapter weights")
    assert str(err.value) == (
        f"{path}: refusing a pickle checkpoint ({suffix}); expected the adapter weights (.safetensors)"
    )
    assert not (tmp_path / "pwned").exists()


def test_model_dir_with_a_disguised_torch_save_file_is_refused(model_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    file = broken / "vae" / "diffusion_pytorch_model.safetensors"
    write_case(file, "torch-save")
    with pytest.raises(WeightsError) as err:
        ModelDir.at(broken).check()
    assert str(err.value).startswith(f"model dir {broken}: {file} is truncated or corrupt (")
    assert "\n" not in str(err.value)


def test_incomplete_training_checkpoint_folder_is_refused(tmp_path):
    store = CheckpointStore(tmp_path)
    folder = store.save(3, {"net.w": torch.ones(2)}, {}, {"step": 3})
    (folder / "state.json").unlink()
    assert store.latest() is None
    with pytest.raises(WeightsError, match=r"not a complete checkpoint folder \(missing state.json\)"):
        CheckpointStore.load(folder)


# ------------------------------------------------------------------------------------ NaN / Inf
def test_require_finite_names_each_bad_input_on_its_own_line():
    good = torch.zeros(2, 3)
    nan = torch.tensor([[float("nan"), 1.0, float("inf")]])
    inf = torch.full((4,), float("-inf"))
    require_finite(latents=good, missing=None, ids=torch.arange(3))  # ints and None are skipped
    with pytest.raises(ValidationError) as err:
        require_finite(latents=nan, prompt_embeds=good, image_cls=inf)
    assert str(err.value).splitlines() == [
        "latents: must be finite, found 1 NaN and 1 Inf values (got 'shape (1, 3)')",
        "image_cls: must be finite, found 0 NaN and 4 Inf values (got 'shape (4,)')",
    ]


@pytest.fixture(scope="module")
def compose_pipe(model_dir):
    from moviepostproduction.compose.pipeline import ComposePipeline

    return ComposePipeline.from_model_dir(model_dir)


def count_forwards(pipe) -> list:
    calls = []
    handle = pipe.model.transformer.x_embedder.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_nan_latents_are_rejected_before_the_first_model_call(compose_pipe):
    scene = load_scene(ROOT / "examples" / "scene.json")
    small = scene_from_dict({**scene.to_dict(), "width": 32, "height": 32}, base_dir=scene.base_dir)
    calls, handle = count_forwards(compose_pipe)
    try:
        with pytest.raises(ValidationError) as err:
            compose_pipe(small, num_inference_steps=2, latents=torch.full((1, 4, 64), float("nan")))
    finally:
        handle.remove()
    assert str(err.value) == "latents: contains non-finite values (got 'NaN/Inf')" and calls == []


def test_nan_prompt_embeds_are_rejected_before_panorama_sampling(compose_pipe):
    from moviepostproduction.panorama.pipeline import PanoramaPipeline

    text = compose_pipe.text_encoder.encode(["a sky"])
    embeds = text.t5.clone()
    embeds[0, 0, 0] = float("nan")
    pano = PanoramaPipeline(compose_pipe.model, compose_pipe.vae)
    calls, handle = count_forwards(compose_pipe)
    try:
        with pytest.raises(ValidationError, match=r"^prompt_embeds: must be finite, found 1 NaN and 0 Inf values"):
            run_guarded(
                Request("panorama", 32, 64),
                lambda: pano(prompt_embeds=embeds, pooled_prompt_embeds=text.pooled, height=32, num_inference_steps=2),
                inputs={"prompt_embeds": embeds, "pooled_prompt_embeds": text.pooled},
            )
    finally:
        handle.remove()
    assert calls == []


def test_nan_reference_features_are_rejected_before_sampling(compose_pipe, monkeypatch):
    """A reference encoder that returns NaN (e.g. a broken fp16 run) stops the compose before sampling."""
    scene = load_scene(ROOT / "examples" / "scene.json")
    small = scene_from_dict({**scene.to_dict(), "width": 32, "height": 32}, base_dir=scene.base_dir)
    original = compose_pipe.image_encoder.encode

    def broken(images):
        out = original(images)
        out.dino_cls[0, 0] = float("inf")
        return out

    compose_pipe._ref_cache.clear()
    monkeypatch.setattr(compose_pipe.image_encoder, "encode", broken)
    calls, handle = count_forwards(compose_pipe)
    try:
        with pytest.raises(ValidationError, match=r"^refs \(DINO features\): contains non-finite values"):
            compose_pipe(small, num_inference_steps=2)
    finally:
        handle.remove()
        compose_pipe._ref_cache.clear()
    assert calls == []


# ------------------------------------------------------------------------------------ out of memory
TINY_DIMS = ModelDims(hidden=32, text_tokens=16, vae_channels=8, bytes_per_value=4, weights_bytes=10_000_000)
OOM_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity)"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to allocate"),
]


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["cuda", "MemoryError", "cpu-allocator"])
def test_out_of_memory_becomes_one_actionable_line(error):
    request = Request("compose", 1024, 768, refs=3, device="cuda:0")
    with pytest.raises(ResourceError) as err, memory_guard(request):
        raise error
    assert str(err.value) == (
        "out of memory during compose at 1024x768 (height x width) with 3 refs on cuda:0; try a smaller size such "
        "as 720x528, fewer than 3 refs or a lower-precision dtype"
    )
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_other_runtime_errors_pass_through_the_guard():
    with pytest.raises(RuntimeError, match="shape mismatch"), memory_guard(Request("compose", 64, 64)):
        raise RuntimeError("shape mismatch")


def test_preflight_refuses_absurd_sizes_and_suggests_one_that_fits():
    gib = 1024**3
    request = Request("compose", 100_000, 100_000, refs=2, device="cpu")
    with pytest.raises(ResourceError) as err:
        preflight(request, TINY_DIMS, capacity=8 * gib)
    message = str(err.value)
    assert message.startswith("compose at 100000x100000 (height x width) with 2 refs on cpu needs at least ")
    assert "(VAE decoding at full resolution), more than the 8.0 GiB of cpu memory; try at most " in message
    side = int(message.split("try at most ")[1].split("x")[0])
    assert minimum_bytes(Request("compose", side, side), TINY_DIMS)[0] <= 8 * gib
    assert minimum_bytes(Request("compose", side + 16, side + 16), TINY_DIMS)[0] > 8 * gib
    # A lower bound never refuses what fits: FLUX.1-dev in bf16 at 1024 x 1024 on an 80 GB GPU.
    flux = ModelDims(weights_bytes=int(33.5 * gib))
    preflight(Request("compose", 1024, 1024, refs=50, device="cuda"), flux, capacity=80 * gib)
    with pytest.raises(ResourceError, match="the weights alone need 33.5 GiB"):
        preflight(Request("compose", 1024, 1024, device="cuda"), flux, capacity=24 * gib)


def test_preflight_runs_before_any_allocation(monkeypatch):
    calls = []
    with pytest.raises(ResourceError):
        run_guarded(Request("vary", 100_000, 100_000), lambda: calls.append(1), dims=TINY_DIMS, capacity=1024**3)
    assert calls == []


def write_scene(folder: Path, width: int, height: int) -> Path:
    shutil.copytree(ROOT / "examples" / "refs", folder / "refs", dirs_exist_ok=True)
    refs = [{"image": "refs/red_circle.png", "bbox": [0.1, 0.2, 0.5, 0.9], "depth": "fg"},
            {"image": "refs/blue_square.png", "bbox": [0.5, 0.1, 0.9, 0.5], "depth": "bg"}]  # fmt: skip
    path = folder / "scene.json"
    path.write_text(json.dumps({"caption": "two shapes", "width": width, "height": height, "refs": refs}))
    return path


def test_cli_compose_out_of_memory_exits_2_with_one_line(model_dir, tmp_path, monkeypatch):
    from moviepostproduction.compose.pipeline import ComposePipeline

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(ComposePipeline, "__call__", oom)
    scene = write_scene(tmp_path, 64, 48)
    result = CliRunner().invoke(app, ["compose", str(scene), "-o", str(tmp_path / "o.png"), "--model", str(model_dir)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: out of memory during compose at 48x64 (height x width) with 2 refs on cpu; try a smaller size such "
        "as 32x32, fewer than 2 refs or a lower-precision dtype"
    ]


def test_cli_compose_refuses_an_absurd_size_before_loading_weights(tmp_path):
    scene = write_scene(tmp_path, 100_000, 100_000)
    result = CliRunner().invoke(
        app, ["compose", str(scene), "-o", str(tmp_path / "o.png"), "--model", str(tmp_path / "no-model")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: compose at 100000x100000 (height x width) with 2 refs on cpu needs at least ")
    assert "fewer refs" in line  # it never got to the missing model dir


def test_cli_panorama_reports_out_of_memory_in_one_line(model_dir, tmp_path, monkeypatch):
    from moviepostproduction.panorama.pipeline import PanoramaPipeline

    def oom(self, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1099511627776 bytes")

    monkeypatch.setattr(PanoramaPipeline, "__call__", oom)
    args = ["panorama", "-o", str(tmp_path / "p.png"), "--caption", "sky", "--height", "32", "--model", str(model_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [
        "error: out of memory during panorama at 32x64 (height x width) on cpu; try a smaller size such as 16x32 "
        "or a lower-precision dtype"
    ]


def test_comfyui_compose_node_reports_out_of_memory(model_dir, monkeypatch, tmp_path):
    from moviepostproduction.comfyui import NODE_CLASS_MAPPINGS
    from moviepostproduction.compose.pipeline import ComposePipeline

    monkeypatch.setenv("MPP_CACHE", str(tmp_path))
    node = NODE_CLASS_MAPPINGS["MPPLoadModel"]()
    (model,) = node.load(model_dir=str(model_dir), device="cpu", dtype="fp32")
    scene = load_scene(write_scene(tmp_path, 64, 48))
    monkeypatch.setattr(ComposePipeline, "__call__", lambda self, *a, **k: (_ for _ in ()).throw(MemoryError()))
    compose = NODE_CLASS_MAPPINGS["MPPCompose"]()
    with pytest.raises(ResourceError, match=r"^out of memory during compose at 48x64 \(height x width\) with 2 refs"):
        compose.compose(model=model, scene=scene, steps=2, seed=0, guidance=3.5, true_cfg=1.0)
    huge = scene_from_dict({**scene.to_dict(), "width": 100_000, "height": 100_000}, base_dir=scene.base_dir)
    with pytest.raises(ResourceError, match=r"^compose at 100000x100000 .* needs at least"):
        compose.compose(model=model, scene=huge, steps=2, seed=0, guidance=3.5, true_cfg=1.0)


# ------------------------------------------------------------------------------------ SIGKILL mid-checkpoint
KILL_TASK = '''
import os
import sys

import torch
from torch import nn

from moviepostproduction.training.task import LossOutput
from moviepostproduction.training.trainer import Trainer, TrainConfig

X = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class KillTask:
    """A small regression with data order, noise and dropout: what exact resume has to get right."""

    name = "kill"

    def __init__(self, slow_after: int | None = None):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        self.calls, self.slow_after = 0, slow_after

    def modules(self):
        return {"net": self.net}

    def param_groups(self, stage):
        return [{"params": list(self.net.parameters()), "lr": 0.05}]

    def batches(self, epoch, seed):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed * 100 + epoch))
        for i in range(0, len(X), 3):
            yield X[perm[i : i + 3]], Y[perm[i : i + 3]]

    def loss(self, batch, generator):
        self.calls += 1
        if self.slow_after is not None and self.calls > self.slow_after:
            os.environ["MPP_TEST_SLOW_CHECKPOINT"] = "60"  # later saves stall between their files and state.json
        x, y = batch
        pred = self.net(x + 0.01 * torch.randn(x.shape, generator=generator))
        return LossOutput(((pred - y) ** 2).mean())

    def samples(self, generator):
        return None


def config(out_dir, max_steps=9):
    return TrainConfig(out_dir=str(out_dir), stage="all", max_steps=max_steps, checkpoint_every=3, log_every=3,
                       progress=False, tensorboard=False)


if __name__ == "__main__":
    Trainer(KillTask(slow_after=3), config(sys.argv[1])).run()
'''


def load_kill_task(folder: Path):
    import importlib.util

    path = folder / "kill_task.py"
    path.write_text(KILL_TASK)
    spec = importlib.util.spec_from_file_location("kill_task", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def test_run_killed_mid_checkpoint_resumes_from_the_last_complete_one_with_nothing_lost(tmp_path):
    from moviepostproduction.training.trainer import Trainer

    kill, script = load_kill_task(tmp_path)
    out, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("MPP_TEST_SLOW_CHECKPOINT", None)
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stderr=subprocess.PIPE)
    try:  # step 3 is saved normally; the save of step 6 stalls after writing its tensors: kill it there
        deadline = time.monotonic() + 120
        while not list(checkpoints.glob(".tmp-step-000006-*/optimizer.safetensors")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the training subprocess never reached its second checkpoint"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (half,) = checkpoints.glob(".tmp-step-000006-*")
    assert not (half / "state.json").exists()
    store = CheckpointStore(checkpoints)
    assert [p.name for p in store.complete()] == ["step-000003"]

    full = Trainer(kill.KillTask(), kill.config(tmp_path / "full")).run()
    task = kill.KillTask()
    resumed = Trainer(task, kill.config(out)).run()
    assert resumed.losses == full.losses  # bit-exact, step for step: nothing lost, nothing repeated
    assert task.calls == 6  # steps 4-9 only
    assert not half.exists() and [p.name for p in store.complete()] == ["step-000006", "step-000009"]
    end = CheckpointStore.load(full.checkpoint).trainable
    for key, value in CheckpointStore.load(resumed.checkpoint).trainable.items():
        assert torch.equal(value, end[key])


@pytest.mark.parametrize(
    "args, message",
    [
        (["compose", "examples/scene.json", "--seed", "abc", "-o", "x.png"], "Invalid value for '--seed'"),
        (["compose", "examples/scene.json"], "Missing option '-o' / '--output'"),
        (["compose", "examples/scene.json", "-o", "x.png", "--no-such-flag"], "No such option: --no-such-flag"),
        (["no-such-command"], "No such command 'no-such-command'"),
        (["panorama", "--caption", "x", "-o", "p.png", "--height", "1e9"], "Invalid value for '--height'"),
    ],
)
def test_the_cli_parser_refuses_in_one_line_with_exit_2(args, message):
    """Click's own refusals come out like every other bad input: one `error:` line, exit code 2, no usage box."""
    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    result = CliRunner().invoke(app, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_help_and_no_arguments_still_print_the_help():
    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    for args, code in (([], 2), (["--help"], 0), (["compose", "--help"], 0)):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == code and "Usage: mpp" in result.output, (args, result.output)


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--tokens", "1000000000"], "tokens: need counts in [1, 65536]"),
        (["bench", "--refs", "0,100000"], "refs: need counts in [0, 1000]"),
        (["bench", "--repeats", "1000000"], "repeats: must be in [1, 1000]"),
        (["prepare-data", "--out", "{tmp}/d", "--n", "1000000000000"], "n: must be in [1, 10000000]"),
        (["prepare-data", "--out", "{tmp}/d", "--n", "4", "--size", "1000000"], "size: must be in [32, 4096]"),
    ],
)
def test_bench_and_prepare_data_bound_their_sizes_before_any_work(args, message, tmp_path):
    """Counts and sizes that would run for hours (or fill the disk) are refused in one line before work starts."""
    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "d").exists()  # nothing written
