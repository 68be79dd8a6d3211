"""`mpp prepare-data` from a user's own data (--from-coco, --from-scenes); the command itself is in cli/train.py,
which keeps the toy world's path and calls `prepare_real` for these."""

from __future__ import annotations

import typer

from moviepostproduction.errors import NOTHING, Problem, ValidationError

TOY_ONLY = ("--n", "--seed", "--size", "--ref-size", "--workers")
REAL_ONLY = (
    "--images", "--captions", "--depth-model", "--min-area", "--max-pixels", "--lossless", "--skip-bad", "--device",
)  # fmt: skip


def refuse_options(given: dict[str, object], flags: tuple[str, ...], why: str) -> None:
    """One line per option in `flags` that was given (not None / False): it has no meaning on this path."""
    problems = [Problem(flag, given[flag], why) for flag in flags if given.get(flag) not in (None, False)]
    if problems:
        raise ValidationError(problems)


def prepare_real(
    out: str,
    *,
    coco: str | None,
    scenes: str | None,
    images: str | None,
    captions: str | None,
    depth_model: str | None,
    device: str,
    options: dict,
) -> None:
    """`mpp prepare-data --from-coco INSTANCES --images DIR [--captions FILE] [--depth-model DIR]` or
    `--from-scenes DIR`; prints the one summary line."""
    from moviepostproduction.datasets.prepare import PrepareConfig, prepare_coco, prepare_scenes
    from moviepostproduction.files import check_output

    if coco is not None and scenes is not None:
        raise ValidationError([Problem("--from-scenes", scenes, "give --from-coco or --from-scenes, not both")])
    if coco is not None and images is None:
        raise ValidationError([Problem("--images", NOTHING, "--from-coco needs the folder of its images")])
    if scenes is not None:
        given = {"--images": images, "--captions": captions, "--depth-model": depth_model}
        refuse_options(given, REAL_ONLY[:3], "is for --from-coco (scene files hold their images, captions, depths)")
    check_output(out, "--out", folder=True)
    config = PrepareConfig(**options)
    if coco is not None:
        manifest, tally = prepare_coco(
            out, coco, images, captions, config=config, depth_model=depth_model, device=device, progress=True
        )
    else:
        manifest, tally = prepare_scenes(out, scenes, config=config, progress=True)
    splits = manifest["splits"]
    shards = sum(len(split["shards"]) for split in splits.values())
    typer.echo(
        f"{out}: {tally.summary()} ({splits['train']['count']} train / {splits['heldout']['count']} held-out in "
        f"{shards} shards, {manifest['bytes'] / 2**20:.1f} MiB)"
    )
