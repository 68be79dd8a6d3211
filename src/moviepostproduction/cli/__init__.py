"""`mpp`: a thin typed CLI over the Python API, one small module per command group. The library never parses argv;
only this package does. Importing a group registers its commands; `mpp --help` lists them in this order."""

# isort: off
from moviepostproduction.cli.common import app
from moviepostproduction.cli import compose, panorama, fill, vary, train, eval_fill, eval_vary, annotate, bench  # noqa: F401

# isort: on

__all__ = ["app"]
