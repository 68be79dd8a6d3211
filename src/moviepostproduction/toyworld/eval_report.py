"""The files of `mpp eval` (toyworld/compose_eval.py): the markdown table, the per-sample CSV and the image grid."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from PIL import Image

from moviepostproduction.errors import Problem


class Scored(Protocol):
    """A scored variant (compose_eval.VariantScore, dense_eval.CountScore): a name and one record per sample."""

    name: str
    samples: list[dict]


def choice_problems(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[list[str], list[Problem]]:
    """Comma separated names out of `allowed` (`--variants model,untrained`): the names given, and a Problem naming
    the flag for each unknown one, or one for an empty list."""
    chosen = [v.strip() for v in text.split(",") if v.strip()]
    expected = f"expected some of {', '.join(allowed)}"
    problems = [Problem(flag, v, expected) for v in chosen if v not in allowed]
    if not chosen:
        problems.append(Problem(flag, text, expected))
    return chosen, problems


def eval_grid(scenes, images: dict[str, list[np.ndarray]], rows: int = 6) -> Image.Image:
    """Rows = scenes; columns = target, then each variant, with the requested boxes drawn."""
    from moviepostproduction.visualize import draw_layout, image_grid

    tiles = []
    for k, (toy, _) in enumerate(scenes[:rows]):
        boxes, depths = [r.bbox for r in toy.refs], [r.depth for r in toy.refs]
        for img in [toy.image, *(images[v][k] for v in images)]:
            tiles.append(draw_layout(Image.fromarray(img), boxes, depths))
    return image_grid(tiles, columns=1 + len(images))


def markdown_table(rows: list[dict], columns: tuple[str, ...] | list[str], nan: str = "-") -> str:
    """Markdown table of `rows` over `columns`: strings and integers as they are, other numbers to 3 decimals, a
    NaN score (nothing to judge) as `nan`."""

    def cell(value) -> str:
        if isinstance(value, str | int):
            return str(value)
        return nan if math.isnan(value) else f"{value:.3f}"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_eval_files(out, header: str, table: str, report: dict, scores: list[Scored], grid: Image.Image) -> str:
    """The files of an eval in the folder `out`: eval.md (header and table), eval.json (`report`; NaN scores in its
    "rows" written as null), samples.csv (`scores`) and grid.png. Returns the line naming the grid."""
    import json
    from pathlib import Path

    from moviepostproduction.files import write_text_atomic
    from moviepostproduction.visualize import save_png

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(header + "\n\n" + table + "\n", folder / "eval.md")
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in report["rows"]]
    write_text_atomic(json.dumps({**report, "rows": rows}, indent=2), folder / "eval.json")
    write_text_atomic(samples_csv(scores), folder / "samples.csv")
    return f"wrote {save_png(grid, folder / 'grid.png')}"


def format_table(rows: list[dict]) -> str:
    """Markdown table: one row per model, columns model | IoU | centre error | fg identity | fg colour | fg shape |
    fg identity (seen pairs) | fg identity (unseen pairs) | leakage | refs."""
    cols = ["model", "IoU", "centre error", "fg identity", "fg colour", "fg shape", "fg identity (seen pairs)",
            "fg identity (unseen pairs)", "leakage", "refs"]  # fmt: skip
    return markdown_table(rows, cols, nan="nan")


def samples_csv(scores: list[Scored]) -> str:
    """One CSV row per variant, scene, ref and seed: the ref, where it landed (IoU, centre error) and, for the fg
    refs judged for identity, what the crop at its box reads as (named colour, shape class) and whether both match."""
    import csv
    import io

    out = io.StringIO()
    writer = None
    for score in scores:
        for sample in score.samples:
            row = {"model": score.name, **sample}
            if writer is None:
                writer = csv.DictWriter(out, fieldnames=list(row), lineterminator="\n")
                writer.writeheader()
            writer.writerow(row)
    return out.getvalue()
