"""The `mpp` app, its one-line error reporting and the small parsers its commands share."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import TypeVar

import typer
from typer.core import TyperGroup

try:  # recent typer vendors click; older releases use click itself
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError

from moviepostproduction.errors import SHOWN_MESSAGE, MppError, Problem, one_line, shown_path


class OneLineUsageErrors(TyperGroup):
    """Click's own refusals (`--seed abc`, a missing option, an unknown command) as one `error:` line and exit code
    2, like every other bad input, instead of the usage box. `--help` and `mpp` alone still print the help."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError as err:
            err.show()
            sys.exit(err.exit_code)
        except ClickException as err:
            typer.echo(f"error: {one_line(err.format_message(), SHOWN_MESSAGE)}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="mpp",
    help="moviepostproduction: compose, panorama, fill and vary with diffusion transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=OneLineUsageErrors,
)

F = TypeVar("F", bound=Callable)
# OSErrors that are the machine's or the user's doing, not a bug: reported as one line naming the file.
FILE_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR,
    errno.ENAMETOOLONG, errno.EFBIG, errno.ENOENT, errno.EEXIST, errno.ELOOP,
}  # fmt: skip


def user_errors(fn: F) -> F:
    """Report `MppError`s, running out of memory and the file system's refusals of a named file (a full disk, a
    read-only folder, ...) as one-line messages on stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as err:  # a file a command reads or writes outside the checked paths: full disk, read-only
            if err.errno not in FILE_ERRNOS or err.filename is None:
                raise
            typer.echo(f"error: {shown_path(err.filename)}: {os.strerror(err.errno)}", err=True)
            raise typer.Exit(code=2) from None
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


STEPS_HELP = "Denoising steps, 1 to 1000."  # sampling.MAX_STEPS (not imported: it loads torch); a test pins it


def check_options(*more: Problem | None, **options: object) -> None:
    """Refuse bad numbers before anything loads, one line each naming the option (`--steps: must be an integer in
    [1, 1000] (got 1000000000)`), with the checks the Python API uses (sampling.py), and the command's own `more`
    problems in the same error. An option left out (None) takes its default from the model dir, which is checked
    when it is read."""
    from moviepostproduction.sampling import (
        finite_problem,
        positive_problem,
        require_valid,
        scale_problem,
        seed_problem,
        steps_problem,
    )

    checks = {
        "steps": steps_problem,
        "seed": seed_problem,
        "guidance": scale_problem,
        "true_cfg": scale_problem,
        "ref_guidance": scale_problem,
        "noise_temperature": positive_problem,
        "text_scale": finite_problem,
        "image_scale": finite_problem,
    }
    flag = {name: "--" + name.replace("_", "-") for name in checks}
    require_valid(*(checks[k](flag[k], v) for k, v in options.items() if v is not None), *more)


def parse_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        from moviepostproduction.errors import Problem, ValidationError

        raise ValidationError([Problem("--dtype", name, f"must be one of {', '.join(table)}")])
    return table[name]
