"""`mpp prepare-data`, `mpp train` and `mpp eval`: data, the training loop, the toy evaluation."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import (
    STEPS_HELP,
    app,
    check_options,
    noise_temperature_option,
    ref_guidance_option,
    user_errors,
)


@app.command("prepare-data")
@user_errors
def prepare_data(
    out: str = typer.Option(..., "--out", help="Output directory (train/, heldout/, manifest.json)."),
    n: int = typer.Option(..., "--n", help="Total number of scenes (train + held-out)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the toy-world streams."),
    size: int = typer.Option(128, "--size", help="Scene side in pixels."),
    ref_size: int = typer.Option(64, "--ref-size", help="Reference image side in pixels."),
    max_refs: int = typer.Option(4, "--max-refs", help="Most sprites (refs) per scene."),
    heldout_frac: float = typer.Option(0.1, "--heldout-frac", help="Fraction of --n written to heldout/."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Most samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the shards of a non-empty --out."),
    workers: int = typer.Option(1, "--workers", help="Processes writing shards in parallel (same bytes)."),
) -> None:
    """Generate the procedural toy world as WebDataset tar shards (train and held-out splits)."""
    from tqdm import tqdm

    from moviepostproduction.files import check_output
    from moviepostproduction.toyworld.shards import write_dataset
    from moviepostproduction.toyworld.synthetic import ToyWorldConfig

    check_output(out, "--out", folder=True)
    cfg = ToyWorldConfig(size=size, ref_size=ref_size, max_refs=max_refs)
    with tqdm(total=n, unit="scene", desc="prepare-data", disable=None) as bar:
        manifest = write_dataset(
            out,
            n,
            seed,
            cfg,
            heldout_frac=heldout_frac,
            shard_size=shard_size,
            overwrite=overwrite,
            workers=workers,
            progress=bar.update,
        )
    splits = manifest["splits"]
    typer.echo(
        f"{out}: {splits['train']['count']} train / {splits['heldout']['count']} held-out scenes in "
        f"{len(splits['train']['shards']) + len(splits['heldout']['shards'])} shards (seed {seed})"
    )


@app.command()
@user_errors
def train(
    config: str = typer.Argument(..., help="Training recipe (.yaml or .json); see docs/training.md."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override trainer.max_steps."),
) -> None:
    """Train (or resume) from a recipe: cached features, stages, checkpoints, samples, curves, export."""
    import torch

    from moviepostproduction.files import check_output
    from moviepostproduction.resources import LOADS, ModelDims, Request, preflight
    from moviepostproduction.training.recipe import Recipe, run_recipe

    recipe = Recipe.from_file(config)
    if max_steps is not None:
        recipe.trainer["max_steps"] = max_steps
    # Refused before any weights load: an output folder that cannot be written, weights that cannot fit.
    check_output(recipe.out, f"{config}: out", folder=True)
    if recipe.export:
        check_output(recipe.export, f"{config}: export", folder=True)
    loads = LOADS.get(recipe.task, LOADS["compose"])
    dims = ModelDims.from_model_dir(  # bf16, the least a frozen backbone may be loaded in: a lower bound
        recipe.model,
        torch.bfloat16,
        components=loads,
        transformer="nanodit" if recipe.task == "vary" else "transformer",
    )
    preflight(Request("train", 0, 0, device="cuda" if torch.cuda.is_available() else "cpu"), dims)
    result = run_recipe(recipe)
    tail = f", exported {recipe.export}" if recipe.export else ""
    typer.echo(f"trained to step {result.step}, loss {result.losses[-1]:.4f}, checkpoint {result.checkpoint}{tail}")


@app.command("eval")
@user_errors
def eval_(
    split: str = typer.Option("heldout", "--split", help="Toy-world split: heldout or train."),
    model: str | None = typer.Option(None, "--model", help="Model dir; default: the shipped toy model."),
    n: int = typer.Option(100, "--n", min=1, help="Scenes to generate per variant."),
    start: int = typer.Option(
        0, "--start", min=0, help="First scene index (e.g. train scenes past a recipe's limit: a validation set)."
    ),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    seeds: int = typer.Option(
        1,
        "--seeds",
        min=1,
        help="Samples per scene, seed j from the noise of seed (scene index + 100003 j); the table pools them "
        "and the fg identity of each seed is listed (1: the scene's own seed only).",
    ),
    first_seed: int = typer.Option(
        0,
        "--first-seed",
        min=0,
        help="j of the first seed: --first-seed 2 --seeds 2 draws seeds 2 and 3 (new samples of the same scenes).",
    ),
    variants: str = typer.Option(
        "model,layout-only,modulation-only,untrained,vae-roundtrip",
        "--variants",
        help="Comma separated: model, layout-only, modulation-only, untrained, vae-roundtrip (the target scenes "
        "through the VAE alone: the ceiling).",
    ),
    leak_scenes: int = typer.Option(25, "--leak-scenes", help="Scenes also generated without their last ref."),
    ref_guidance: float | None = ref_guidance_option(),  # the same for every variant
    noise_temperature: float | None = noise_temperature_option(),
    out: str | None = typer.Option(
        None, "--out", help="Write eval.md, eval.json, samples.csv (one row per ref and seed) and grid.png here."
    ),
) -> None:
    """Bbox alignment (IoU, centre error), fg identity (also on seen / unseen shape-colour pairs) and leakage of a
    toy-world model and its ablations."""
    from moviepostproduction.errors import Problem
    from moviepostproduction.toyworld.compose_eval import MAX_EVAL_SCENES, MAX_EVAL_SEEDS, run_eval

    counts = (
        ("--n", n, MAX_EVAL_SCENES),
        ("--start", start, MAX_EVAL_SCENES * 100),
        ("--seeds", seeds, MAX_EVAL_SEEDS),
        ("--first-seed", first_seed, MAX_EVAL_SEEDS * 100),
    )
    check_options(
        *(Problem(flag, value, f"must be at most {most}") for flag, value, most in counts if value > most),
        Problem("--leak-scenes", leak_scenes, "must be >= 0") if leak_scenes < 0 else None,
        steps=steps,
        ref_guidance=ref_guidance,
        noise_temperature=noise_temperature,
    )
    report = run_eval(
        split=split,
        model=model,
        n=n,
        steps=steps,
        variants=variants,
        leak_scenes=leak_scenes,
        out=out,
        ref_guidance=ref_guidance,
        start=start,
        seeds=seeds,
        noise_temperature=noise_temperature,
        first_seed=first_seed,
    )
    for line in report:
        typer.echo(line)
