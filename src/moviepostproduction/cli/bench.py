"""`mpp bench`: conditioning overhead against plain diffusers FLUX, side by side."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import app, user_errors


@app.command()
@user_errors
def bench(
    tokens: str = typer.Option("", "--tokens", help="Image tokens, comma separated [1024,4096; cuda adds 8192]."),
    refs: str = typer.Option("0,10,50,100", "--refs", help="Reference counts, comma separated."),
    text_tokens: int = typer.Option(512, "--text-tokens", help="Text tokens (T5 sequence length)."),
    batch: int = typer.Option(1, "--batch", help="Samples per call (each with its own boxes)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed rounds; each case reports the median."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed rounds first; the last one also measures memory."),
    mode: str = typer.Option("all", "--mode", help="forward, train or all."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available, else cpu), cpu or cuda."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16 [auto: cpu fp32, cuda bf16]."),
    coverage: float = typer.Option(0.5, "--coverage", help="Fraction of the image inside the union of the boxes."),
    boxes: str = typer.Option(
        "small", "--boxes", help="small: boxes inside the --coverage strip; large: each 25-100 % of the frame's area."
    ),
    layout: bool = typer.Option(True, "--layout/--no-layout", help="Assemble-Attn on (early steps) or off (later)."),
    assemble_calls: int | None = typer.Option(
        None, "--assemble-calls", help="Assemble-Attn attention calls per layout block at most [4]; 1: one padded call."
    ),
    assemble_path: str = typer.Option(
        "auto", "--assemble-path", help="Assemble-Attn plan: auto (cheaper by cost), buckets or shared."
    ),
    encoder_refs: int = typer.Option(50, "--encoder-refs", help="Images through CLIP + DINOv2, timed once (0: skip)."),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads [default: torch's]."),
    clock: str = typer.Option("wall", "--clock", help="wall, or process (CPU time; steadier on a shared CPU)."),
    cpu_heap: str = typer.Option(
        "keep", "--cpu-heap", help="keep: freed memory stays in the process (as on CUDA); system: glibc defaults."
    ),
    tiny: bool = typer.Option(False, "--tiny", help="Test-size model (D=32) instead of FLUX.1-dev width."),
    json_out: str | None = typer.Option(None, "--json", help="Also write every timing to this JSON file."),
) -> None:
    """Time plain FLUX against the conditioned forward on identical inputs, interleaved; one line per case."""
    import json

    from moviepostproduction.bench.harness import (
        BenchConfig,
        default_dtype,
        default_tokens,
        parse_modes,
        parse_numbers,
        run_benchmark,
    )
    from moviepostproduction.bench.report import format_case, format_encoders, format_header, format_prepare
    from moviepostproduction.bench.setup import BenchShape
    from moviepostproduction.compose.assemble_rows import MAX_BUCKETS
    from moviepostproduction.devices import resolve_device
    from moviepostproduction.files import check_output, write_text_atomic

    if json_out:
        check_output(json_out, "--json")  # before the timings, not after them
    device = resolve_device(device)
    dtype = "" if dtype == "auto" else dtype
    cfg = BenchConfig(
        tokens=parse_numbers("--tokens", tokens) or default_tokens(device),
        refs=parse_numbers("--refs", refs),
        text_tokens=text_tokens,
        batch=batch,
        modes=parse_modes(mode),
        repeats=repeats,
        warmup=warmup,
        device=device,
        dtype=dtype or default_dtype(device),
        coverage=coverage,
        boxes=boxes,
        layout_active=layout,
        assemble_calls=MAX_BUCKETS if assemble_calls is None else assemble_calls,
        assemble_path=assemble_path,
        encoder_refs=encoder_refs,
        threads=threads,
        clock=clock,
        cpu_heap=cpu_heap,
        shape=BenchShape().tiny() if tiny else BenchShape(),
    )
    report = run_benchmark(cfg)
    typer.echo(format_header(report))
    encoders = [format_encoders(report.encoders)] if report.encoders is not None else []
    for line in [*map(format_case, report.cases), *encoders, *map(format_prepare, report.prepares)]:
        typer.echo(line)
    if json_out:
        write_text_atomic(json.dumps(report.to_dict(), indent=2), json_out)
        typer.echo(f"wrote {json_out}")
