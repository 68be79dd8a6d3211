"""`mpp prepare-data`, `mpp train` and `mpp eval`: data, the training loop, the toy evaluation."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import (
    STEPS_HELP,
    adapter_option,
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
    n: int | None = typer.Option(None, "--n", help="Toy world: total number of scenes (train + held-out)."),
    seed: int | None = typer.Option(None, "--seed", help="Toy world: seed of the streams [0]."),
    size: int | None = typer.Option(None, "--size", help="Toy world: scene side in pixels [128]."),
    ref_size: int | None = typer.Option(None, "--ref-size", help="Toy world: reference image side in pixels [64]."),
    max_refs: int | None = typer.Option(None, "--max-refs", help="Most refs per scene (toy world 4, real data 50)."),
    dense: bool = typer.Option(
        False, "--dense", help="Toy world: dense scenes (320 px, <= 16 refs, overlaps, small boxes; docs/toy-world.md)."
    ),
    heldout_frac: float = typer.Option(0.1, "--heldout-frac", help="Fraction of the scenes written to heldout/."),
    shard_size: int = typer.Option(1000, "--shard-size", help="Most samples per tar shard."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the shards of a non-empty --out."),
    workers: int | None = typer.Option(None, "--workers", help="Toy world: processes writing shards (same bytes) [1]."),
    from_coco: str | None = typer.Option(None, "--from-coco", help="COCO instances JSON (docs/training-data.md)."),
    images: str | None = typer.Option(None, "--images", help="With --from-coco: the folder of its images."),
    captions: str | None = typer.Option(None, "--captions", help="With --from-coco: COCO captions JSON."),
    from_scenes: str | None = typer.Option(None, "--from-scenes", help="Folder of scene files + target images."),
    depth_model: str | None = typer.Option(None, "--depth-model", help="Local depth-estimation model folder."),
    device: str | None = typer.Option(None, "--device", help="Device of --depth-model (default: cpu)."),
    min_area: float | None = typer.Option(None, "--min-area", help="Real data: least box area / image area [0.001]."),
    max_pixels: int | None = typer.Option(None, "--max-pixels", help="Real data: larger targets scaled down [2048^2]."),
    lossless: bool = typer.Option(False, "--lossless", help="Real data: targets as PNG, not JPEG (quality 95)."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Real data: skip and count malformed records."),
) -> None:
    """Write WebDataset tar shards (train and held-out splits): the procedural toy world (--n), COCO instance
    annotations (--from-coco) or scene files (--from-scenes); docs/training-data.md."""
    from tqdm import tqdm

    from moviepostproduction.cli.data import REAL_ONLY, TOY_ONLY, prepare_real, refuse_options
    from moviepostproduction.files import check_output
    from moviepostproduction.toyworld.shards import write_dataset
    from moviepostproduction.toyworld.synthetic import ToyWorldConfig

    real = (images, captions, depth_model, min_area, max_pixels, lossless, skip_bad, device)
    if from_coco is not None or from_scenes is not None:
        toy = dict(zip(TOY_ONLY, (n, seed, size, ref_size, workers), strict=True))
        refuse_options({**toy, "--dense": dense}, (*TOY_ONLY, "--dense"), "is for the toy world only")
        options = {"min_area": min_area, "max_refs": max_refs, "max_pixels": max_pixels}
        options = {k: v for k, v in options.items() if v is not None}
        options |= {"heldout_frac": heldout_frac, "shard_size": shard_size, "lossless": lossless}
        options |= {"skip_bad": skip_bad, "overwrite": overwrite}
        return prepare_real(out, coco=from_coco, scenes=from_scenes, images=images, captions=captions,
                            depth_model=depth_model, device=device or "cpu", options=options)  # fmt: skip
    refuse_options(dict(zip(REAL_ONLY, real, strict=True)), REAL_ONLY, "is for --from-coco / --from-scenes")
    if n is None:
        raise typer.BadParameter("the toy world needs --n (or give --from-coco / --from-scenes)", param_hint="--n")
    seed, workers = 0 if seed is None else seed, 1 if workers is None else workers
    toy = {"size": size, "ref_size": ref_size, "max_refs": max_refs}
    check_output(out, "--out", folder=True)
    world = ToyWorldConfig.dense if dense else ToyWorldConfig
    cfg = world(**{k: v for k, v in toy.items() if v is not None})  # left out: the world's defaults
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
    cache_device: str | None = typer.Option(
        None, "--cache-device", help="Feature-cache encoders: auto (CUDA in bf16 if any), cpu, cuda[:N] [recipe's]."
    ),
) -> None:
    """Train (or resume) from a recipe: cached features, stages, checkpoints, samples, curves, export."""
    import os

    import torch

    from moviepostproduction.files import check_output
    from moviepostproduction.resources import LOADS, ModelDims, Request, preflight
    from moviepostproduction.training.recipe import Recipe, run_recipe
    from moviepostproduction.training.recipe_preflight import check_recipe

    recipe = Recipe.from_file(config)
    if max_steps is not None:
        recipe.trainer["max_steps"] = max_steps
    if cache_device is not None:
        from moviepostproduction.devices import resolve_device

        resolve_device(cache_device, "--cache-device")  # an unusable device is one line, before anything loads
        recipe.cache_device = cache_device
    check_recipe(recipe, source=config)  # paths, adapter fit, export, free disk: one line each, before anything loads
    # Refused before any weights load: an output folder that cannot be written, weights that cannot fit.
    check_output(recipe.out, f"{config}: out", folder=True)
    if recipe.export:
        check_output(recipe.export, f"{config}: export", folder=True)
    loads = LOADS.get(recipe.task, LOADS["compose"])
    dims = ModelDims.from_model_dir(  # bf16, the least a frozen backbone may be loaded in: a lower bound
        recipe.model,
        torch.bfloat16,
        adapter=recipe.adapter_dir if recipe.adapter_dir and os.path.isdir(recipe.adapter_dir) else None,
        components=loads,
        transformer="nanodit" if recipe.task == "vary" else "transformer",
    )
    preflight(Request("train", 0, 0, device="cuda" if torch.cuda.is_available() else "cpu"), dims)
    result = run_recipe(recipe, checked=True)
    tail = f", exported {recipe.export}" if recipe.export else ""
    typer.echo(f"trained to step {result.step}, loss {result.losses[-1]:.4f}, checkpoint {result.checkpoint}{tail}")


EVAL_TASKS = ("compose", "fill", "vary")
COMPOSE_VARIANTS = "model,layout-only,modulation-only,untrained,vae-roundtrip"


def other_task_eval(task: str, compose_only: dict[str, tuple[object, object]], **options) -> list[str]:
    """`mpp eval --task fill|vary`: what `mpp eval-fill` / `mpp eval-vary` do with the options both commands share
    (`options`: model, n, seeds, steps, variants, out); a compose option given a value is one line naming it."""
    from moviepostproduction.errors import Problem

    if task not in EVAL_TASKS:
        check_options(Problem("--task", task, f"expected one of {', '.join(EVAL_TASKS)}"))
    why = f"is not an option of --task {task} (mpp eval-{task} --help lists its own)"
    check_options(*(Problem(flag, value, why) for flag, (value, default) in compose_only.items() if value != default))
    if options["variants"] == COMPOSE_VARIANTS:  # not set: the task's own default variants
        options.pop("variants")
    if task == "fill":
        from moviepostproduction.toyworld.fill_eval import run_fill_eval

        return run_fill_eval(**options)
    from moviepostproduction.toyworld.vary_eval import run_vary_eval

    return run_vary_eval(**options)


@app.command("eval")
@user_errors
def eval_(
    task: str = typer.Option(
        "compose",
        "--task",
        help="compose (the table below), fill (mpp eval-fill) or vary (mpp eval-vary); fill and vary take --model, "
        "--n, --seeds, --steps, --variants and --out here, their other options on their own commands.",
    ),
    split: str = typer.Option("heldout", "--split", help="Toy-world split: heldout or train."),
    model: str | None = typer.Option(None, "--model", help="Model dir; default: the shipped toy model."),
    adapter: str | None = adapter_option(),
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
    refs_per_scene: str | None = typer.Option(
        None,
        "--refs-per-scene",
        help="Dense toy scenes with exactly these ref counts, e.g. 1,2,4,8,16: a table row per count, collapse rate "
        "and refs.png (the model variant, one seed; docs/toy-world.md).",
    ),
    canvas: int | None = typer.Option(
        None, "--canvas", help="With --refs-per-scene: the dense scenes' side in pixels [320]."
    ),
    refs: bool = typer.Option(
        False, "--refs", help="With --task fill: reference insertion (IoU / identity of inserted refs), as eval-fill."
    ),
) -> None:
    """Bbox alignment (IoU, centre error), fg identity (also on seen / unseen shape-colour pairs) and leakage of a
    toy-world model and its ablations; with --refs-per-scene, the same per ref count on dense scenes."""
    from moviepostproduction.errors import Problem
    from moviepostproduction.toyworld.compose_eval import MAX_EVAL_SCENES, MAX_EVAL_SEEDS, VARIANTS, run_eval

    counts = (
        ("--n", n, MAX_EVAL_SCENES),
        ("--start", start, MAX_EVAL_SCENES * 100),
        ("--seeds", seeds, MAX_EVAL_SEEDS),
        ("--first-seed", first_seed, MAX_EVAL_SEEDS * 100),
    )
    check_options(
        *(Problem(flag, value, f"must be at most {most}") for flag, value, most in counts if value > most),
        Problem("--leak-scenes", leak_scenes, "must be >= 0") if leak_scenes < 0 else None,
        Problem("--refs", refs, "is an option of --task fill only") if refs and task != "fill" else None,
        steps=steps,
        ref_guidance=ref_guidance,
        noise_temperature=noise_temperature,
    )
    if task != "compose":
        compose_only = {"--split": (split, "heldout"), "--adapter": (adapter, None), "--start": (start, 0),
                        "--first-seed": (first_seed, 0), "--leak-scenes": (leak_scenes, 25),
                        "--ref-guidance": (ref_guidance, None), "--noise-temperature": (noise_temperature, None),
                        "--refs-per-scene": (refs_per_scene, None), "--canvas": (canvas, None)}  # fmt: skip
        fill_only = {"refs": refs} if refs else {}
        for line in other_task_eval(task, compose_only, model=model, n=n, seeds=seeds, steps=steps,
                                    variants=variants, out=out, **fill_only):  # fmt: skip
            typer.echo(line)
        return
    if refs_per_scene is not None:
        from moviepostproduction.toyworld.dense_report import run_dense_eval

        why = "is not used with --refs-per-scene (held-out dense scenes, the model variant, one seed)"
        given = [("--split", split, "heldout"), ("--seeds", seeds, 1), ("--first-seed", first_seed, 0),
                 ("--variants", variants, ",".join(VARIANTS))]  # fmt: skip
        check_options(*(Problem(flag, value, why) for flag, value, default in given if value != default))
        size = 320 if canvas is None else canvas
        lines = run_dense_eval(model=model, adapter=adapter, counts=refs_per_scene, n=n, steps=steps, size=size,
                               out=out, start=start, ref_guidance=ref_guidance,
                               noise_temperature=noise_temperature)  # fmt: skip
        for line in lines:
            typer.echo(line)
        return
    if canvas is not None:
        check_options(Problem("--canvas", canvas, "is for --refs-per-scene (the toy world's own size is the model's)"))
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
        adapter=adapter,
    )
    for line in report:
        typer.echo(line)
