"""Training checkpoints: one folder per step, written atomically, safetensors only (DESIGN 5).

    OUT/checkpoints/step-000100/
        trainable.safetensors   every parameter the optimiser updates, keyed "<module>.<param>"
        optimizer.safetensors   the optimiser's state keyed "<module>.<param>.<key>": AdamW's exp_avg, exp_avg_sq,
                                step; 8-bit AdamW's uint8 codes state1 / state2 with their absmax1 / absmax2 and
                                quantization maps qmap1 / qmap2 as they are (training/optimizers.py)
        ema.safetensors         the weights' moving average, same keys as trainable (only with ema_decay > 0)
        state.json              step, data position, stage, config, losses so far (written last)

A folder is built under a temporary name and renamed into place, so a process killed mid-save leaves either
the previous checkpoints or a `.tmp-*` folder that is ignored and cleaned up: never half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from moviepostproduction.encoders.checks import Check, config_problems, count, first_line, listing, text
from moviepostproduction.errors import NOTHING, Problem, WeightsError, shown
from moviepostproduction.files import load_safetensors, output_error, save_safetensors, write_json_atomic
from moviepostproduction.sampling import is_finite_number
from moviepostproduction.training.optimizers import BNB_STATE, is_8bit, state_keys

STEP_PREFIX = "step-"


@dataclass
class Snapshot:
    """What a checkpoint folder holds, loaded."""

    path: Path
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    state: dict
    ema: dict[str, torch.Tensor] | None = None


def copy_named_tensors(
    targets: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where, kind: str
) -> None:
    """Copy `state[name]` into every target tensor in place, after checking none is missing and each shape fits."""
    missing = [name for name in targets if name not in state]
    if missing:
        raise WeightsError(f"{where}: lacks {len(missing)} {kind} tensors ({', '.join(missing[:3])} ...)")
    with torch.no_grad():
        for name, target in targets.items():
            value = state[name]
            if value.shape != target.shape:
                raise WeightsError(f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value.to(target.device, target.dtype))


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    """Flatten an Adam-style optimiser's per-parameter state to named tensors (id(param) -> name), 8-bit codes and
    their scales as stored (uint8 / fp32), so that loading them back restores the very same state."""
    keys = state_keys(optimizer)
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key in keys:
                    out[f"{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().clone()
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], state: dict[str, torch.Tensor]):
    """Put a checkpoint's optimiser state back; state of the other optimiser kind is one line naming
    trainer.optimizer (the moments of AdamW and of 8-bit AdamW do not convert into each other)."""
    keys = state_keys(optimizer)
    stored = {name.rsplit(".", 1)[-1] for name in state} - {"step"}
    if stored and not stored <= set(keys):
        held = "adamw8bit" if stored <= set(BNB_STATE) else "adamw"
        raise WeightsError(
            f"trainer.optimizer: the checkpoint holds {held} state, this run uses "
            f"{'adamw8bit' if is_8bit(optimizer) else 'adamw'}; set the optimizer it was trained with, "
            "or start a new out_dir with --init-from"
        )
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = {k: state[f"{names[id(p)]}.{k}"] for k in keys if f"{names[id(p)]}.{k}" in state}
            if entry:
                entry = {k: v.to(p.device) if k != "step" else v for k, v in entry.items()}
                if "step" in entry and is_8bit(optimizer):  # bitsandbytes counts steps in a Python int
                    entry["step"] = int(entry["step"])
                optimizer.state[p] = entry


class CheckpointStore:
    """The checkpoint folders of one run: save (atomic), list, latest complete, prune to `keep`."""

    def __init__(self, root: str | Path, keep: int = 2):
        self.root = Path(root)
        self.keep = keep

    def folder(self, step: int) -> Path:
        return self.root / f"{STEP_PREFIX}{step:06d}"

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (a folder is complete once renamed into place)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)]
        return sorted((p for p in found if (p / "state.json").is_file()), key=lambda p: p.name)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, trainable, optimizer, state: dict, ema=None) -> Path:
        final = self.folder(step)
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            save_safetensors(trainable, tmp / "trainable.safetensors")
            save_safetensors(optimizer, tmp / "optimizer.safetensors")
            if ema is not None:
                save_safetensors(ema, tmp / "ema.safetensors")
            if os.environ.get("MPP_TEST_SLOW_CHECKPOINT"):  # lets tests kill a run in the middle of a save
                import time

                time.sleep(float(os.environ["MPP_TEST_SLOW_CHECKPOINT"]))
            write_json_atomic(state, tmp / "state.json")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as exc:  # a full disk or a read-only folder: one line, the earlier checkpoints kept
            raise output_error(final, exc) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only there on failure: the rename moved it
        self.prune()
        return final

    def prune(self) -> None:
        for old in self.complete()[: -self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp-*"):  # left by a killed save
            if not stale.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(stale, ignore_errors=True)

    @staticmethod
    def load(path: str | Path) -> Snapshot:
        path = Path(path)
        state_file = path / "state.json"
        if not state_file.is_file():
            raise WeightsError(f"{path}: not a complete checkpoint folder (missing state.json)")
        state = read_state(state_file)
        trainable = load_safetensors(path / "trainable.safetensors", "trainable parameters")
        optimizer = load_safetensors(path / "optimizer.safetensors", "optimizer state")
        ema_file = path / "ema.safetensors"
        ema = load_safetensors(ema_file, "EMA weights") if ema_file.is_file() else None
        return Snapshot(path, trainable, optimizer, state, ema)


# What a resumed run reads from state.json (trainer.py), each checked so that a corrupt file is one line naming it.
STATE_KEYS: dict[str, Check] = {
    **dict.fromkeys(("step", "epoch", "index"), count(0)),
    "losses": listing(lambda v: None if is_finite_number(v) else "not a number", "finite numbers", None, 0),
    "stage": text,
    "logs": listing(lambda v: None if isinstance(v, dict) else "not a mapping", "mappings", None, 0),
}
REQUIRED_STATE = ("step", "epoch", "index", "losses", "stage")


def read_state(state_file: Path) -> dict:
    """A checkpoint's state.json, checked; a corrupt one is a WeightsError naming it and what to do, never a silent
    start from scratch."""
    advice = (
        f"a corrupt checkpoint: remove {state_file.parent} to resume from the one before, or set trainer.resume: false"
    )
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, an int of 5000 digits
        raise WeightsError(f"{state_file}: not valid JSON ({first_line(exc)}; {advice})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{state_file}: not a JSON object (got {shown(state)}; {advice})")
    problems = [Problem(k, NOTHING, "required") for k in REQUIRED_STATE if k not in state]
    problems += config_problems(state, STATE_KEYS)
    if problems:
        raise WeightsError(f"{state_file}: {problems[0]} ({advice})")
    return state


def warm_start_state(path: str | Path, modules: list[str]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The "<module>.<param>" tensors a warm start reads, and what it read them from.

    `path` is a checkpoint folder (its trainable.safetensors), a .safetensors of such keys, or a model dir a run
    exported (`model_index.json` beside one folder per module: transformer/, adapter/, ...). From a model dir each
    named module's folder gives every .safetensors in it (a sharded transformer too), its keys prefixed with the
    module's name; `modules` names the folders to read (the trained ones), so a frozen backbone is not read twice.
    """
    path = Path(path)
    if not path.is_dir():
        return path, load_safetensors(path, "a warm-start checkpoint")
    if (path / "trainable.safetensors").is_file() or not (path / "model_index.json").is_file():
        file = path / "trainable.safetensors"
        return file, load_safetensors(file, "a checkpoint folder's trainable parameters, or a model dir")
    state: dict[str, torch.Tensor] = {}
    for name in modules:
        for file in sorted((path / name).glob("*.safetensors")):
            state.update({f"{name}.{k}": v for k, v in load_safetensors(file, f"{name} weights").items()})
    if not state:
        folders = ", ".join(f"{name}/" for name in modules)
        raise WeightsError(f"{path}: a model dir with no .safetensors in {folders} (expected the trained modules)")
    return path, state
