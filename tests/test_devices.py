"""`--device auto --dtype auto` by default; a device this machine cannot use is one line, exit 2, before loading
(issue 41 item 8: `--device cuda` on a CPU-only torch printed a 55-line traceback)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.devices import resolve_device, resolve_dtype
from moviepostproduction.errors import ValidationError


def test_auto_picks_cuda_and_bf16_only_where_there_is_cuda():
    device = resolve_device("auto")
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("fp16", "cpu") == torch.float16


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", "--device: must be auto, cpu, cuda, cuda:N or mps (got 'gpu')"),
        ("cpu:1", "--device: the CPU takes no index; use cpu (got 'cpu:1')"),
        ("cuda:", "--device: must be auto, cpu, cuda, cuda:N or mps (got 'cuda:')"),
    ],
)
def test_bad_device_names_are_one_line(name, message):
    with pytest.raises(ValidationError) as err:
        resolve_device(name)
    assert str(err.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("command", ["compose", "panorama", "fill", "vary"])
def test_cuda_on_a_cpu_only_machine_is_one_line_before_loading(tmp_path, command):
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"caption": "a plate", "width": 64, "height": 64, "refs": []}))
    out, png = str(tmp_path / "out.png"), str(tmp_path / "grey.png")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(png)
    args = {
        "compose": ["compose", str(scene), "-o", out],
        "panorama": ["panorama", "--caption", "a plate", "-o", out],
        "fill": ["fill", "--image", png, "--mask", png, "--prompt", "x", "-o", out],
        "vary": ["vary", "--ref", png, "-o", out],
    }[command]
    result = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device: CUDA is not available here"), result.output


def test_bad_dtype_is_one_line(tmp_path):
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"caption": "a plate", "width": 64, "height": 64, "refs": []}))
    result = CliRunner().invoke(app, ["compose", str(scene), "-o", str(tmp_path / "o.png"), "--dtype", "fp8"])
    assert result.exit_code == 2
    assert result.output.strip() == "error: --dtype: must be auto or one of fp32, bf16, fp16 (got 'fp8')"
