"""Outputs under faults (docs/robustness.md, "Numbers, outputs and pre-flight"): a full disk, a read-only folder, an
existing folder as the file, a parent that cannot be created. Every writer fails with one line naming the path,
leaves an earlier file at that path as it was and no temporary file beside it; the CLI refuses a bad output path
before loading any weights; two writers of one path at once both succeed and leave a whole file."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.compose.pipeline import ComposeOutput, ComposePipeline
from moviepostproduction.errors import shown_path
from moviepostproduction.files import (
    OutputError,
    check_output,
    load_safetensors,
    save_safetensors,
    staged_copy,
    write_json_atomic,
    write_text_atomic,
)
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.panorama.pipeline import PanoramaPipeline
from moviepostproduction.training.checkpoints import CheckpointStore
from moviepostproduction.vary.pipeline import VaryPipeline
from moviepostproduction.visualize import save_png

from helpers import fuzz

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "examples" / "scene.json"
REF = ROOT / "examples" / "refs" / "red_circle.png"


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.iterdir())}


def image(value: int, size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), (value, 255 - value, 7))


# Each writer with the call underneath it that a fault replaces: it writes half a file, then the disk is full.
def _half_then(exc: OSError):
    def write(*args, **kwargs):
        target = next(a for a in args if isinstance(a, str | Path) and ".tmp" in str(a))
        Path(target).write_bytes(b"half a file")
        raise exc

    return write


WRITERS = {
    "save_png": (lambda p: save_png(image(1), p), "PIL.Image.Image.save"),
    "write_text_atomic": (lambda p: write_text_atomic("new", p), "pathlib.Path.write_text"),
    "write_json_atomic": (lambda p: write_json_atomic({"new": 1}, p), "pathlib.Path.write_text"),
    "save_safetensors": (lambda p: save_safetensors({"w": torch.ones(2)}, p), "safetensors.torch.save_file"),
}
FULL = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", WRITERS)
def test_a_full_disk_keeps_the_earlier_file_and_leaves_no_temporary_file(monkeypatch, tmp_path, writer):
    write, underneath = WRITERS[writer]
    target = tmp_path / "out.bin"
    target.write_bytes(b"the earlier result")
    before = listing(tmp_path)
    if underneath == "pathlib.Path.write_text":  # a method: the fault sees the path as `self`
        monkeypatch.setattr(underneath, lambda self, *a, **k: _half_then(FULL)(self))
    else:
        monkeypatch.setattr(underneath, _half_then(FULL))
    with pytest.raises(OutputError) as err:
        write(target)
    assert str(err.value) == f"cannot write {target}: No space left on device"
    assert listing(tmp_path) == before


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EDQUOT])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_folder_that_refuses_new_files_is_one_line(monkeypatch, tmp_path, writer, code):
    """A read-only folder (root ignores permission bits, so the refusal is simulated where the file is created)."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"the earlier result")

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(kwargs.get("dir", "")))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError) as err:
        WRITERS[writer][0](target)
    assert str(err.value) == f"cannot write {target}: {os.strerror(code)}"
    assert listing(tmp_path) == {"out.bin": b"the earlier result"}


@pytest.mark.parametrize("writer", WRITERS)
def test_an_existing_folder_or_a_file_in_the_way_is_one_line(tmp_path, writer):
    write = WRITERS[writer][0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("kept")
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(OutputError) as err:
        write(tmp_path / "taken")
    assert str(err.value) == f"cannot write {tmp_path / 'taken'}: Is a directory"
    with pytest.raises(OutputError) as err:
        write(tmp_path / "plain" / "sub" / "out.bin")
    assert str(err.value).startswith(f"cannot write {tmp_path / 'plain' / 'sub' / 'out.bin'}: ")
    assert listing(tmp_path) == {"plain": b"a file", "taken": b"<dir>"}
    assert listing(tmp_path / "taken") == {"keep.txt": b"kept"}


# A path built from parts that exist as folders, exist as files, are new, are too long, hold a line break.
PART = st.sampled_from(["dir", "file", "new", "x" * 300, "a\nb", ".", "new2"])


@fuzz(100)
@given(parts=st.lists(PART, min_size=1, max_size=4))
def test_check_output_accepts_exactly_the_paths_a_write_succeeds_on(tmp_path_factory, parts):
    base = tmp_path_factory.mktemp("paths")
    (base / "dir").mkdir()
    (base / "file").write_text("kept")
    path = base.joinpath(*parts)
    before = sorted(str(p) for p in base.rglob("*"))
    try:
        check_output(path)
    except OutputError as err:
        refused = str(err)
        assert len(refused.splitlines()) == 1 and refused.startswith("-o ")
        assert sorted(str(p) for p in base.rglob("*")) == before  # checking creates nothing
    else:
        refused = None
    try:
        save_png(image(3), path)
    except OutputError as err:
        assert refused is not None, f"check_output accepted {path!r}, the write failed: {err}"
        assert len(str(err).splitlines()) == 1
    else:
        assert refused is None, f"check_output refused {path!r}, the write succeeded"
        assert np.asarray(Image.open(path)).shape == (8, 8, 3)
    assert not [p for p in base.rglob("*.tmp")]
    assert path == base / "file" or (base / "file").read_text() == "kept"


# ------------------------------------------------------------------------------------ concurrent writers
def _write_many(path: str, value: int, rounds: int, barrier=None) -> None:
    if barrier is not None:
        barrier.wait()
    for k in range(rounds):
        write_text_atomic(json.dumps({"writer": value, "round": k, "pad": "x" * 50_000}), path)


@pytest.mark.parametrize("writer", ["save_png", "write_text_atomic", "save_safetensors"])
def test_two_threads_writing_one_path_both_succeed_and_leave_a_whole_file(tmp_path, writer):
    path = tmp_path / "same.out"
    barrier, errors = threading.Barrier(2), []
    payloads = {
        "save_png": lambda v: save_png(image(v, 64), path),
        "write_text_atomic": lambda v: write_text_atomic(str(v) * 100_000, path),
        "save_safetensors": lambda v: save_safetensors({"w": torch.full((50_000,), float(v))}, path),
    }

    def run(value: int) -> None:
        barrier.wait()
        try:
            for _ in range(25):
                payloads[writer](value)
        except Exception as exc:  # noqa: BLE001 - reported below, with its type
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    if writer == "save_png":
        assert np.asarray(Image.open(path))[0, 0].tolist() in ([1, 254, 7], [2, 253, 7])
    elif writer == "write_text_atomic":
        assert path.read_text() in ("1" * 100_000, "2" * 100_000)
    else:
        assert load_safetensors(path)["w"].unique().tolist() in ([1.0], [2.0])
    assert [p.name for p in tmp_path.iterdir()] == ["same.out"]


def test_two_processes_writing_one_path_both_succeed_and_leave_a_whole_file(tmp_path):
    path = tmp_path / "same.json"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_many, args=(str(path), v, 40, barrier)) for v in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads(path.read_text())["round"] == 39  # whole: the last round of one of them
    assert [p.name for p in tmp_path.iterdir()] == ["same.json"]


# --------------------------------------------------------------------------- folders: checkpoints, copies
def test_a_checkpoint_save_on_a_full_disk_keeps_the_earlier_one_and_no_temporary_folder(monkeypatch, tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    state = {"step": 1, "epoch": 0, "index": 0, "losses": [1.0]}
    first = store.save(1, {"w": torch.ones(3)}, {}, state)
    before = listing(first)
    monkeypatch.setattr("safetensors.torch.save_file", _half_then(FULL))
    with pytest.raises(OutputError, match=r"^cannot write .*: No space left on device$"):
        store.save(2, {"w": torch.zeros(3)}, {}, {**state, "step": 2})
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [first.name]
    assert listing(first) == before and store.latest() == first


def test_a_staged_copy_that_cannot_be_renamed_puts_the_earlier_folder_back(monkeypatch, tmp_path):
    source, out = tmp_path / "src", tmp_path / "out"
    source.mkdir()
    (source / "a.txt").write_text("new")
    out.mkdir()
    (out / "a.txt").write_text("earlier")
    rename = Path.rename

    def failing(self, target):
        if self.name.endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OutputError, match="No space left on device"), staged_copy(source, out, replace=True):
        pass
    assert listing(tmp_path) == {"out": b"<dir>", "src": b"<dir>"} and (out / "a.txt").read_text() == "earlier"


# ------------------------------------------------------------------------------------------------- CLI
class Reached(Exception):
    """Raised where the weights would load: a bad output path must be refused before it."""


def reach(*args, **kwargs):
    raise Reached


def run(args: list) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output
    return result


COMMANDS = {
    "compose": ([SCENE], ComposePipeline),
    "panorama": (["--caption", "sky", "--height", "32"], PanoramaPipeline),
    "fill": (["--image", REF, "--mask", REF], FillPipeline),
    "vary": (["--ref", REF], VaryPipeline),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_a_bad_output_path_before_loading(monkeypatch, tmp_path, command):
    args, pipeline = COMMANDS[command]
    monkeypatch.setattr(pipeline, "from_model_dir", reach)
    (tmp_path / "taken").mkdir()
    (tmp_path / "file").write_text("kept")
    cases = {
        tmp_path / "taken": "is an existing directory; give a file name",
        tmp_path / "file" / "o.png": f"cannot create its folder, {tmp_path / 'file'} is not a directory",
        tmp_path / ("x" * 300 + ".png"): "a file or folder name is longer than 255 bytes",
    }
    for output, message in cases.items():
        result = run([command, *args, "-o", output])
        expected = f"error: -o {shown_path(output)}: {message}"  # a long path is shown cut to 200 characters
        assert result.exit_code == 2 and result.output.strip().splitlines() == [expected]
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a read-only folder (root ignores mode bits)
    result = run([command, *args, "-o", tmp_path / "new" / "o.png"])
    expected = f"error: -o {tmp_path / 'new' / 'o.png'}: cannot write in {tmp_path} (read-only or permission denied)"
    assert result.exit_code == 2 and result.output.strip().splitlines() == [expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"]


@pytest.mark.parametrize(
    ("args", "taken", "line"),
    [
        (["compose", SCENE, "--overlay"], "o.layout.png", "error: --overlay {}: is an existing directory"),
        (["panorama", "--caption", "x", "--html"], "o.html", "error: --html {}: is an existing directory"),
    ],
)
def test_a_second_output_is_checked_before_loading_too(monkeypatch, tmp_path, args, taken, line):
    monkeypatch.setattr(ComposePipeline, "from_model_dir", reach)
    monkeypatch.setattr(PanoramaPipeline, "from_model_dir", reach)
    (tmp_path / taken).mkdir()
    result = run([*args, "-o", tmp_path / "o.png"])
    (got,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and got.startswith(line.format(tmp_path / taken)), got


def test_output_folders_of_eval_bench_and_prepare_data_are_checked_first(monkeypatch, tmp_path):
    monkeypatch.setattr(ComposePipeline, "from_model_dir", reach)
    (tmp_path / "file").write_text("kept")
    (tmp_path / "dir").mkdir()
    for args, line in [
        (
            ["eval", "--n", "1", "--out", tmp_path / "file"],
            f"error: --out {tmp_path / 'file'}: is an existing file; give a folder name",
        ),
        (
            ["prepare-data", "--n", "2", "--out", tmp_path / "file"],
            f"error: --out {tmp_path / 'file'}: is an existing file; give a folder name",
        ),
        (["bench", "--tiny", "--json", tmp_path / "dir"], f"error: --json {tmp_path / 'dir'}: is an existing dir"),
    ]:
        result = run(args)
        (got,) = result.output.strip().splitlines()
        assert result.exit_code == 2 and got.startswith(line), got
    assert (tmp_path / "file").read_text() == "kept"


def test_cli_full_disk_at_the_end_is_one_line_and_keeps_the_earlier_png(monkeypatch, tmp_path):
    class Done:
        label = ""

        def load_loras(self, loras):
            return []

        def __call__(self, scene, **kwargs):
            return ComposeOutput(images=[image(9, 128)], alphas=[[0.5] * len(scene.refs)])

    monkeypatch.setattr(ComposePipeline, "from_model_dir", lambda *a, **k: Done())
    out = tmp_path / "o.png"
    save_png(image(1), out)
    before = listing(tmp_path)
    monkeypatch.setattr("PIL.Image.Image.save", _half_then(FULL))
    result = run(["compose", SCENE, "-o", out])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: cannot write {out}: No space left on device"
    ]
    assert listing(tmp_path) == before


def test_any_other_file_error_of_a_command_is_one_line_naming_the_file(monkeypatch, tmp_path):
    """The CLI's last net: an OSError with a file name (here the shard writer on a full disk) is one line."""

    def full(name, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(name))

    monkeypatch.setattr("tarfile.open", full)
    result = run(["prepare-data", "--n", "2", "--size", "32", "--ref-size", "16", "--out", tmp_path / "data"])
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and line.startswith(f"error: {tmp_path / 'data'}") and "No space left" in line
    assert not list((tmp_path / "data").rglob("*.tmp*"))
