"""`mpp`: a thin typed CLI over the Python API. The library never parses argv; this file only does."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from .errors import MppError

app = typer.Typer(
    name="mpp",
    help="moviepostproduction: compose, panorama, fill and vary with diffusion transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """Report `MppError`s as their one-line messages on stderr and exit with code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MppError as err:
            for line in str(err).splitlines() or [type(err).__name__]:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)


# Commands register themselves below, one small function each over the Python API.


@app.command()
@user_errors
def validate(
    scene: str = typer.Argument(..., help="Scene file (.json, .yaml or .yml)."),
    max_refs: int = typer.Option(50, "--max-refs", min=0, help="Most refs the scene may have."),
) -> None:
    """Check a scene file and list its refs; on problems print one line each and exit with code 2."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .scene import DEPTHS, load_scene

    loaded = load_scene(scene, max_refs=max_refs)
    console = Console(highlight=False, soft_wrap=True)
    if loaded.refs:
        table = Table(title=Text(loaded.caption))
        table.add_column("#", justify="right")
        table.add_column("image", overflow="fold")  # file names are never cut with an ellipsis
        table.add_column("depth")
        table.add_column(Text("bbox [x0, y0, x1, y1]"), no_wrap=True)  # Text: not markup
        table.add_column("area %", justify="right")
        table.add_column("caption")
        for i, ref in enumerate(loaded.refs):
            bbox = "[" + ", ".join(f"{v:g}" for v in ref.bbox) + "]" + (" wraps" if ref.wraps else "")
            cells = (str(i), ref.image.name, ref.depth, bbox, f"{100 * ref.area:.1f}", ref.caption or "")
            table.add_row(*(Text(c) for c in cells))  # Text: captions are never read as rich markup
        console.print(table)
    counts = ", ".join(f"{d} {sum(r.depth == d for r in loaded.refs)}" for d in DEPTHS)
    kind = "panorama" if loaded.panorama else "scene"
    console.print(
        Text(
            f"{scene}: valid {kind}, {loaded.width}x{loaded.height}, seed {loaded.seed}, "
            f"{len(loaded.refs)} refs ({counts})"
        )
    )
