"""The `mpp` app, its one-line error reporting and the small parsers its commands share."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import TypeVar

import typer

from moviepostproduction.errors import MppError

app = typer.Typer(
    name="mpp",
    help="moviepostproduction: compose, panorama, fill and vary with diffusion transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """Report `MppError`s (and running out of memory) as one-line messages on stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MppError, MemoryError, RuntimeError) as err:
            if not isinstance(err, MppError):  # an out-of-memory no command translated itself; anything else is a bug
                from moviepostproduction.resources import out_of_memory_error

                err = out_of_memory_error(err)
                if err is None:
                    raise
            for line in str(err).splitlines() or [type(err).__name__]:
                typer.echo(f"error: {line}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)


def ref_guidance_option():
    """`--ref-guidance`; left out, the pipeline takes the model dir's `ref_guidance_scale` (docs/sampling.md)."""
    return typer.Option(None, "--ref-guidance", help="Reference guidance scale, 1 = off (default: the model dir's).")


def noise_temperature_option():
    """`--noise-temperature`; left out, the pipeline takes the model dir's `noise_temperature` (docs/sampling.md)."""
    return typer.Option(
        None, "--noise-temperature", help="Factor on the starting noise, 1 = as drawn (default: the model dir's)."
    )


def parse_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        from moviepostproduction.errors import Problem, ValidationError

        raise ValidationError([Problem("--dtype", name, f"must be one of {', '.join(table)}")])
    return table[name]
