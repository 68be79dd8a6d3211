"""Launching a child training script as one process or as N torch.distributed processes on CPU (gloo), for the
tests that pin N processes == one process with N times the gradient accumulation."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, args: list[str], processes: int = 1, env: dict[str, str] | None = None) -> None:
    """Run `script ARGS` (torchrun when processes > 1, accelerate then picks gloo on CPU); assert it exits 0."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **(env or {})}
    cmd = [sys.executable, str(script)]
    if processes > 1:
        run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
        cmd = [*run, f"--master_port={free_port()}", str(script)]
    done = subprocess.run([*cmd, *args], env=full_env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
