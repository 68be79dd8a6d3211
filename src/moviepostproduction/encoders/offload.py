"""CPU offload of our pipelines on accelerate's hooks, as diffusers users expect it (issue 41, item 4).

Two modes (docs/memory.md):
- "model": one component at a time on the execution device. A hook on each component's entry module moves its
  weights in before its forward and sends every other component of the pipeline back to CPU first.
- "sequential": `accelerate.cpu_offload` on each component, so every leaf module's weights come in for its own
  forward and go back (to the meta device, from one CPU copy) after it: the smallest footprint, the slowest.

Why not diffusers' `enable_model_cpu_offload`: `ConditionedFlux` runs the FLUX block loop itself and never calls
`transformer.forward`, so a hook on the transformer never fires; here the hook sits on the module the pipeline
calls (`pipe.model`) and moves the base transformer. Why not one fixed `cpu_offload_with_hook` chain: the order of
the components differs across pipelines (compose encodes the references before the caption, fill encodes the
plate before the text), and a chain only offloads its predecessor; here each hook offloads every other component,
so the text encoders are never on the execution device while the transformer runs, whatever the order.

The small modules that live beside the transformer (the composition adapter, fill's semantic attention: 0.3 GB at
FLUX.1-dev size) stay on the execution device in both modes: they are read outside `forward` (the adapter's
`prepare`, its per-block offsets), where no hook would fire.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moviepostproduction.errors import Problem, ValidationError

__all__ = [
    "MODES",
    "Offload",
    "compute_dtype",
    "enable_offload",
    "execution_device",
    "pipeline_components",
]

MODES = ("model", "sequential")
OFFLOAD_DEVICE = torch.device("cpu")  # where "model" keeps a component that is not running


def _hook_device(hook: Any) -> torch.device | None:
    """The execution device an accelerate hook sends weights and inputs to (a SequentialHook: its first that has
    one); None for hooks without one (the io_same_device root hook of `cpu_offload`)."""
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(h, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return None


def execution_device(obj: nn.Module | Any) -> torch.device:
    """Where `obj` computes: a module, or a pipeline (its `model`). With offload hooks, their execution device (as
    diffusers' `_execution_device`); without, the device of the first weight. Inputs and text embeddings go there."""
    module = obj if isinstance(obj, nn.Module) else obj.model
    for m in module.modules():
        device = _hook_device(getattr(m, "_hf_hook", None))
        if device is not None:
            return device
    first = next(module.parameters(), None)
    return first.device if first is not None else OFFLOAD_DEVICE


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype `module` computes in: that of its first floating-point weight. Quantized weights (bitsandbytes
    4-bit, GGUF) are stored as uint8, so "the first weight's dtype" would name the storage, not the computation."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@dataclass
class Component:
    """One offloaded part of a pipeline: `entry` is the module whose forward (or, for the VAE, encode / decode via
    diffusers' `apply_forward_hook`) the pipeline calls; `weights` is what moves."""

    name: str
    entry: nn.Module
    weights: nn.Module


def pipeline_components(pipe: Any) -> tuple[list[Component], list[nn.Module]]:
    """The offloadable components of a Compose / Panorama / Fill pipeline and the small modules that stay resident.

    Denoiser: `pipe.model` (ConditionedFlux, FillFlux or a plain FluxTransformer2DModel) with its base transformer;
    text: `pipe.text_encoder.clip` / `.t5`; images: `pipe.image_encoder.clip` / `.dino`; `pipe.vae.model`. A
    component a pipeline lacks (panorama has no text encoder, fill without refs no image encoder) is skipped."""
    model = pipe.model
    base = getattr(model, "transformer", None)
    base = base if isinstance(base, nn.Module) else model
    found = [Component("transformer", model, base)]
    for owner, parts in (("text_encoder", ("clip", "t5")), ("image_encoder", ("clip", "dino"))):
        wrapper = getattr(pipe, owner, None)
        for part in parts if wrapper is not None else ():
            found.append(Component(f"{owner}.{part}", getattr(wrapper, part), getattr(wrapper, part)))
    vae = getattr(getattr(pipe, "vae", None), "model", None)
    if isinstance(vae, nn.Module):
        found.append(Component("vae", vae, vae))
    return found, _resident_parts(model, base)


def _resident_parts(module: nn.Module, base: nn.Module) -> list[nn.Module]:
    """The largest submodules of `module` that do not contain `base` (and are not it)."""
    if module is base:
        return []
    if all(m is not base for m in module.modules()):
        return [module]
    return [part for child in module.children() for part in _resident_parts(child, base)]


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists, dicts) moved to `device`; anything else as it is (the Conditioning moves
    itself in ConditionedFlux.forward)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def _model_hook_class():
    from accelerate.hooks import ModelHook

    class ExclusiveOffload(ModelHook):
        """Before `entry`'s forward: every other component of the group back to CPU, this one's weights in."""

        def __init__(self, component: Component, device: torch.device, group: list):
            super().__init__()
            self.component, self.execution_device, self.group = component, device, group
            self.resident = False
            group.append(self)

        def offload(self) -> None:
            if self.resident:
                self.component.weights.to(OFFLOAD_DEVICE)
                self.resident = False

        def init_hook(self, module: nn.Module) -> nn.Module:
            self.resident = True  # unknown: make sure it moves
            self.offload()
            return module

        def pre_forward(self, module: nn.Module, *args, **kwargs):
            if not self.resident:
                for other in self.group:
                    if other is not self:
                        other.offload()
                if self.execution_device.type == "cuda":
                    torch.cuda.empty_cache()  # the blocks just freed, before the next component's weights
                self.component.weights.to(self.execution_device)
                self.resident = True
            return _to_device(args, self.execution_device), _to_device(kwargs, self.execution_device)

    return ExclusiveOffload


@dataclass
class Offload:
    """What `enable_offload` installed: `resident()` names the components on the execution device now (model mode;
    in sequential mode no component stays), `release()` sends every component back to CPU (diffusers'
    `maybe_free_model_hooks`: call it after a pipeline call)."""

    mode: str
    device: torch.device
    components: list[Component]
    hooks: list = field(default_factory=list)  # ExclusiveOffload per component (model mode)

    def resident(self) -> list[str]:
        return [h.component.name for h in self.hooks if h.resident]

    def release(self) -> None:
        for hook in self.hooks:
            hook.offload()


def _check_sequential(components: list[Component]) -> None:
    """Sequential offload rebuilds every weight from a CPU state dict, which bitsandbytes' 4-bit weights (their
    quantization state lives on the Parameter object) and GGUF weights do not survive."""
    for c in components:
        method = getattr(getattr(c.weights, "hf_quantizer", None), "quantization_config", None)
        method = getattr(method, "quant_method", None)
        name = getattr(method, "value", method)
        if name in ("bitsandbytes", "gguf"):
            raise ValidationError(
                [Problem("offload", "sequential", f"does not work on {name}-quantized weights ({c.name}); use model")]
            )


def enable_offload(pipe: Any, mode: str, device: str | torch.device = "cuda") -> Offload:
    """CPU offload of a Compose / Panorama / Fill pipeline with `device` as the execution device.

    mode "model": each component moves to `device` for its forward, every other one back to CPU first (peak: the
    largest component plus activations); "sequential": every leaf module's weights move in for its own forward
    (peak: the largest layer plus activations). The pipeline's `device` then names `device` (its property reads
    `execution_device`), so noise, ids and text embeddings are made there. Call once, on a pipeline loaded to CPU."""
    if mode not in MODES:
        raise ValidationError([Problem("offload", mode, f"must be one of {', '.join(MODES)}")])
    device = torch.device(device)
    components, resident = pipeline_components(pipe)
    for part in resident:
        part.to(device)
    if mode == "sequential":
        from accelerate import cpu_offload

        _check_sequential(components)
        for c in components:
            cpu_offload(c.weights, execution_device=device)
        return Offload(mode, device, components)
    from accelerate.hooks import add_hook_to_module

    hook_class, group = _model_hook_class(), []
    for c in components:
        hook = hook_class(c, device, group)
        add_hook_to_module(c.entry, hook)
        if c.weights is not c.entry:  # a direct call of the transformer loads it too, and execution_device finds it
            add_hook_to_module(c.weights, hook)
    return Offload(mode, device, components, group)
