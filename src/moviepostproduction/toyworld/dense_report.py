"""What `mpp eval --refs-per-scene` writes: the table per ref count (eval.md, eval.json), samples.csv, the metric vs
ref count plot (refs.png) and a grid of the first scene of each count (grid.png); toyworld/dense_eval.py scores."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from moviepostproduction.toyworld.dense_eval import (
    collapse_threshold,
    dense_scenes,
    evaluate_counts,
    parse_counts,
)
from moviepostproduction.toyworld.eval_report import markdown_table
from moviepostproduction.toyworld.synthetic import ToyWorldConfig

COLUMNS = ("refs per scene", "IoU", "centre error", "fg identity", "collapse rate", "fg DINO similarity", "refs",
           "fg refs judged", "targets: IoU", "targets: fg identity", "targets: collapse rate")  # fmt: skip
PLOTTED = ("IoU", "fg identity", "collapse rate")


def table_rows(scores: dict) -> list[dict]:
    """One row per count: the model's metrics and, prefixed "targets: ", the same metrics on the target images."""
    rows = []
    for model, targets, _ in scores.values():
        row = model.row()
        row.update({f"targets: {k}": v for k, v in targets.row().items() if k not in ("model", "refs per scene")})
        rows.append(row)
    return rows


def format_dense_table(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS, nan="nan")


def plot_by_count(rows: list[dict], size: tuple[int, int] = (560, 360)) -> Image.Image:
    """Each of PLOTTED against the ref count (log2 x axis, y in [0, 1]): the model solid, its targets thin."""
    from moviepostproduction.visualize import CURVE_COLOURS

    w, h = size
    left, right, top, bottom = 44, 150, 24, 34
    out = Image.new("RGB", size, (255, 255, 255))
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    counts = [int(r["refs per scene"]) for r in rows]
    x_lo, x_hi = math.log2(min(counts)), max(math.log2(max(counts)), math.log2(min(counts)) + 1)

    def px(count: int, y: float) -> tuple[float, float]:
        x = left + (math.log2(count) - x_lo) / (x_hi - x_lo) * (w - left - right)
        return x, top + (1 - y) * (h - top - bottom)

    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for y in (0.0, 0.5, 1.0):
        draw.text((6, px(counts[0], y)[1] - 6), f"{y:.1f}", fill=(0, 0, 0), font=font)
    for c in counts:
        draw.text((px(c, 0)[0] - 4, h - bottom + 6), str(c), fill=(0, 0, 0), font=font)
    draw.text((left, h - 14), "refs per scene", fill=(0, 0, 0), font=font)
    for i, metric in enumerate(PLOTTED):
        colour = CURVE_COLOURS[i % len(CURVE_COLOURS)]
        for key, width, label in ((metric, 3, metric), (f"targets: {metric}", 1, f"{metric} (targets, thin)")):
            line = [px(c, float(r[key])) for c, r in zip(counts, rows, strict=True) if math.isfinite(r[key])]
            if len(line) > 1:
                draw.line(line, fill=colour, width=width)
            for x, y in line:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            row = 2 * i + (width == 1)
            draw.text((w - right + 8, top + 4 + 14 * row), label, fill=colour, font=font)
    return out


def count_grid(scores: dict, scenes_by_count: dict) -> Image.Image:
    """One row per count: the first scene's target and its sample, with the requested boxes drawn."""
    from moviepostproduction.visualize import draw_layout, image_grid

    tiles = []
    for count, (_, _, first) in scores.items():
        toy = scenes_by_count[count][0][0]
        boxes, depths = [r.bbox for r in toy.refs], [r.depth for r in toy.refs]
        tiles += [draw_layout(Image.fromarray(img), boxes, depths) for img in (toy.image, first)]
    return image_grid(tiles, columns=2)


def dense_csv(scores: dict) -> str:
    from moviepostproduction.toyworld.eval_report import samples_csv

    return samples_csv([s for model, targets, _ in scores.values() for s in (model, targets)])


def run_dense_eval(
    *,
    model: str | None,
    adapter: str | None,
    counts: str,
    n: int,
    steps: int,
    size: int,
    out: str | None,
    start: int = 0,
    ref_guidance: float | None = None,
    noise_temperature: float | None = None,
    progress: bool = True,
) -> list[str]:
    """What `mpp eval --refs-per-scene COUNTS` does; returns the lines to print."""
    import json
    import tempfile

    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.errors import Problem, ValidationError
    from moviepostproduction.files import check_output, write_text_atomic
    from moviepostproduction.model_dir import ModelDir, default_model_dir
    from moviepostproduction.resources import LOADS, ModelDims, Request, preflight
    from moviepostproduction.visualize import save_png

    chosen = parse_counts(counts)
    if size % 16 or not 64 <= size <= 2048:
        raise ValidationError([Problem("--canvas", size, "must be a multiple of 16 in [64, 2048]")])
    if out:
        check_output(out, "--out", folder=True)
    md = ModelDir.at(model or default_model_dir(), adapter)
    world_data = md.index.get("toy_world_data")
    if world_data is None:
        raise ValidationError([Problem("--model", md.root, "has no toy_world_data in model_index.json; "
                                       "mpp eval scores toy-world models only")])  # fmt: skip
    world, seed = ToyWorldConfig.from_dict(world_data["config"]), int(world_data["seed"])
    preflight(Request("eval", size, size, refs=max(chosen)), ModelDims.from_model_dir(md, components=LOADS["compose"]))
    pipe = ComposePipeline.from_model_dir(md)
    used = pipe.defaults.resolve(ref_guidance_scale=ref_guidance, noise_temperature=noise_temperature)
    calibration = collapse_threshold(pipe.image_encoder, world, seed, size)
    with tempfile.TemporaryDirectory() as tmp:
        by_count = {c: dense_scenes(world, c, size, seed, n, start, Path(tmp)) for c in chosen}
        scores = evaluate_counts(pipe, by_count, steps=steps, threshold=calibration["threshold"],
                                 guidance=used.ref_guidance_scale, temperature=used.noise_temperature,
                                 progress=progress)  # fmt: skip
    rows = table_rows(scores)
    table = format_dense_table(rows)
    note = (
        f"collapse: DINO similarity of a judged fg ref's crop to its reference below {calibration['threshold']:.3f}, "
        f"the value that best separates right from wrong sprites on train-split targets (balanced accuracy "
        f"{calibration['balanced accuracy']:.3f}; {calibration['right below']:.3f} of right crops fall below it)"
    )
    lines = [
        f"dense held-out scenes {start}-{start + n - 1} per count, {size} px, {steps} steps, ref guidance "
        f"{used.ref_guidance_scale:g}, noise temperature {used.noise_temperature:g}, model {md.root}"
        + (f", adapter {md.adapter.root}" if adapter else ""),
        table,
        note,
    ]
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic("\n\n".join(lines) + "\n", folder / "eval.md")
        report = {"split": "heldout", "world": "dense", "canvas": size, "start": start, "n": n, "steps": steps,
                  "ref_guidance": used.ref_guidance_scale, "noise_temperature": used.noise_temperature,
                  "model": str(md.root), "adapter": str(md.adapter.root) if adapter else None,
                  "collapse calibration": calibration, "rows": rows}  # fmt: skip
        write_text_atomic(json.dumps(report, indent=2), folder / "eval.json")
        write_text_atomic(dense_csv(scores), folder / "samples.csv")
        lines.append(f"wrote {save_png(plot_by_count(rows), folder / 'refs.png')}")
        lines.append(f"wrote {save_png(count_grid(scores, by_count), folder / 'grid.png')}")
    return lines
