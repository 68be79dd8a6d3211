"""`mpp bench`: plain FLUX vs the conditioned forward, one result per case (run at tiny size, not timed)."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from typer.testing import CliRunner

from moviepostproduction.bench.harness import (
    BenchConfig,
    CaseResult,
    EncoderResult,
    PrepareResult,
    default_dtype,
    default_tokens,
    parse_numbers,
    run_benchmark,
)
from moviepostproduction.bench.memory import PeakMemory
from moviepostproduction.bench.report import format_case, format_encoders, format_header, format_prepare
from moviepostproduction.bench.setup import BenchShape, bench_refs, coverage_boxes, large_boxes, make_inputs, token_grid
from moviepostproduction.cli import app
from moviepostproduction.errors import ValidationError
from moviepostproduction.layout import bbox_token_mask

LINE = re.compile(
    r"^(forward|train) \d+ tokens \d+ refs: plain [\d.e+-]+ s, conditioned [\d.e+-]+ s, ratio \d+\.\d\d \["
)
TINY = BenchShape().tiny()


@pytest.fixture(scope="module")
def report():
    cfg = BenchConfig(tokens=(16, 32), refs=(0, 3), text_tokens=8, repeats=2, encoder_refs=3, shape=TINY)
    return run_benchmark(cfg)


def test_one_result_per_mode_tokens_and_refs_in_order(report):
    keys = [(c.mode, c.tokens, c.refs) for c in report.cases]
    assert keys == [(m, t, r) for m in ("forward", "train") for t in (16, 32) for r in (0, 3)]
    for case in report.cases:
        assert len(case.plain_times) == 2 and len(case.conditioned_times) == 2
        assert case.plain_s == sum(case.plain_times) / 2  # median of two
        assert case.ratio == case.conditioned_s / case.plain_s
        assert case.round_ratios == tuple(c / p for c, p in zip(case.conditioned_times, case.plain_times, strict=True))
        assert case.text_tokens == 8
        assert case.plain_peak_mib is not None and case.conditioned_peak_mib is not None  # psutil is installed


def test_plain_timings_are_shared_by_the_cases_of_one_group(report):
    forward16 = [c for c in report.cases if c.mode == "forward" and c.tokens == 16]
    assert forward16[0].plain_times == forward16[1].plain_times  # one plain run per round, interleaved


def test_case_geometry_fields(report):
    by_key = {(c.mode, c.tokens, c.refs): c for c in report.cases}
    empty, crowded = by_key["forward", 16, 0], by_key["forward", 16, 3]
    assert (empty.covered, empty.regions, empty.layout_slots) == (0.0, 1, 0)
    assert crowded.covered == 0.5  # 4 x 4 grid, boxes fill the left two columns exactly
    assert crowded.regions >= 2  # at least "inside some box" and "outside every box"
    assert 8 + 3 <= crowded.layout_slots <= 3 * 9  # 3 layout tokens + covered tokens, at most one row per group


def test_a_batch_of_scenes_runs_every_sample_with_its_own_boxes(report):
    """--batch B: B samples per call; the refs past the four tiles of the covered strip get their own boxes in each
    sample (sample 0's as at batch 1); B times the layout slots."""
    gen_cfg = BenchConfig(shape=TINY).shape
    one = bench_refs(6, _adapter_cfg(), 0.5, 8, seed=3)
    three = bench_refs(6, _adapter_cfg(), 0.5, 8, seed=3, batch=3)
    assert three.bboxes.shape == (3, 6, 4) and torch.equal(three.bboxes[0], one.bboxes[0])
    assert not torch.equal(three.bboxes[1], three.bboxes[0]) and torch.equal(three.text_spans[2], one.text_spans[0])
    inputs = make_inputs(gen_cfg, (4, 4), 8, "cpu", torch.float32, seed=0, batch=3)
    assert inputs["hidden_states"].shape[0] == inputs["timestep"].shape[0] == 3
    cfg = BenchConfig(tokens=(16,), refs=(0, 3), text_tokens=8, batch=3, repeats=1, encoder_refs=0, shape=TINY)
    batched = run_benchmark(cfg)
    assert [(c.mode, c.refs) for c in batched.cases] == [(m, r) for m in ("forward", "train") for r in (0, 3)]
    single = {(c.mode, c.tokens, c.refs): c for c in report.cases}
    for case in batched.cases:
        if case.refs:
            assert case.layout_slots >= 3 * (8 + 3) > single[case.mode, 16, 3].layout_slots
    assert "batch 3; " in format_header(batched)


def _adapter_cfg():
    from moviepostproduction.bench.setup import build_model

    return build_model(TINY, 3).adapter.cfg


def test_prepare_is_timed_once_per_forward_case_with_refs(report):
    forward = {(c.tokens, c.refs): c for c in report.cases if c.mode == "forward"}
    assert [(p.tokens, p.refs) for p in report.prepares] == [(16, 3), (32, 3)]
    for prep in report.prepares:
        assert prep.prepare_s > 0
        assert prep.step_s == forward[prep.tokens, prep.refs].conditioned_s
        assert prep.fraction == prep.prepare_s / prep.step_s


def test_encoders_are_timed_once_on_the_requested_number_of_images(report):
    assert report.encoders.refs == 3 and report.encoders.seconds > 0
    assert report.encoders.encoders == "CLIP + DINOv2 ViTs (1 x 24, /14, 28 px)"


def test_report_serialises_with_derived_values(report):
    data = json.loads(json.dumps(report.to_dict()))
    assert data["encoders"]["refs"] == 3
    assert data["config"]["shape"]["heads"] == 2 and data["torch_version"] == torch.__version__
    assert data["cases"][1]["ratio"] == report.cases[1].ratio
    assert data["cases"][1]["round_ratios"] == list(report.cases[1].round_ratios)
    assert data["heap_kept"] is True and data["config"]["cpu_heap"] == "keep"  # glibc: freed memory kept
    assert data["prepares"][0]["fraction"] == report.prepares[0].fraction


def test_format_case_and_prepare_lines():
    case = CaseResult(
        "forward", 4096, 512, 50, 0.5, 812, 10_773, (3.41,), (3.62,), 812.4, 901.0, "small", "buckets", 10773
    )
    assert format_case(case) == (
        "forward 4096 tokens 50 refs: plain 3.41 s, conditioned 3.62 s, ratio 1.06 [rounds 1.06-1.06, covered 50%, "
        "812 regions, small boxes, buckets plan, 10773 layout slots, masks 0.01 MiB, "
        "peak MiB plain 812 / conditioned 901]"
    )
    large = CaseResult("forward", 4096, 512, 50, 1.0, 906, 0, (31.1,), (36.9,), None, None, "large", "shared", 819_200)
    assert "906 regions, large boxes, shared plan, 0 layout slots, masks 0.78 MiB]" in format_case(large)
    empty = CaseResult("forward", 4096, 512, 0, 0.0, 1, 0, (3.41,), (3.4,))
    assert format_case(empty).endswith("covered 0%, 1 regions, 0 layout slots]")
    assert format_prepare(PrepareResult(4096, 50, 0.08, 3.2)) == (
        "prepare 4096 tokens 50 refs: 0.08 s once per scene = 2.5% of one conditioned step (3.2 s)"
    )
    assert format_prepare(PrepareResult(4096, 50, 0.08, None)).endswith("0.08 s once per scene")
    assert format_encoders(EncoderResult(50, 61.23, "CLIP + DINOv2 ViTs (24 x 1024, /14, 224 px)")) == (
        "prepare encoders 50 refs: 61.2 s once per scene (CLIP + DINOv2 ViTs (24 x 1024, /14, 224 px))"
    )


def test_large_boxes_each_cover_a_quarter_to_all_of_the_frame_and_overlap():
    boxes = large_boxes(50, torch.Generator().manual_seed(0))
    assert boxes.shape == (50, 4) and (boxes >= 0).all() and (boxes <= 1 + 1e-6).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (area >= 0.25 - 1e-6).all() and (area <= 1 + 1e-6).all() and area.max() - area.min() > 0.5
    masks = bbox_token_mask(boxes, (64, 64))  # (50, 4096)
    assert masks.sum(0).float().mean() > 25  # every token lies in ~30 boxes on average
    refs = bench_refs(50, BenchShape().tiny(), 0.5, 8, seed=3, boxes="large")
    assert torch.equal(refs.bboxes[0], large_boxes(50, torch.Generator().manual_seed(3)))


def test_cli_runs_large_boxes_on_the_shared_plan(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--tiny", "--tokens", "1024", "--refs", "0,20", "--repeats", "1", "--mode", "forward"]
    result = CliRunner().invoke(app, [*args, "--text-tokens", "8", "--encoder-refs", "0", "--boxes", "large"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("forward 1024 tokens 20 refs")]
    assert ", covered 100%, " in line and ", large boxes, shared plan, 0 layout slots, masks " in line
    forced = CliRunner().invoke(
        app,
        [
            *args,
            "--text-tokens",
            "8",
            "--encoder-refs",
            "0",
            "--boxes",
            "large",
            "--assemble-path",
            "buckets",
            "--json",
            str(out),
        ],
    )
    assert forced.exit_code == 0, forced.output
    case = json.loads(out.read_text())["cases"][1]
    assert (case["boxes"], case["layout_path"], case["mask_bytes"] > 0) == ("large", "buckets", True)


@pytest.mark.parametrize("coverage", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("refs", [1, 2, 3, 4, 50])
def test_union_of_boxes_is_exactly_the_covered_strip(refs, coverage):
    boxes = coverage_boxes(refs, coverage, torch.Generator().manual_seed(refs))
    assert boxes.shape == (refs, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= coverage + 1e-6).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= 1 + 1e-6).all()
    union = bbox_token_mask(boxes, (64, 64)).any(0).view(64, 64)
    strip = torch.zeros(64, 64, dtype=torch.bool)
    strip[:, : round(64 * coverage)] = True
    assert torch.equal(union, strip)


def test_cuda_defaults_to_bf16_at_8192_tokens_cpu_to_fp32():
    assert (default_dtype("cuda:0"), default_tokens("cuda")) == ("bf16", (1024, 4096, 8192))
    assert (default_dtype("cpu"), default_tokens("cpu")) == ("fp32", (1024, 4096))


def test_token_grid_is_as_square_as_the_count_allows():
    assert [token_grid(n) for n in (1024, 4096, 8192, 16, 7)] == [(32, 32), (64, 64), (64, 128), (4, 4), (1, 7)]


def test_flux_dev_width_and_a_derived_tiny_shape():
    assert (BenchShape().width, BenchShape().double_blocks, BenchShape().single_blocks) == (3072, 1, 1)
    assert BenchShape().encoder_name == "CLIP + DINOv2 ViTs (24 x 1024, /14, 224 px)"  # ViT-L/14 as FLUX refs use
    assert (BenchShape().clip_dim, BenchShape().dino_dim, BenchShape().instance_dim) == (768, 1024, 1024)
    assert (TINY.width, TINY.double_blocks, TINY.single_blocks, TINY.in_channels) == (32, 1, 1, 64)


def test_invalid_settings_name_the_field_and_value():
    with pytest.raises(ValidationError, match=r"^refs: need counts in \[0, 1000\] \(got \(-1,\)\)$"):
        BenchConfig(refs=(-1,))
    with pytest.raises(ValidationError, match=r"warmup: must be in \[1, 100\]"):
        BenchConfig(warmup=0)
    with pytest.raises(ValidationError, match=r"^clock: choose from \('wall', 'process'\) \(got 'cpu'\)$"):
        BenchConfig(clock="cpu")
    with pytest.raises(ValidationError, match=r"^--tokens: expected comma-separated int values \(got '1x'\)$"):
        parse_numbers("--tokens", "1x")
    assert parse_numbers("--refs", "0, 10,50") == (0, 10, 50)


def test_peak_memory_on_cpu_sees_a_held_allocation():
    def hold() -> None:
        block = torch.ones(16 * 2**20)  # 64 MiB
        time.sleep(0.05)
        del block

    assert PeakMemory(torch.device("cpu")).measure(hold) >= 48


def test_cli_prints_one_line_per_case_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--tiny", "--tokens", "16", "--refs", "0,2", "--repeats", "1", "--text-tokens", "8"]
    threads = torch.get_num_threads()
    options = ["--encoder-refs", "2", "--threads", "2", "--clock", "process", "--json", str(out)]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # restored after the run
    lines = result.stdout.splitlines()
    assert ", 2 torch threads), torch " in lines[0]
    assert f"torch {torch.__version__}, fp32; FLUX width 2 x 16 = 32, 1 double + 1 single block" in lines[0]
    assert "; Assemble-Attn <= 4 call(s) per layout block; process clock, median of 1 after 1 warm-up;" in lines[0]
    assert "; CPU heap: freed memory kept in the process; memory: " in lines[0]
    cases = [line for line in lines if LINE.match(line)]
    assert [line.split(":")[0] for line in cases] == [
        "forward 16 tokens 0 refs",
        "forward 16 tokens 2 refs",
        "train 16 tokens 0 refs",
        "train 16 tokens 2 refs",
    ]
    assert any(line.startswith("prepare 16 tokens 2 refs: ") for line in lines)
    assert sum(line.startswith("prepare encoders 2 refs: ") for line in lines) == 1
    assert [c["refs"] for c in json.loads(out.read_text())["cases"]] == [0, 2, 0, 2]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--mode", "bogus", "error: --mode: choose forward, train or all (got 'bogus')"),
        ("--refs", "a", "--refs"),
        ("--assemble-calls", "0", "error: assemble_calls: must be >= 1 (got 0)"),
        ("--cpu-heap", "pooled", "error: cpu_heap: choose from ('keep', 'system') (got 'pooled')"),
        ("--batch", "0", "error: batch: must be in [1, 64] (got 0)"),
        ("--boxes", "huge", "error: boxes: choose from ('small', 'large') (got 'huge')"),
        ("--assemble-path", "fast", "error: assemble_path: choose from ('auto', 'buckets', 'shared') (got 'fast')"),
    ],
)
def test_cli_reports_bad_options_in_one_line(option, value, message):
    result = CliRunner().invoke(app, ["bench", "--tiny", option, value])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_runs_assemble_attn_as_one_padded_call_on_request(tmp_path):
    out = tmp_path / "bench.json"
    args = ["bench", "--tiny", "--tokens", "64", "--refs", "7", "--repeats", "1", "--mode", "forward"]
    options = ["--text-tokens", "8", "--encoder-refs", "0", "--assemble-calls", "1", "--json", str(out)]
    result = CliRunner().invoke(app, [*args, *options])
    assert result.exit_code == 0, result.output
    assert "; Assemble-Attn <= 1 call(s) per layout block;" in result.stdout.splitlines()[0]
    assert json.loads(out.read_text())["config"]["assemble_calls"] == 1


def test_system_heap_is_refused_once_the_process_keeps_freed_memory(report):
    assert report.heap_kept  # the module's report ran with the default cpu_heap="keep"
    result = CliRunner().invoke(app, ["bench", "--tiny", "--tokens", "16", "--refs", "0", "--cpu-heap", "system"])
    assert result.exit_code == 2
    assert result.stderr == ("error: cpu_heap: this process already keeps freed memory; use a new one (got 'system')\n")
