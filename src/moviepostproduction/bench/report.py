"""One line per `mpp bench` result: the header, each case, the once-per-scene costs."""

from __future__ import annotations

from moviepostproduction.bench.harness import HEAP_NOTES, BenchReport, CaseResult, EncoderResult, PrepareResult


def format_header(report: BenchReport) -> str:
    cfg, shape = report.config, report.config.shape
    return (
        f"{report.device_name} ({report.cpu_count} cores, {report.threads} torch threads), torch "
        f"{report.torch_version}, {cfg.dtype}; FLUX width {shape.heads} x {shape.head_dim} = {shape.width}, "
        f"{shape.double_blocks} double + {shape.single_blocks} single block; "
        + (f"batch {cfg.batch}; " if cfg.batch > 1 else "")
        + f"Assemble-Attn <= {cfg.assemble_calls} "
        f"call(s) per layout block; {cfg.clock} clock, median of {cfg.repeats} after {cfg.warmup} warm-up; "
        + (f"CPU heap: {HEAP_NOTES[report.heap_kept]}; " if cfg.device.startswith("cpu") else "")
        + f"memory: {report.memory_note}"
    )


def format_case(case: CaseResult) -> str:
    """`forward 4096 tokens 50 refs: plain 3.41 s, conditioned 3.62 s, ratio 1.06 [...]`."""
    rounds = case.round_ratios
    line = (
        f"{case.mode} {case.tokens} tokens {case.refs} refs: plain {case.plain_s:.3g} s, "
        f"conditioned {case.conditioned_s:.3g} s, ratio {case.ratio:.2f} "
        f"[rounds {min(rounds):.2f}-{max(rounds):.2f}, covered {100 * case.covered:.0f}%, "
        f"{case.regions} regions, "
        + (
            f"{case.boxes} boxes, {case.layout_path} plan, {case.layout_slots} layout slots, "
            f"masks {case.mask_bytes / 2**20:.2f} MiB"
            if case.refs
            else f"{case.layout_slots} layout slots"
        )
    )
    if case.plain_peak_mib is not None and case.conditioned_peak_mib is not None:
        line += f", peak MiB plain {case.plain_peak_mib:.0f} / conditioned {case.conditioned_peak_mib:.0f}"
    return line + "]"


def format_encoders(result: EncoderResult) -> str:
    """`prepare encoders 50 refs: 61.2 s once per scene (CLIP + DINOv2 ViTs (24 x 1024, /14, 224 px))`."""
    return f"prepare encoders {result.refs} refs: {result.seconds:.3g} s once per scene ({result.encoders})"


def format_prepare(prep: PrepareResult) -> str:
    """`prepare 4096 tokens 50 refs: 0.08 s once per scene = 2.2% of one conditioned step (3.62 s)`."""
    line = f"prepare {prep.tokens} tokens {prep.refs} refs: {prep.prepare_s:.3g} s once per scene"
    if prep.fraction is not None:
        line += f" = {100 * prep.fraction:.1f}% of one conditioned step ({prep.step_s:.3g} s)"
    return line
