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


# Libraries diffusers imports when they are installed (the `quant` extra) and that log at import time about kernels
# this machine lacks (triton, a CUDA build's .so files); one-line errors stay ours. Shown with --verbose.
IMPORT_NOISE = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr)
    for name in IMPORT_NOISE if not verbose else ():
        logging.getLogger(name).setLevel(logging.ERROR)


def ref_guidance_option():
    """`--ref-guidance`; left out, the pipeline takes the model dir's `ref_guidance_scale` (docs/sampling.md)."""
    return typer.Option(None, "--ref-guidance", help="Reference guidance scale, 1 = off (default: the model dir's).")


def adapter_option():
    """`--adapter DIR`: our folder beside a stock FLUX.1 folder (docs/model-directory.md); left out, MODEL/adapter."""
    return typer.Option(
        None, "--adapter", help="Adapter folder (mpp init-adapter, mpp train) [default: MODEL/adapter]."
    )


def lora_option():
    """`--lora FILE[:SCALE]`, repeatable: LoRA files on the transformer (docs/lora.md); parse with `parse_loras`."""
    return typer.Option(
        None, "--lora", help="LoRA .safetensors (diffusers, kohya, XLabs) as FILE or FILE:SCALE [scale 1]; repeatable."
    )


def parse_loras(values: list[str] | None) -> list[tuple[str, float]]:
    """(file, scale) per `--lora`, refused in one line before any weights load: a scale that is not a finite
    number, a missing file, a file that is not .safetensors. A name holding ':' that exists is a file alone."""
    import math
    from pathlib import Path

    from moviepostproduction.errors import ValidationError
    from moviepostproduction.files import PICKLE_SUFFIXES, resolve_input

    parsed = []
    for text in values or ():
        name, scale = text, 1.0
        if ":" in text and not Path(text).expanduser().is_file():
            name, scale_text = text.rsplit(":", 1)
            try:
                scale = float(scale_text)
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise ValidationError([Problem("--lora", text, "SCALE after the last ':' must be a finite number")])
        path = resolve_input(name)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise ValidationError([Problem("--lora", name, "must be a .safetensors file (pickles are never read)")])
        if path.suffix.lower() != ".safetensors":
            raise ValidationError([Problem("--lora", name, "must be a .safetensors file")])
        if not path.is_file():
            raise ValidationError([Problem("--lora", name, "no such file")])
        parsed.append((str(path), scale))
    return parsed


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


DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda, cuda:1 ..."
DTYPE_HELP = "auto (bf16 on cuda, else fp32), fp32, bf16 or fp16."


def parse_device_dtype(device: str, dtype: str):
    """(device, torch dtype) for `--device` / `--dtype` (`auto` resolved, devices this machine lacks refused in one
    line: devices.py), checked before anything loads."""
    from moviepostproduction.devices import resolve_device, resolve_dtype

    used = resolve_device(device)
    return used, resolve_dtype(dtype, used)


def quantize_option():
    return typer.Option(None, "--quantize", help="nf4 (CUDA), int8 or fp8 (CUDA): transformer and T5 weights.")


def offload_option():
    return typer.Option(None, "--offload", help="model or sequential: CPU offload onto --device (docs/memory.md).")


def vae_tiling_option():
    return typer.Option(False, "--vae-tiling", help="Decode large images tile by tile (less memory).")


def parse_memory(quantize: str | None, offload: str | None, vae_tiling: bool, device: str):
    """The checked memory switches (encoders/memory.py), refused in one line naming the flag before anything loads:
    an unknown value, a quantization the device or the installed packages cannot run."""
    from dataclasses import replace

    from moviepostproduction.encoders.memory import MemoryOptions
    from moviepostproduction.encoders.quantize import check_quantization
    from moviepostproduction.errors import ValidationError

    try:
        memory = MemoryOptions(quantize, offload, vae_tiling)
        if quantize is not None:
            check_quantization(quantize, device)
    except ValidationError as err:
        raise ValidationError([replace(p, field="--" + p.field.replace("_", "-")) for p in err.problems]) from None
    return memory


def compile_option():
    return typer.Option(False, "--compile", help="torch.compile the conditioned transformer (first step compiles).")


def finish_loading(pipe, loras: list[tuple[str, float]], compile_model: bool):
    """What every FLUX command does to a freshly loaded pipeline: its `--lora` files, then `--compile`."""
    pipe.load_loras(loras)
    if compile_model:
        pipe.enable_compile()
    return pipe
