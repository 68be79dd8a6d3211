"""Several processes (torch.distributed on CPU, gloo) train exactly as one process with that many times the gradient
accumulation: same micro-batches, same per-micro-batch seeds, gradients and logged losses averaged, and a resume
continues from the data position of every process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_launch import launch
from moviepostproduction.files import load_safetensors

SCRIPT = '''
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from moviepostproduction.training.task import LossOutput
from moviepostproduction.training.trainer import TrainConfig, Trainer


class NoisyRegression:
    """A linear model on 8 fixed batches; the loss adds noise from the step's generator (seeds must match too)."""

    name = "regression"

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])

    def modules(self):
        return {"model": self.model}

    def param_groups(self, stage):
        return [{"params": list(self.model.parameters()), "lr": 0.05}]

    def batches(self, epoch, seed):
        for i in range(8):
            yield self.x[i * 8 : (i + 1) * 8] + epoch, self.y[i * 8 : (i + 1) * 8]

    def loss(self, batch, generator):
        x, y = batch
        noise = torch.randn(y.shape, generator=generator)
        err = nn.functional.mse_loss(self.model(x), y + 0.1 * noise)
        return LossOutput(err, {"err": err.detach()})

    def samples(self, generator):
        return None


def thread_names():
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))


out, accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = TrainConfig(out_dir=out, max_steps=steps, grad_accum=accum, checkpoint_every=1, keep_checkpoints=1,
                  progress=False, tensorboard=False)
Trainer(NoisyRegression(), cfg).run()
# Threads left after the run (the test asserts no gloo worker outlives the process group).
Path(out, f"threads-{os.environ.get('RANK', 'single')}.json").write_text(json.dumps(thread_names()))
'''


def _train(script: Path, out: Path, accum: int, steps: int, processes: int = 1) -> None:
    launch(script, [str(out), str(accum), str(steps)], processes)


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_safetensors(out / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


@pytest.mark.timeout(300)
def test_two_processes_equal_one_with_double_accumulation_and_resume_exactly(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    _train(script, tmp_path / "one", accum=2, steps=6)  # 6 steps x 2 micro-batches: epochs 0 and 1 (8 batches)
    _train(script, tmp_path / "two", accum=1, steps=3, processes=2)
    _train(script, tmp_path / "two", accum=1, steps=6, processes=2)  # resumed at step 3
    one, two = _weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=1e-6)
    losses = [json.loads((tmp_path / run / "losses.json").read_text()) for run in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)  # the mean over both processes, as one process logs it


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_no_gloo_thread_outlives_a_distributed_run(tmp_path: Path) -> None:
    """A gloo worker thread left alive at interpreter exit may free a collective's tensors during finalisation and
    abort a finished run (SIGABRT, "terminate called without an active exception"; about 1 in 100
    runs). After run() every rank's process group is gone with its threads."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    _train(script, tmp_path / "two", accum=1, steps=2, processes=2)
    for rank in (0, 1):
        names = json.loads((tmp_path / "two" / f"threads-{rank}.json").read_text())
        assert not [n for n in names if "gloo" in n], names


def test_the_cli_runs_as_a_module_for_launchers() -> None:
    """`accelerate launch -m moviepostproduction.cli train RECIPE` and `torchrun -m ...` run the module."""
    done = subprocess.run(
        [sys.executable, "-m", "moviepostproduction.cli", "train", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "Usage:" in done.stdout and "train" in done.stdout
