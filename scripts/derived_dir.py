"""Shared by the scripts that write a model dir derived from another (fresh_backbone.py, front_priority_model.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from moviepostproduction.errors import MppError
from moviepostproduction.model_dir import ModelDir


def add_source_and_out(parser: argparse.ArgumentParser, source_help: str) -> None:
    parser.add_argument("source", help=source_help)
    parser.add_argument("out", help="the new model dir (must not exist)")


def parse_source_and_out(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> tuple[argparse.Namespace, Path, Path]:
    """The parsed arguments, the checked source model dir and the new dir's path; a bad one is the parser's one-line
    error (exit code 2)."""
    args = parser.parse_args(argv)
    try:
        md, out = ModelDir.source_of(args.source, args.out)
    except MppError as exc:
        parser.error(str(exc))
    return args, md.root, out
