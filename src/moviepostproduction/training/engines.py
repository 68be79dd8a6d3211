"""How the shared trainer spreads a step over processes (issue 42 item 6): one loop, two engines.

- `HandEngine` (one process, or `accelerate launch` with DDP semantics, examples/accelerate/ddp.yaml): every process
  holds every weight; after the step's micro-batches the gradients are averaged by hand (`accelerator.reduce`).
- `FsdpEngine` (FSDP2, `fully_shard`, examples/accelerate/fsdp.yaml): every weight, trained or frozen, and the
  gradients and AdamW moments are split over the processes; FSDP averages the gradients (reduce-scatter).

Why FSDP gathers a whole micro-batch's weights at once (not block by block): a process's micro-batch takes its own
random branches (the compose task's auxiliary losses, its region loss's extra forward, the layout window), so the
processes run different sequences of modules, and collectives issued from module hooks would pair up wrongly across
processes. So the engine issues every collective at points all processes reach together (the units' own forward
hooks are removed): all-gather of every unit (one per FLUX block, one per task module) before the micro-batch,
reduce-scatter of every unit in a fixed order after
its backward (FSDP's final backward callback; `reduce_scatter_unused_params` so that a weight one process did not use
still takes part). The weights are whole while a micro-batch runs and split otherwise; gradients and moments stay
split. A weight no process used in a step gets no gradient, as with one process, so AdamW skips it the same way.

Both engines keep checkpoints engine-independent: full tensors, written by rank 0 (`full`), loaded back into the
layout the engine keeps (`like`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moviepostproduction.errors import Problem, ValidationError

# Modules sharded as one unit each, besides every task module (`fsdp_transformer_layer_cls_to_wrap` overrides it).
FSDP_UNITS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


class HandEngine:
    """DDP semantics by hand: whole weights everywhere, gradients averaged after the step's micro-batches."""

    name = "ddp"
    collective_samples = False  # sample grids need no other process: rank 0 makes them alone

    def __init__(self, accelerator: Any):
        self.acc = accelerator

    def prepare(self, modules: dict[str, nn.Module], params: list[nn.Parameter]) -> dict[int, nn.Parameter]:
        """Lay the weights out for this engine; returns id(old param) -> the param the optimiser must now hold."""
        return {id(p): p for p in params}

    def loss(self, fn: Callable[[], Any]) -> Any:
        """One micro-batch's forward (`fn` returns the task's LossOutput)."""
        return fn()

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average the gradients over the processes. A parameter without a gradient on one process but with one on
        another gets zeros there first, as one process accumulating both micro-batches would hold them, so that every
        process issues the same collectives in the same order."""
        if self.acc.num_processes == 1:
            return
        used = self.used_anywhere([p.grad is not None for p in params])
        for p, flag in zip(params, used, strict=True):
            if flag:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = self.acc.reduce(grad, "mean")

    def used_anywhere(self, local: list[bool]) -> list[bool]:
        flags = torch.tensor(local, dtype=torch.float32, device=self.acc.device)
        return [bool(v) for v in self.acc.reduce(flags, "sum").cpu() > 0]

    def clip(self, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
        grads = [p for p in params if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(grads, max_norm or float("inf")) if grads else None

    def full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors for a checkpoint (a collective under FSDP: every process calls it)."""
        return tensors

    def like(self, values: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole tensors of a checkpoint laid out as `targets` are (split under FSDP); keys not in targets kept."""
        return values

    def samples(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def finish(self, params: list[nn.Parameter]) -> dict[int, nn.Parameter]:
        """After the last step: the modules hold plain, whole weights (what exports read); id(param) -> its new one."""
        return {id(p): p for p in params}


class TaskRoot(nn.Module):
    """The FSDP root over a task's modules; its forward runs one micro-batch (or a sample grid) of the task."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, fn: Callable[[], Any]) -> tuple[torch.Tensor | None, Any]:
        out = fn()
        return getattr(out, "loss", None), out  # the loss tensor first: FSDP hooks its backward on it


class FsdpEngine(HandEngine):
    """FSDP2 with collectives at points every process reaches together (module docstring)."""

    name = "fsdp"
    collective_samples = True  # sample grids run on every process (the gathers are collectives); rank 0 saves

    def __init__(self, accelerator: Any, plugin: Any = None):
        super().__init__(accelerator)
        if plugin is not None and getattr(plugin, "fsdp_version", 2) != 2:
            raise ValidationError(
                [Problem("fsdp_version", plugin.fsdp_version, "the trainer runs FSDP2 only: set fsdp_version: 2")]
            )
        names = getattr(plugin, "transformer_cls_names_to_wrap", None) if plugin is not None else None
        self.unit_classes = tuple(names) if names else FSDP_UNITS
        self.units: list[nn.Module] = []
        self.root: TaskRoot | None = None
        self.owners: list[tuple[nn.Module, str]] = []  # (module, attribute) of each trained parameter
        self.used: set[int] = set()  # indices of the trained parameters backward reached in this step
        self.hooked: set[int] = set()  # ids of the whole (unsharded) copies that carry the hook

    def prepare(self, modules: dict[str, nn.Module], params: list[nn.Parameter]) -> dict[int, nn.Parameter]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        owner_of = {id(p): (m, n) for mod in modules.values() for m in mod.modules() for n, p in m._parameters.items()}
        self.owners = [owner_of[id(p)] for p in params]
        mesh = init_device_mesh(self.acc.device.type, (self.acc.num_processes,))
        self.root = TaskRoot(modules)
        blocks = [m for m in self.root.modules() if type(m).__name__ in self.unit_classes]
        for unit in [*blocks, *modules.values()]:  # inner units first: an outer unit takes what they leave
            if any(True for _ in unit.parameters()) and unit not in self.units:
                fully_shard(unit, mesh=mesh)
                state = unit._get_fsdp_state()  # no gather / reshard from its own forward, if a task calls it:
                state._pre_forward_hook_handle.remove()  # the engine gathers before the micro-batch, FSDP
                state._post_forward_hook_handle.remove()  # reshards after its backward (the root's callback)
                self.units.append(unit)
        fully_shard(self.root, mesh=mesh)
        self.root.set_reduce_scatter_unused_params(True)  # every process reduces every trained weight
        return {id(old): getattr(m, n) for old, (m, n) in zip(params, self.owners, strict=True)}

    def _gathered(self) -> None:
        for unit in self.units:  # the same order on every process
            unit.unshard()
        for i, (m, n) in enumerate(self.owners):  # the whole copy of each trained weight: does backward reach it?
            p = getattr(m, n)
            if id(p) not in self.hooked:
                self.hooked.add(id(p))
                p.register_post_accumulate_grad_hook(lambda _, i=i: self.used.add(i))

    def loss(self, fn: Callable[[], Any]) -> Any:
        def step() -> Any:
            self._gathered()
            return fn()

        return self.root(step)[1]

    def reduce_grads(self, params: list[nn.Parameter]) -> None:
        """FSDP reduced each micro-batch's gradients already; drop those no process produced (AdamW skips them)."""
        local = [i in self.used for i in range(len(params))]
        self.used.clear()
        for p, flag in zip(params, self.used_anywhere(local), strict=True):
            if not flag:
                p.grad = None

    def clip(self, params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor | None:
        """torch's clip_grad_norm_ over the whole gradients: the norm from every process's shards."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.acc.reduce(torch.tensor([float(len(grads))], device=self.acc.device), "sum").item():
            return None
        local = torch.zeros((), device=self.acc.device)
        for g in grads:
            local = local + g.to_local().float().pow(2).sum()
        total = self.acc.reduce(local, "sum").sqrt()
        coef = torch.clamp((max_norm or float("inf")) / (total + 1e-6), max=1.0)
        for g in grads:
            g.to_local().mul_(coef.to(g.dtype))
        return total

    def full(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in tensors.items()}

    def like(self, values: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = dict(values)
        for key, target in targets.items():
            value = values.get(key)
            if isinstance(target, DTensor) and value is not None and value.shape == target.shape:
                value = value.to(target.device, target.dtype)
                out[key] = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        return out

    def samples(self, fn: Callable[[], Any]) -> Any:
        try:
            with torch.no_grad():
                return self.root(lambda: (self._gathered(), fn())[1])[1]
        finally:
            for unit in self.units:
                unit.reshard()

    def finish(self, params: list[nn.Parameter]) -> dict[int, nn.Parameter]:
        """Whole weights back into plain modules on every process, FSDP's classes and hooks removed."""
        unshard_into_plain(self.units, self.root)
        self.units, self.root = [], None
        return {id(old): getattr(m, n) for old, (m, n) in zip(params, self.owners, strict=True)}


def unshard_into_plain(units: list[nn.Module], root: nn.Module | None) -> None:
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    fsdp = [*units, root] if root is not None else list(units)
    for module in fsdp:
        module.unshard()  # every process, the same order: the weights are whole on the modules now
    for module in fsdp:
        state = module._get_fsdp_state()
        for handle in (state._pre_forward_hook_handle, state._post_forward_hook_handle):
            handle.remove()
        for group in state._fsdp_param_groups:
            saving, loading = (
                group._module_to_pre_save_state_dict_hook_handle,
                group._module_to_pre_load_state_dict_hook_handle,
            )
            for handle in [*saving.values(), *loading.values()]:
                handle.remove()
    for module in fsdp:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            for attr in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
                sub.__dict__.pop(attr, None)
    for module in fsdp:
        if isinstance(module, FSDPModule):
            module.__class__ = type(module).__mro__[type(module)._orig_cls_mro_index]
        _module_state_mapping.pop(module, None)


def swap_params(optimizer: Any, params: list, names: dict[int, str], new: dict[int, nn.Parameter]) -> tuple:
    """The optimiser, the trained list and the id -> name map moved to the parameters an engine laid out."""
    for g in optimizer.param_groups:
        g["params"] = [new[id(p)] for p in g["params"]]
    return [new[id(p)] for p in params], {id(new[i]) if i in new else i: name for i, name in names.items()}


def make_engine(accelerator: Any) -> HandEngine:
    """FSDP when accelerate runs it (`accelerate launch --config_file examples/accelerate/fsdp.yaml`), or, on CPU where
    accelerate leaves it off, when its environment asks for it (ACCELERATE_USE_FSDP=true, as `accelerate launch`
    sets it); DeepSpeed is refused (docs/training.md, "Several processes"); else DDP by hand."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        raise ValidationError(
            [Problem("distributed_type", "DEEPSPEED", "the trainer runs DDP or FSDP2 (docs/training.md)")]
        )
    wants = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if kind == DistributedType.FSDP or (wants and accelerator.num_processes > 1):
        plugin = getattr(accelerator.state, "fsdp_plugin", None) if kind == DistributedType.FSDP else None
        if plugin is None:
            from accelerate.utils import FullyShardedDataParallelPlugin

            plugin = FullyShardedDataParallelPlugin()  # the FSDP_* variables accelerate launch sets
        return FsdpEngine(accelerator, plugin)
    return HandEngine(accelerator)


__all__ = ["FSDP_UNITS", "FsdpEngine", "HandEngine", "TaskRoot", "make_engine", "swap_params"]


def end_accelerator(accelerator: Any) -> None:
    """End a run's trackers and process group (every rank), then forget accelerate's process-wide state, so that a
    later Trainer in the same process may take another mixed precision (from Python or a notebook: stage 1 in fp32,
    then a bf16 stage; accelerate otherwise refuses "AcceleratorState has already been initialized")."""
    from accelerate.state import AcceleratorState, GradientState

    single = accelerator.num_processes == 1 and "WORLD_SIZE" not in os.environ  # no launcher, no process group
    accelerator.end_training()
    if single:  # a launched process keeps its state: resetting it would make the next use rejoin a dead group
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
