"""Conditioning overhead against plain FLUX, measured side by side in one process (docs/benchmarks.md).

The stock diffusers `FluxTransformer2DModel` forward and `ConditionedFlux.forward` run on identical inputs,
interleaved (plain, cond 0 refs, cond 10 refs, ... then again), after warm-up; each case reports the median.
The model has FLUX.1-dev width with one double and one single block (random init): weights and activations
per block are those of the real model, so the per-block ratio is what carries over to 19 + 38 blocks.
What is paid once per scene is timed apart: the reference image encoders and the adapter's heads (`prepare`).
Nothing here prints; callers format `BenchReport` with bench/report.py.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from moviepostproduction.bench.cpu_heap import heap_kept, keep_freed_memory
from moviepostproduction.bench.memory import PeakMemory
from moviepostproduction.bench.results import CaseResult, EncoderResult, PrepareResult
from moviepostproduction.bench.setup import (
    BOXES,
    BenchShape,
    bench_refs,
    build_image_encoder,
    build_model,
    make_inputs,
    token_grid,
)
from moviepostproduction.compose.assemble_rows import MAX_BUCKETS, PATHS
from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.layout import bbox_token_mask

logger = logging.getLogger(__name__)

MODES = ("forward", "train")
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}  # process: CPU time of this process's threads
CPU_HEAPS = ("keep", "system")
HEAP_NOTES = {True: "freed memory kept in the process", False: "system allocator defaults"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_TOKENS = 65536  # image tokens per case: 4096 x 4096 px at FLUX's 16 px per token, bounded before any work
MAX_REFS = 1000  # references per case (the design's 50, and stress cases well past it)


@dataclass(frozen=True)
class BenchConfig:
    tokens: tuple[int, ...] = (1024, 4096)  # image tokens per case (grid as square as the count allows)
    refs: tuple[int, ...] = (0, 10, 50, 100)
    text_tokens: int = 512
    batch: int = 1  # samples per call (training runs batches: per-sample work in the conditioning shows here)
    modes: tuple[str, ...] = MODES
    repeats: int = 3  # timed rounds; each case reports the median
    warmup: int = 1  # untimed rounds first; the last one also measures peak memory
    device: str = "cpu"
    dtype: str = "fp32"
    coverage: float = 0.5  # fraction of the image covered by the union of the boxes (small boxes)
    boxes: str = "small"  # "small": random boxes inside the covered strip; "large": each 25-100 % of the frame
    layout_active: bool = True  # Assemble-Attn on (first `grounding_ratio` of the steps) or off
    assemble_calls: int = MAX_BUCKETS  # Assemble-Attn attention calls per layout block at most (1: one padded call)
    assemble_path: str = "auto"  # Assemble-Attn plan: cheaper by cost ("auto"), or "buckets" / "shared" forced
    encoder_refs: int = 50  # reference images through the image encoders, timed once (0: skip)
    threads: int | None = None  # torch intra-op threads during the run (None: torch's default)
    clock: str = "wall"  # "process" (CPU time) is steadier than wall time on a shared CPU with one thread
    cpu_heap: str = "keep"  # "keep": freed memory stays in the process (cpu_heap.py); "system": glibc's defaults
    shape: BenchShape = field(default_factory=BenchShape)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (
                "tokens",
                self.tokens,
                bool(self.tokens) and all(0 < t <= MAX_TOKENS for t in self.tokens),
                f"need counts in [1, {MAX_TOKENS}]",
            ),
            (
                "refs",
                self.refs,
                bool(self.refs) and all(0 <= r <= MAX_REFS for r in self.refs),
                f"need counts in [0, {MAX_REFS}]",
            ),
            ("text_tokens", self.text_tokens, 0 < self.text_tokens <= 4096, "must be in [1, 4096]"),
            ("batch", self.batch, 1 <= self.batch <= 64, "must be in [1, 64]"),
            ("mode", self.modes, bool(self.modes) and set(self.modes) <= set(MODES), f"choose from {MODES} or all"),
            ("repeats", self.repeats, 1 <= self.repeats <= 1000, "must be in [1, 1000]"),
            ("warmup", self.warmup, 1 <= self.warmup <= 100, "must be in [1, 100] (warm-up also measures memory)"),
            ("dtype", self.dtype, self.dtype in DTYPES, f"choose from {tuple(DTYPES)}"),
            ("coverage", self.coverage, 0.0 < self.coverage <= 1.0, "must be in (0, 1]"),
            ("boxes", self.boxes, self.boxes in BOXES, f"choose from {BOXES}"),
            ("assemble_calls", self.assemble_calls, self.assemble_calls >= 1, "must be >= 1"),
            ("assemble_path", self.assemble_path, self.assemble_path in PATHS, f"choose from {PATHS}"),
            ("encoder_refs", self.encoder_refs, 0 <= self.encoder_refs <= MAX_REFS, f"must be in [0, {MAX_REFS}]"),
            ("threads", self.threads, self.threads is None or self.threads >= 1, "must be >= 1"),
            ("clock", self.clock, self.clock in CLOCKS, f"choose from {tuple(CLOCKS)}"),
            ("cpu_heap", self.cpu_heap, self.cpu_heap in CPU_HEAPS, f"choose from {CPU_HEAPS}"),
        ]
        problems = [Problem(name, value, message) for name, value, ok, message in checks if not ok]
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            problems.append(Problem("device", self.device, "choose cpu or cuda"))
        elif self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append(Problem("device", self.device, "CUDA is not available on this machine"))
        elif self.device.startswith("cuda") and self.clock == "process":
            problems.append(Problem("clock", self.clock, "process time does not see GPU work; use wall on cuda"))
        if problems:
            raise ValidationError(problems)


@dataclass(frozen=True)
class BenchReport:
    config: BenchConfig
    torch_version: str
    cpu_count: int
    threads: int
    device_name: str
    memory_method: str | None  # None: memory not measured (why is in `memory_note`)
    memory_note: str
    heap_kept: bool  # the CPU heap keeps freed memory (cpu_heap.keep_freed_memory took effect)
    cases: list[CaseResult]
    prepares: list[PrepareResult]
    encoders: EncoderResult | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        for case, row in zip(self.cases, data["cases"], strict=True):
            row.update(
                plain_s=case.plain_s, conditioned_s=case.conditioned_s, ratio=case.ratio, round_ratios=case.round_ratios
            )
        for prep, row in zip(self.prepares, data["prepares"], strict=True):
            row["fraction"] = prep.fraction
        return data


def parse_numbers(name: str, text: str, kind: type = int) -> tuple:
    """'1024,4096' -> (1024, 4096); a bad item raises a one-line ValidationError naming the option."""
    try:
        return tuple(kind(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise ValidationError([Problem(name, text, f"expected comma-separated {kind.__name__} values")]) from None


def _step(model, inputs: dict, mode: str, scene: tuple | None, layout: bool) -> Callable[[], None]:
    """One plain (scene None) or conditioned call; scene = (RefBatch, its prepared Conditioning).

    Train: fwd + bwd with the base frozen and the adapter trainable. The latent input asks for a gradient in
    both, so plain pays the same activation-gradient backward through every block as the conditioned step.
    """
    if mode == "forward":

        def forward() -> None:
            with torch.no_grad():
                if scene is None:
                    model.plain_forward(**inputs)
                else:
                    model(**inputs, conditioning=scene[1], layout_active=layout)

        return forward
    grid, text_len = token_grid(inputs["hidden_states"].shape[1]), inputs["txt_ids"].shape[0]

    def train_step() -> None:
        kwargs = {**inputs, "hidden_states": inputs["hidden_states"].detach().requires_grad_(True)}
        if scene is None:
            out = model.plain_forward(**kwargs)
        else:  # in training every batch is a new scene, so prepare (with grad) is part of the step
            out = model(**kwargs, conditioning=model.prepare(scene[0], grid, text_len), layout_active=layout)
        out.float().square().mean().backward()
        model.adapter.zero_grad(set_to_none=True)

    return train_step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    _sync(device)
    start = now()
    fn()
    _sync(device)
    return now() - start


def _interleave(variants: dict, cfg: BenchConfig, memory: PeakMemory, label: str) -> tuple[dict, dict]:
    """Round by round, every variant once: warm-up rounds (the last measures peak memory), then timed rounds."""
    device = torch.device(cfg.device)
    times: dict = {name: [] for name in variants}
    peaks: dict = {}
    for round_ in range(cfg.warmup + cfg.repeats):
        logger.info("%s: round %d of %d", label, round_ + 1, cfg.warmup + cfg.repeats)
        for name, fn in variants.items():
            if round_ >= cfg.warmup:
                times[name].append(_timed(fn, device, cfg.clock))
            elif round_ == cfg.warmup - 1:
                peaks[name] = memory.measure(fn)
            else:
                fn()
    return times, peaks


def _group(model, cfg: BenchConfig, mode: str, tokens: int, memory: PeakMemory) -> list[CaseResult]:
    """Plain and one conditioned variant per refs count at one (mode, tokens), on identical inputs."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    grid = token_grid(tokens)
    inputs = make_inputs(cfg.shape, grid, cfg.text_tokens, device, dtype, cfg.seed, cfg.batch)
    scenes = {}
    for r in cfg.refs:
        refs = bench_refs(r, model.adapter.cfg, cfg.coverage, cfg.text_tokens, cfg.seed + r, cfg.batch, cfg.boxes)
        refs = refs.to(device, dtype)
        with torch.no_grad():
            scenes[r] = (refs, model.prepare(refs, grid, cfg.text_tokens))
    variants = {"plain": _step(model, inputs, mode, None, cfg.layout_active)}
    variants |= {r: _step(model, inputs, mode, scenes[r], cfg.layout_active) for r in cfg.refs}
    times, peaks = _interleave(variants, cfg, memory, f"{mode} {tokens} tokens")
    cases = []
    for r, (refs, cond) in scenes.items():
        covered = bbox_token_mask(refs.bboxes[0].float(), grid).any(0).float().mean().item() if r else 0.0
        rows = None
        if r:  # the plan the timed step ran: prepare's (no autograd) when sampling; training plans under autograd
            with torch.set_grad_enabled(mode == "train"):
                rows = model.with_rows(replace(cond, rows=None)).rows
        cases.append(
            CaseResult(
                mode=mode,
                tokens=tokens,
                text_tokens=cfg.text_tokens,
                refs=r,
                covered=covered,
                regions=cond.image_regions.num_regions,
                layout_slots=rows.num_slots if rows is not None else 0,
                plain_times=tuple(times["plain"]),
                conditioned_times=tuple(times[r]),
                plain_peak_mib=peaks["plain"],
                conditioned_peak_mib=peaks[r],
                boxes=cfg.boxes,
                layout_path=("shared" if rows.shared is not None else "buckets") if rows is not None else "",
                mask_bytes=rows.mask_bytes if rows is not None else 0,
            )
        )
    return cases


def _prepare_time(model, cfg: BenchConfig, case: CaseResult) -> PrepareResult:
    """Median `adapter.prepare` time of the case's scene, against its median conditioned forward step."""
    device, grid = torch.device(cfg.device), token_grid(case.tokens)
    seed = cfg.seed + case.refs
    refs = bench_refs(case.refs, model.adapter.cfg, cfg.coverage, cfg.text_tokens, seed, cfg.batch, cfg.boxes)
    refs = refs.to(device, DTYPES[cfg.dtype])

    def prepare() -> None:
        with torch.no_grad():
            model.prepare(refs, grid, cfg.text_tokens)

    seconds = statistics.median(_timed(prepare, device, cfg.clock) for _ in range(cfg.warmup + cfg.repeats))
    return PrepareResult(case.tokens, case.refs, seconds, case.conditioned_s)


def _encoder_time(cfg: BenchConfig) -> EncoderResult:
    """One batch of `encoder_refs` random images through CLIP + DINOv2 (after a one-image warm-up)."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    encoder = build_image_encoder(cfg.shape).to(device=device, dtype=dtype)
    side = cfg.shape.image_size
    pixels = torch.rand(cfg.encoder_refs, 3, side, side, generator=torch.Generator().manual_seed(cfg.seed)) * 2 - 1
    pixels = pixels.to(device)
    with torch.no_grad():
        encoder.encode_pixels(pixels[:1])
        seconds = _timed(lambda: encoder.encode_pixels(pixels), device, cfg.clock)
    return EncoderResult(cfg.encoder_refs, seconds, cfg.shape.encoder_name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as info:
            names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or "cpu"


def run_benchmark(cfg: BenchConfig) -> BenchReport:
    """The encoders once, every (mode, tokens) group of cases, then the prepare time of every forward case with refs."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: BenchConfig) -> BenchReport:
    device = torch.device(cfg.device)
    if device.type == "cpu" and cfg.cpu_heap == "keep":
        keep_freed_memory()
    elif device.type == "cpu" and heap_kept():
        raise ValidationError(
            [Problem("cpu_heap", cfg.cpu_heap, "this process already keeps freed memory; use a new one")]
        )
    torch.manual_seed(cfg.seed)
    encoders = _encoder_time(cfg) if cfg.encoder_refs > 0 else None
    model = build_model(cfg.shape, max(cfg.refs)).to(device=device, dtype=DTYPES[cfg.dtype])
    model.assemble_calls, model.assemble_path = cfg.assemble_calls, cfg.assemble_path
    model.transformer.requires_grad_(False)  # base frozen, adapter trainable, as in training
    model.adapter.requires_grad_(True)
    memory = PeakMemory(device)
    cases = [case for mode in cfg.modes for tokens in cfg.tokens for case in _group(model, cfg, mode, tokens, memory)]
    prepares = [_prepare_time(model, cfg, case) for case in cases if case.mode == "forward" and case.refs > 0]
    return BenchReport(
        config=cfg,
        torch_version=torch.__version__,
        cpu_count=os.cpu_count() or 0,
        threads=torch.get_num_threads(),
        device_name=_device_name(device),
        memory_method=memory.method,
        memory_note=memory.note,
        heap_kept=heap_kept(),
        cases=cases,
        prepares=prepares,
        encoders=encoders,
    )


def default_tokens(device: str) -> tuple[int, ...]:
    """1024 and 4096 image tokens (1024^2 px at FLUX's 16 px per token); CUDA adds 8192 (2048 x 1024 px)."""
    return (1024, 4096, 8192) if device.startswith("cuda") else (1024, 4096)


def default_dtype(device: str) -> str:
    """fp32 on CPU (where bf16 matmuls are emulated on many machines), bf16 on CUDA as FLUX runs there."""
    return "bf16" if device.startswith("cuda") else "fp32"


def parse_modes(text: str) -> tuple[str, ...]:
    if text == "all":
        return MODES
    if text not in MODES:
        raise ValidationError([Problem("--mode", text, "choose forward, train or all")])
    return (text,)
