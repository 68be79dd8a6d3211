"""The shared training loop (DESIGN 5): one `Trainer` for every `TrainTask` (compose stages, toy backbone, toy
encoders, fill LoRA, NanoDiT).

What makes resume exact: the randomness of step s comes from generators seeded by (seed, s, micro-batch, rank),
not from a running RNG; the learning-rate schedule is a pure function of the step; the data position is
(epoch, batch index) of a deterministic `task.batches(epoch, seed)`; and a checkpoint holds the trainable
parameters and the optimiser moments exactly. A run killed after checkpoint k and resumed therefore takes the
same steps k+1, k+2, ... as a run that was never interrupted (pinned by tests/test_trainer.py).

Multi-GPU: `accelerate launch` runs one process per device; each takes every n-th micro-batch and the gradients
are averaged across processes before the optimiser step, so N processes equal one process with N times the gradient
accumulation (pinned on CPU with torchrun by tests). How weights and gradients are spread is the engine's
(training/engines.py): DDP semantics by hand (examples/accelerate/ddp.yaml) or FSDP2 (examples/accelerate/fsdp.yaml).
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moviepostproduction.errors import MppError, Problem, ValidationError
from moviepostproduction.files import KeyReport, load_matching, write_json_atomic, write_text_atomic
from moviepostproduction.sampling import is_positive_number
from moviepostproduction.training.checkpoints import (
    CheckpointStore,
    copy_named_tensors,
    load_optimizer_state,
    optimizer_state,
    warm_start_state,
)
from moviepostproduction.training.ema import EmaWeights
from moviepostproduction.training.engines import end_accelerator, make_engine, swap_params
from moviepostproduction.training.optimizers import build_optimizer, optimizer_problem
from moviepostproduction.training.recompute import enable_gradient_checkpointing
from moviepostproduction.training.task import TrainTask

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "fp16", "bf16")


class TrainingDiverged(MppError):
    """The loss (or gradient norm) became NaN/Inf; the last good checkpoint is kept untouched."""


@dataclass
class TrainConfig:
    out_dir: str
    stage: str = "1"
    max_steps: int = 1000  # optimiser steps, counted across resumes
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"
    max_grad_norm: float | None = 1.0
    lr_scale: float = 1.0  # multiplies every parameter group's stage learning rate (e.g. 0.2 for a gentle fine-tune)
    warmup_steps: int = 0
    decay_steps: int = 0  # linear cooldown to 0 over the last decay_steps steps (0: constant after warm-up)
    weight_decay: float = 0.0
    ema_decay: float = 0.0  # exponential moving average of the weights (e.g. 0.999; 0: off); training/ema.py
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, the `quant` extra); training/optimizers.py
    gradient_checkpointing: bool = False  # the frozen blocks recompute their activations in backward
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in out_dir
    init_from: str | None = None  # warm start: checkpoint folder, .safetensors of "<module>.<param>" keys, model dir
    init_skip: tuple[str, ...] = ()  # key prefixes ("semantic", "transformer.x_embedder") init_from does not load
    progress: bool = True
    tensorboard: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(Problem("mixed_precision", self.mixed_precision, f"expected one of {MIXED_PRECISION}"))
        for name in ("max_steps", "grad_accum", "log_every", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(Problem(name, getattr(self, name), "must be a positive integer"))
        for name in ("warmup_steps", "decay_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= self.max_steps:
                problems.append(Problem(name, value, f"must be an integer in [0, max_steps={self.max_steps}]"))
        if not is_positive_number(self.lr_scale):
            problems.append(Problem("lr_scale", self.lr_scale, "must be a positive number (1: the stage's LRs)"))
        if not isinstance(self.ema_decay, int | float) or not 0.0 <= self.ema_decay < 1.0:
            problems.append(Problem("ema_decay", self.ema_decay, "must be a number in [0, 1) (0: no EMA)"))
        if problem := optimizer_problem(self.optimizer):
            problems.append(problem)
        if not isinstance(self.gradient_checkpointing, bool):
            problems.append(Problem("gradient_checkpointing", self.gradient_checkpointing, "must be true or false"))
        skip = self.init_skip
        if not isinstance(skip, list | tuple) or not all(isinstance(k, str) and k.strip() for k in skip):
            problems.append(Problem("init_skip", skip, "must be a list of key prefixes (non-empty strings)"))
        else:
            self.init_skip = tuple(skip)
        if problems:
            raise ValidationError(problems)


@dataclass
class TrainResult:
    step: int
    losses: list[float]  # one per optimiser step since step 1 (restored on resume)
    checkpoint: Path | None
    warm_start: KeyReport | None = None
    logs: list[dict[str, float]] = field(default_factory=list)


def step_seed(seed: int, step: int, micro: int = 0) -> int:
    """The seed of one micro-batch: a pure function of the run seed and the position, never a running state.

    `micro` counts the step's micro-batches over every process (micro-batch m of process r of N is m * N + r), the
    order in which one process with N times the accumulation would take them: so the seeds are the same too.
    """
    return (seed * 1_000_003 + step * 4_099 + micro * 131) % (2**63 - 1)


def _generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class Trainer:
    def __init__(self, task: TrainTask, config: TrainConfig, accelerator: Any | None = None):
        # torch 2.13: torch._dynamo imported after a process group is created (the optimizer below imports it)
        # keeps that group alive past destroy_process_group, so its gloo worker threads outlive end_training()
        # and may release a collective's tensors while the interpreter shuts down: SIGABRT ("terminate called
        # without an active exception") in a run that finished. Imported first, the group's threads end.
        import torch._dynamo  # noqa: F401
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        self.task, self.config = task, config
        self.out = Path(config.out_dir)
        self.owns_accelerator = accelerator is None  # then run() also ends it: trackers, process group
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.out), logging_dir=str(self.out / "logs")),
        )
        self.store = CheckpointStore(self.out / "checkpoints", keep=config.keep_checkpoints)
        device = self.accelerator.device
        for module in task.modules().values():
            module.to(device)
        self.groups = task.param_groups(config.stage)
        self.names = {id(p): f"{m}.{n}" for m, mod in task.modules().items() for n, p in mod.named_parameters()}
        self.params = [p for g in self.groups for p in g["params"]]
        if not self.params:
            raise ValidationError([Problem("stage", config.stage, f"task {task.name!r} trains nothing in it")])
        for g in self.groups:
            g["base_lr"] = g.get("base_lr", g["lr"]) * config.lr_scale
        self.optimizer = build_optimizer(config.optimizer, self.groups, config.weight_decay)
        self.recomputed = enable_gradient_checkpointing(task) if config.gradient_checkpointing else []
        self.ema: EmaWeights | None = None  # set by run() when config.ema_decay > 0
        self.engine = make_engine(self.accelerator)  # FSDP: the optimiser's parameters become this process's shards
        laid_out = self.engine.prepare(task.modules(), self.params)
        self.params, self.names = swap_params(self.optimizer, self.params, self.names, laid_out)

    # ---------------------------------------------------------------------------------------------- state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {self.names[id(p)]: p.detach() for p in self.params}

    def named_params(self) -> dict[str, torch.Tensor]:
        return {self.names[id(p)]: p for p in self.params}

    def start_ema(self, snapshot=None) -> None:
        """The run's EMA: the one a resumed checkpoint stored, else a fresh one from the current weights."""
        decay = self.config.ema_decay
        if decay <= 0:
            return
        if snapshot is not None and snapshot.ema is not None:
            ema = self.engine.like(snapshot.ema, self.trainable_state())
            self.ema = EmaWeights.restored(self.trainable_state(), decay, ema, snapshot.path)
            return
        if snapshot is not None:
            logger.warning("%s holds no EMA: the average starts from its weights", snapshot.path)
        self.ema = EmaWeights(self.trainable_state(), decay)

    def load_trainable(self, state: dict[str, torch.Tensor], where: Path) -> None:
        copy_named_tensors(self.named_params(), self.engine.like(state, self.named_params()), where, "trainable")

    def warm_start(self, path: str | Path) -> KeyReport:
        """Load every matching "<module>.<param>" tensor (checkpoint, .safetensors or exported model dir); report
        missing / unexpected / shape-mismatched keys."""
        modules = self.task.modules()
        trained_modules = [n for n, m in modules.items() if any(p.requires_grad for p in m.parameters())]
        file, state = warm_start_state(path, trained_modules)
        skip = self.config.init_skip
        state = {k: v for k, v in state.items() if not any(k == p or k.startswith(p + ".") for p in skip)}
        report = KeyReport()
        for name, module in modules.items():
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            part = load_matching(module, self.engine.like(own, module.state_dict()))
            report.loaded += [f"{name}.{k}" for k in part.loaded]
            report.mismatched += [f"{name}.{k}" for k in part.mismatched]
            report.unexpected += [f"{name}.{k}" for k in part.unexpected]
            trained = {n for n, p in module.named_parameters() if p.requires_grad}
            report.missing += [f"{name}.{k}" for k in part.missing if k in trained]  # new params start at init
        report.unexpected += [k for k in state if k.split(".", 1)[0] not in modules]
        logger.warning("warm start from %s: %s", file, report.summary())
        for kind in ("missing", "unexpected", "mismatched"):
            for key in getattr(report, kind)[:20]:
                logger.info("warm start %s: %s", kind, key)
        return report

    # ----------------------------------------------------------------------------------------------- data
    def micro_batches(self, epoch: int, index: int):
        """Yield (epoch, next index, batch) from position (epoch, index), every n-th batch for this process.

        With N processes, an epoch's batch count should be a multiple of N: the processes move to the next epoch
        independently, so otherwise they stop taking consecutive batches together at epoch ends.
        """
        acc = self.accelerator
        while True:
            empty = True
            for i, batch in enumerate(self.task.batches(epoch, self.config.seed)):
                empty = False
                if i >= index and i % acc.num_processes == acc.process_index:
                    yield epoch, i + 1, batch
            if empty:
                raise ValidationError([Problem("task.batches", epoch, "yielded no batch")])
            epoch, index = epoch + 1, 0

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, constant, then a linear cooldown ending at 0 after the last step (step is 1-based)."""
        cfg = self.config
        warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
        left = cfg.max_steps - step + 1  # steps still to run, this one included
        cool = min(1.0, left / cfg.decay_steps) if cfg.decay_steps > 0 else 1.0
        return min(warm, cool)

    # ----------------------------------------------------------------------------------------------- loop
    def run(self) -> TrainResult:
        cfg, acc = self.config, self.accelerator
        step, epoch, index, losses, logs = 0, 0, 0, [], []
        warm, snap = None, None
        latest = self.store.latest() if cfg.resume else None
        if latest is not None:
            snap = self.store.load(latest)
            if snap.state.get("stage") != cfg.stage:
                raise ValidationError(
                    [
                        Problem(
                            "stage",
                            cfg.stage,
                            f"{latest} holds stage {snap.state.get('stage')!r}; "
                            "use a new out_dir and --init-from for a new stage",
                        )
                    ]
                )
            self.load_trainable(snap.trainable, latest)
            targets = {f"{n}.{k}": p for n, p in self.named_params().items() for k in ("exp_avg", "exp_avg_sq")}
            load_optimizer_state(self.optimizer, self.names, self.engine.like(snap.optimizer, targets))
            step, epoch, index = snap.state["step"], snap.state["epoch"], snap.state["index"]
            losses, logs = list(snap.state["losses"]), list(snap.state.get("logs", []))
            logger.info("resumed %s at step %d", latest, step)
        elif cfg.init_from:
            warm = self.warm_start(cfg.init_from)
            if acc.is_main_process:
                write_json_atomic(asdict(warm), self.out / "warm_start.json")
        self.start_ema(snap)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.tensorboard:
                scalars = {k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)}
                acc.init_trackers("train", config=scalars)
        last = latest
        batches = self.micro_batches(epoch, index)
        from accelerate.utils import gather_object
        from tqdm import tqdm

        bar = tqdm(
            total=cfg.max_steps,
            initial=step,
            desc=f"train {self.task.name} stage {cfg.stage}",
            disable=not (cfg.progress and acc.is_main_process),
            unit="step",
        )
        while step < cfg.max_steps:
            step += 1
            for g in self.optimizer.param_groups:
                g["lr"] = g["base_lr"] * self.lr_factor(step)
            parts: dict[str, float] = {}
            total = 0.0
            for micro in range(cfg.grad_accum):
                epoch, index, batch = next(batches)
                seed = step_seed(cfg.seed, step, micro * acc.num_processes + acc.process_index)
                torch.manual_seed(seed)  # module-internal randomness (dropout) too
                gen = _generator(seed, acc.device)
                with acc.autocast():
                    out = self.engine.loss(lambda: self.task.loss(batch, gen))  # noqa: B023 (called at once)
                value = float(out.loss.detach())
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"non-finite loss {value} at step {step} ({out.logs}); training stopped, "
                        f"last good checkpoint: {last or 'none'}"
                    )
                acc.backward(out.loss / cfg.grad_accum)
                total += value / cfg.grad_accum
                for k, v in out.logs.items():
                    parts[k] = parts.get(k, 0.0) + float(v) / cfg.grad_accum
            self.engine.reduce_grads(self.params)  # the mean over every process's micro-batches
            if acc.num_processes > 1:  # the logged loss too; a part one process did not draw counts 0 there
                names = sorted(set(gather_object(list(parts))))
                values = [total, *(parts.get(k, 0.0) for k in names)]
                mean = acc.reduce(torch.tensor(values, device=acc.device), "mean")
                total, parts = float(mean[0]), {k: float(v) for k, v in zip(names, mean[1:], strict=True)}
            norm = self.engine.clip(self.params, cfg.max_grad_norm)
            if norm is not None and not torch.isfinite(norm):
                raise TrainingDiverged(
                    f"non-finite gradient norm at step {step}; training stopped, last good "
                    f"checkpoint: {last or 'none'}"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update(self.trainable_state(), step)
            losses.append(total)
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                entry = {"step": step, "loss": total, "lr": self.optimizer.param_groups[0]["lr"], **parts}
                if norm is not None:
                    entry["grad_norm"] = float(norm)
                logs.append(entry)
                bar.set_postfix(loss=f"{total:.4f}")
                if acc.is_main_process and cfg.tensorboard:
                    acc.log({k: v for k, v in entry.items() if k != "step"}, step=step)
            if cfg.sample_every and step % cfg.sample_every == 0:
                self.write_samples(step)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                # The data position after this step over every process: rank 0 took batch index - 1 of the
                # step's last round, ranks 1 .. N-1 the ones after it.
                last = self.save(step, epoch, index + acc.num_processes - 1, losses, logs)
        bar.close()
        if cfg.sample_every == 0 or step % cfg.sample_every:
            self.write_samples(step)
        if self.ema is not None:  # what the run hands on (exports): the average; the checkpoints keep both
            self.ema.copy_to(self.named_params())
        whole = self.engine.finish(self.params)  # plain modules, whole weights (FSDP: gathered on every process)
        self.params, self.names = swap_params(self.optimizer, self.params, self.names, whole)
        if acc.is_main_process:
            self.write_curves(losses, logs)
        acc.wait_for_everyone()
        if self.owns_accelerator:  # every rank: a gloo/NCCL group left alive aborts at interpreter exit
            end_accelerator(acc)
        elif acc.is_main_process and cfg.tensorboard:
            for tracker in acc.trackers:
                tracker.finish()
        return TrainResult(step, losses, last, warm, logs)

    # -------------------------------------------------------------------------------------------- outputs
    def save(self, step: int, epoch: int, index: int, losses: list[float], logs: list[dict]) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        full = self.engine.full  # whole tensors: a collective under FSDP, so every process takes part
        trainable, moments = full(self.trainable_state()), full(optimizer_state(self.optimizer, self.names))
        ema = full(self.ema.shadow) if self.ema else None
        if not acc.is_main_process:
            return None
        state = {
            "step": step,
            "epoch": epoch,
            "index": index,
            "stage": self.config.stage,
            "task": self.task.name,
            "losses": losses,
            "logs": logs,
            "config": asdict(self.config),
        }
        return self.store.save(step, trainable, moments, state, ema=ema)

    def write_samples(self, step: int) -> None:
        main = self.accelerator.is_main_process
        if not (main or self.engine.collective_samples):  # FSDP: every process runs the grid, rank 0 saves it
            return
        from moviepostproduction.visualize import save_png

        gen = _generator(step_seed(self.config.seed, step), self.accelerator.device)
        ema = self.ema.applied(self.named_params()) if self.ema else nullcontext()
        with torch.no_grad(), ema, self.accelerator.autocast():  # the training steps' precision (bf16 backbone)
            image = self.engine.samples(lambda: self.task.samples(gen))
        if image is not None and main:
            save_png(image, self.out / "samples" / f"step-{step:06d}.png")

    def write_curves(self, losses: list[float], logs: list[dict]) -> None:
        from moviepostproduction.visualize import plot_curves, save_png

        series = {"loss": list(enumerate(losses, start=1))}
        for key in sorted({k for e in logs for k in e} - {"step", "loss", "lr", "grad_norm"}):
            series[key] = [(e["step"], e[key]) for e in logs if key in e]
        save_png(plot_curves(series, title=f"{self.task.name} stage {self.config.stage}"), self.out / "curves.png")
        write_text_atomic(json.dumps(losses), self.out / "losses.json")
