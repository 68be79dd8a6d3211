"""Guards around one generation request: non-finite inputs, a pre-flight memory bound, out-of-memory messages.

A request that cannot work should fail before sampling with one line that says what to change, never with a
traceback from deep inside a convolution. Three guards, all usable around any pipeline call:
- `require_finite`: NaN / Inf in latents, reference images or prompt embeddings is a `ValidationError` naming
  the input, raised before the first model call.
- `preflight`: a *lower bound* on the memory a request needs (weights + the larger of the transformer's
  activations and the VAE decoder's full-resolution activations). Only a request whose lower bound exceeds the
  device's total memory is refused (100000 x 100000 is, 1024 x 1024 on a big GPU never is), so it never rejects
  a request that could have fitted.
- `memory_guard`: torch's out-of-memory error (CUDA), `MemoryError` and the CPU allocator's "not enough memory"
  `RuntimeError` become a `ResourceError` naming the size, the number of refs and smaller values to try.
`run_guarded` applies the three in order around one call.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from moviepostproduction.encoders.weight_files import (
    CONFIGS,
    built_params,
    component_bytes,
    on_device,
    outside_bytes,
    positive_size,
    quantized_bytes,
    read_config,
)
from moviepostproduction.errors import MppError, Problem, ValidationError

if TYPE_CHECKING:
    from moviepostproduction.model_dir import ModelDir

__all__ = [
    "LOADS",
    "ModelDims",
    "Request",
    "ResourceError",
    "device_memory",
    "is_out_of_memory",
    "memory_guard",
    "minimum_bytes",
    "out_of_memory_error",
    "preflight",
    "preflight_weights",
    "require_finite",
    "run_guarded",
]

T = TypeVar("T")

GIB = 1024**3
TOKEN_PIXELS = 16  # VAE 8x downsampling x FLUX 2x2 packing
# Live (B, N + T, D) tensors in a block at its peak, counted low: hidden states, q, k, v, attention output and
# the MLP's 4 D expansion counted once (D wide) -> 6. Real peaks are higher; this is a lower bound on purpose.
TRANSFORMER_COPIES = 6
VAE_COPIES = 2  # a full-resolution conv reads one (B, c0, H, W) tensor and writes another
# Substrings of the RuntimeError texts torch raises when an allocation fails (CUDA, the CPU allocator, MPS).
OOM_MARKERS = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")
FLUX_VAE_CHANNELS = (128, 256, 512, 512)  # used when a model dir has no readable vae/config.json
DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


class ResourceError(MppError):
    """A request too large for the device: the one-line message names the size, the refs and what to try."""


@dataclass(frozen=True)
class Request:
    """What is being generated, as far as memory is concerned."""

    what: str  # "compose", "panorama", "fill", "vary": names the step in messages
    height: int
    width: int
    refs: int = 0
    batch: int = 1
    device: str = "cpu"

    def describe(self) -> str:
        size = f" at {self.height}x{self.width} (height x width)" if self.height else ""  # 0: loading the weights
        refs = f" with {self.refs} ref{'s' if self.refs != 1 else ''}" if self.refs else ""
        batch = f", batch {self.batch}" if self.batch > 1 else ""
        return f"{self.what}{size}{refs}{batch} on {self.device}"


@dataclass(frozen=True)
class ModelDims:
    """The sizes the memory bound needs; FLUX.1-dev in bf16 by default."""

    hidden: int = 3072  # D of the transformer
    text_tokens: int = 512  # T5 sequence length
    vae_channels: int = 128  # channels of the VAE decoder at full resolution (block_out_channels[0])
    vae_factor: int = 8
    bytes_per_value: int = 2
    weights_bytes: int = 0  # everything loaded for the request (transformer, encoders, VAE)
    token_pixels: int = TOKEN_PIXELS  # image pixels per transformer token along each side (NanoDiT: VAE x patch)
    sample_pixels: int = 0  # the image side a NanoDiT config fixes (sample_size x the VAE factor); 0: the request's
    weights_from: str = ""  # the config file whose sizes dominate a weights bound larger than the weight files

    @classmethod
    def from_model_dir(
        cls,
        root: str | Path | ModelDir,
        dtype: torch.dtype = torch.float32,
        *,
        adapter: str | Path | None = None,
        components: Sequence[str] | None = None,
        transformer: str = "transformer",
        quantize: Mapping[str, str] | None = None,
        offload: str | None = None,
    ) -> ModelDims:
        """Read the sizes from config files and weight file sizes: nothing is loaded, so this runs before loading.

        `components`: the top-level folders the request loads (None: all); their weight files count, and so does
        a lower bound on the parameters their configs would build, so a config naming 10**9 layers is refused
        here rather than constructed. `transformer`: the folder of the denoiser ("nanodit" for vary). `quantize`:
        folder -> spec ({"transformer": "nf4"}); `offload`: "model" or "sequential" counts what is on the device at
        once (encoders/weight_files.py: only the files the loaders read, each tensor at the dtype it is loaded in)."""
        md = root if hasattr(root, "adapter") else None  # a ModelDir: its adapter and encoders may be elsewhere
        if md is None and adapter is not None and Path(root).is_dir():
            from moviepostproduction.model_dir import ModelDir

            md = ModelDir.at(root, adapter)
        root = md.root if md is not None else Path(root)
        loads = (lambda folder: True) if components is None else (lambda folder: folder.split("/")[0] in components)
        config = read_config(root / transformer / "config.json")
        vae = read_config(root / "vae" / "config.json")
        b = DTYPE_BYTES.get(dtype, 4)
        folders = components if components is not None else [p.name for p in sorted(root.glob("*/"))]
        per_value = quantized_bytes(quantize)
        inside = component_bytes(root, folders, b, per_value)
        weights = on_device({**inside, **(outside_bytes(md, folders, b) if md is not None else {})}, offload)
        built = {c: built_params(read_config(root / c / "config.json")) for c in CONFIGS if loads(c)}
        channels = vae.get("block_out_channels")
        if not (isinstance(channels, list) and channels and all(positive_size(c) for c in channels)):
            channels = FLUX_VAE_CHANNELS
        built["vae"] = positive_size(vae.get("layers_per_block")) * sum(9 * c * c for c in channels)  # 3x3 convs
        largest = max(built, key=built.__getitem__)
        vae_factor = 2 ** min(len(channels) - 1, 16)
        sizes = dict(vae_channels=int(channels[0]), vae_factor=vae_factor, bytes_per_value=b)
        if transformer == "transformer":
            text_tokens = positive_size(read_config(root / "model_index.json").get("max_text_tokens")) or 512
            heads, head_dim = (positive_size(config.get(k)) for k in ("num_attention_heads", "attention_head_dim"))
            hidden = heads * head_dim or 3072
            sizes.update(hidden=hidden, text_tokens=text_tokens)
        else:  # NanoDiT: its own width, patch size and sample size; its text is short and counted as none
            sizes.update(
                hidden=positive_size(config.get("hidden_size")) or 1,
                text_tokens=0,
                token_pixels=vae_factor * (positive_size(config.get("patch_size")) or 1),
                sample_pixels=positive_size(config.get("sample_size")) * vae_factor,
            )
        from_configs = on_device({c: int(n * per_value.get(c.split("/")[0], b)) for c, n in built.items()}, offload)
        return cls(
            **sizes,
            weights_bytes=max(weights, from_configs),
            weights_from=f"{largest}/config.json" if from_configs > weights else "",
        )

    @classmethod
    def of_modules(cls, transformer: torch.nn.Module, vae_config, *modules: torch.nn.Module) -> ModelDims:
        """Sizes of loaded modules: a diffusers FluxTransformer2DModel, the VAE config, and everything resident."""
        cfg = transformer.config
        param = next(transformer.parameters())
        channels = list(vae_config.block_out_channels)
        seen, weights = set(), 0
        for module in (transformer, *modules):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    weights += p.numel() * p.element_size()
        return cls(
            hidden=int(cfg.num_attention_heads) * int(cfg.attention_head_dim),
            vae_channels=int(channels[0]),
            vae_factor=2 ** (len(channels) - 1),
            bytes_per_value=param.element_size(),
            weights_bytes=weights,
        )


# The top-level folders of a model dir that each command loads, the denoiser first: only their weights count.
TEXT = ("text_encoder", "text_encoder_2")
LOADS = {
    "compose": ("transformer", "vae", *TEXT, "image_encoders", "adapter"),
    "panorama": ("transformer", "vae", *TEXT),  # a panorama scene loads what compose does
    "fill": ("transformer", "vae", *TEXT, "fill"),  # with refs, also image_encoders and adapter
    "vary": ("nanodit", "vae", *TEXT, "image_encoders"),
}


# ------------------------------------------------------------------------------------------------ non-finite
def require_finite(**tensors: torch.Tensor | None) -> None:
    """Raise one ValidationError with a line per named tensor that holds NaN or Inf (None entries are skipped)."""
    problems = []
    for name, tensor in tensors.items():
        if tensor is None or not torch.is_tensor(tensor) or not tensor.is_floating_point():
            continue
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int((~finite).sum()) - nan
        problems.append(
            Problem(name, f"shape {tuple(tensor.shape)}", f"must be finite, found {nan} NaN and {inf} Inf values")
        )
    if problems:
        raise ValidationError(problems)


# ---------------------------------------------------------------------------------------------- pre-flight
def minimum_bytes(request: Request, dims: ModelDims) -> tuple[int, str]:
    """A lower bound on the peak memory of `request` and the part that dominates it."""
    tokens = (request.height // dims.token_pixels) * (request.width // dims.token_pixels)
    b = dims.bytes_per_value
    transformer = request.batch * (tokens + dims.text_tokens) * dims.hidden * b * TRANSFORMER_COPIES
    vae = request.batch * request.height * request.width * dims.vae_channels * b * VAE_COPIES
    part = "VAE decoding at full resolution" if vae >= transformer else "transformer activations"
    return dims.weights_bytes + max(transformer, vae), part


def device_memory(device: str | torch.device) -> int | None:
    """Total memory of `device` in bytes (cgroup limit or physical RAM for cpu); None when unknown."""
    try:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available")
        if dev.type == "cuda":
            return int(torch.cuda.get_device_properties(dev).total_memory)
    except (RuntimeError, AssertionError, ValueError) as exc:  # "gpu"; "cuda:9" on a one-GPU machine
        reason = str(exc).split(" device type at")[0][:80]  # torch lists every device type it knows
        raise ValidationError([Problem("device", str(device), f"is not a device of this machine: {reason}")]) from None
    if dev.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return None
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    return int(total)


def _fitting_size(request: Request, dims: ModelDims, capacity: int) -> tuple[int, int] | None:
    """The largest multiple-of-16 size with the request's aspect whose bound fits in `capacity`."""
    step = max(TOKEN_PIXELS, dims.vae_factor * 2)

    def size(k: float) -> tuple[int, int]:
        return (max(step, int(request.height * k) // step * step), max(step, int(request.width * k) // step * step))

    def fits(k: float) -> bool:
        h, w = size(k)
        return minimum_bytes(Request(request.what, h, w, request.refs, request.batch), dims)[0] <= capacity

    if not fits(0.0):
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return size(lo)


def preflight(request: Request, dims: ModelDims, capacity: int | None = None) -> None:
    """Refuse `request` before allocating anything when even its lower bound exceeds the device's memory."""
    capacity = device_memory(request.device) if capacity is None else capacity
    if capacity is None:
        return
    need, part = minimum_bytes(request, dims)
    if need <= capacity:
        return
    have = f"more than the {capacity / GIB:.1f} GiB of {request.device} memory"
    fitting = _fitting_size(request, dims, capacity)
    if fitting is None and dims.weights_bytes > capacity:
        source = f" (the sizes in {dims.weights_from})" if dims.weights_from else ""
        hint = "check those sizes" if dims.weights_from else "use a lower-precision dtype or a device with more memory"
        raise ResourceError(
            f"{request.describe()}: the weights alone need {dims.weights_bytes / GIB:.1f} GiB{source}, {have}; {hint}"
        )
    if fitting is None:
        raise ResourceError(
            f"{request.describe()}: the weights and {dims.text_tokens} text tokens need at least "
            f"{minimum_bytes(Request(request.what, 0, 0, batch=request.batch), dims)[0] / GIB:.1f} GiB, {have}; "
            "lower max_text_tokens or use a device with more memory"
        )
    refs = ", fewer refs" if request.refs else ""
    raise ResourceError(
        f"{request.describe()} needs at least {need / GIB:.1f} GiB ({part}), {have}; "
        f"try at most {fitting[0]}x{fitting[1]} (height x width){refs} or a lower-precision dtype"
    )


def preflight_weights(
    what: str,
    root: str | Path | ModelDir,
    dtype: torch.dtype,
    device: str | torch.device,
    *,
    components: Sequence[str] = (),
    quantize: Mapping[str, str] | None = None,
    offload: str | None = None,
) -> ModelDims:
    """Refuse to load a model dir whose weights (or what its configs name: 10**9 layers, 10**9 text tokens) cannot
    fit on `device`, before anything is built; every pipeline's `from_model_dir` calls it. `components`: the folders
    loaded (default `LOADS[what]`); `quantize` / `offload` as for `ModelDims.from_model_dir`. Returns the sizes, for
    the pipeline's per-call `preflight` of a request."""
    loads = components or LOADS[what]
    dims = ModelDims.from_model_dir(
        root, dtype, components=loads, transformer=loads[0], quantize=quantize, offload=offload
    )
    preflight(Request(what, 0, 0, device=str(device)), dims)
    return dims


# ---------------------------------------------------------------------------------------------- OOM guard
def is_out_of_memory(err: BaseException) -> bool:
    """True for torch's OutOfMemoryError, MemoryError, and allocation failures reported as RuntimeError."""
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err).lower() for m in OOM_MARKERS)


def _smaller(side: int) -> int:
    """A side about 1/sqrt(2) as long (half the pixels), a multiple of 16."""
    return max(TOKEN_PIXELS, int(side / math.sqrt(2)) // TOKEN_PIXELS * TOKEN_PIXELS)


def out_of_memory_error(err: BaseException, request: Request | None = None) -> ResourceError | None:
    """The user-facing error for an out-of-memory `err` (None when `err` is something else)."""
    if not is_out_of_memory(err):
        return None
    if request is None:
        return ResourceError(
            f"out of memory ({type(err).__name__}); try a smaller height/width, fewer refs or a lower-precision dtype"
        )
    refs = f", fewer than {request.refs} refs" if request.refs > 1 else ""
    batch = f", a batch smaller than {request.batch}" if request.batch > 1 else ""
    return ResourceError(
        f"out of memory during {request.describe()}; try a smaller size such as "
        f"{_smaller(request.height)}x{_smaller(request.width)}{refs}{batch} or a lower-precision dtype"
    )


@contextlib.contextmanager
def memory_guard(request: Request) -> Iterator[None]:
    """Turn an out-of-memory failure inside the block into a one-line `ResourceError` about `request`."""
    try:
        yield
    except (MemoryError, RuntimeError) as err:
        user = out_of_memory_error(err, request)
        if user is None:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the failed request's blocks back before the user retries
        raise user from None


def run_guarded(
    request: Request,
    call: Callable[[], T],
    *,
    inputs: Mapping[str, torch.Tensor | None] | None = None,
    dims: ModelDims | None = None,
    capacity: int | None = None,
) -> T:
    """`call()` after the finiteness check of `inputs` and the pre-flight bound (when `dims` is given)."""
    require_finite(**(inputs or {}))
    if dims is not None:
        preflight(request, dims, capacity)
    with memory_guard(request):
        return call()
