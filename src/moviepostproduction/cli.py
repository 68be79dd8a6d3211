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
    """Report `MppError`s (and running out of memory) as one-line messages on stderr and exit with code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MppError, MemoryError, RuntimeError) as err:
            if not isinstance(err, MppError):  # an out-of-memory no command translated itself; anything else is a bug
                from .resources import out_of_memory_error

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

    from .data.shards import write_dataset
    from .data.synthetic import ToyWorldConfig

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


def _torch_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        from .errors import Problem, ValidationError

        raise ValidationError([Problem("--dtype", name, f"must be one of {', '.join(table)}")])
    return table[name]


@app.command()
@user_errors
def compose(
    scene: str = typer.Argument(..., help="Scene file (.json or .yaml)."),
    output: str = typer.Option(..., "-o", "--output", help="Output PNG."),
    model: str | None = typer.Option(
        None, "--model", help="Model dir (FLUX.1-dev layout + adapter/); default: embedded."
    ),
    steps: int = typer.Option(28, "--steps", min=1, help="Denoising steps."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (default: the scene's seed, else 0)."),
    guidance: float = typer.Option(3.5, "--guidance", help="FLUX guidance embedding scale."),
    true_cfg: float = typer.Option(1.0, "--true-cfg", help="True CFG scale (> 1 with --negative)."),
    negative: str | None = typer.Option(None, "--negative", help="Negative prompt for true CFG."),
    ref_guidance: float | None = typer.Option(
        None, "--ref-guidance", help="Reference guidance scale (1: off) [default: the model dir's]."
    ),
    noise_temperature: float | None = typer.Option(
        None, "--noise-temperature", help="Factor on the starting noise (1: as drawn) [default: the model dir's]."
    ),
    overlay: bool = typer.Option(False, "--overlay", help="Also write OUT.layout.png: boxes, depth, alpha."),
    max_refs: int = typer.Option(50, "--max-refs", min=0, help="Most refs the scene may have."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
) -> None:
    """Compose a scene: caption + references placed by bbox and depth -> one image."""
    from pathlib import Path

    from .model_dir import default_model_dir
    from .pipelines.compose import ComposePipeline
    from .resources import ModelDims, Request, memory_guard, preflight
    from .scene import load_scene
    from .visualize import draw_layout, save_png

    loaded = load_scene(scene, max_refs=max_refs)  # fail on a bad scene before loading any weights
    md, torch_dtype = model or default_model_dir(), _torch_dtype(dtype)
    request = Request("compose", loaded.height, loaded.width, refs=len(loaded.refs), device=device)
    preflight(request, ModelDims.from_model_dir(md, torch_dtype))  # refuse what cannot fit, before loading
    with memory_guard(request):
        pipe = ComposePipeline.from_model_dir(md, dtype=torch_dtype, device=device)
        result = pipe(
            loaded,
            num_inference_steps=steps,
            guidance_scale=guidance,
            true_cfg_scale=true_cfg,
            negative_prompt=negative,
            ref_guidance_scale=ref_guidance,
            noise_temperature=noise_temperature,
            seed=seed,
            progress=True,
        )
    image, alphas = result.images[0], result.alphas[0]
    meta = {"mpp:caption": loaded.caption, "mpp:model": result.label or str(model or "embedded")}
    out = save_png(image, output, meta)
    typer.echo(f"wrote {out} ({image.width}x{image.height}){' [' + result.label + ']' if result.label else ''}")
    if overlay:
        layout = draw_layout(image, [r.bbox for r in loaded.refs], [r.depth for r in loaded.refs], alphas)
        path = save_png(layout, Path(output).with_suffix(".layout.png"), meta)
        typer.echo(f"wrote {path}")
    for i, (ref, a) in enumerate(zip(loaded.refs, alphas, strict=True)):
        typer.echo(f"  ref {i} {ref.depth} alpha {a:.3f} -> {'modulation' if a >= 0.5 else 'layout'}")


@app.command()
@user_errors
def train(
    config: str = typer.Argument(..., help="Training recipe (.yaml or .json); see docs/training.md."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Override trainer.max_steps."),
) -> None:
    """Train (or resume) from a recipe: cached features, stages, checkpoints, samples, curves, export."""
    from .training.recipe import Recipe, run_recipe

    recipe = Recipe.from_file(config)
    if max_steps is not None:
        recipe.trainer["max_steps"] = max_steps
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
    steps: int = typer.Option(28, "--steps", min=1, help="Denoising steps."),
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
    ref_guidance: float | None = typer.Option(
        None, "--ref-guidance", help="Reference guidance scale for every variant [default: the model dir's]."
    ),
    noise_temperature: float | None = typer.Option(
        None, "--noise-temperature", help="Factor on the starting noise for every variant [default: the model dir's]."
    ),
    out: str | None = typer.Option(
        None, "--out", help="Write eval.md, eval.json, samples.csv (one row per ref and seed) and grid.png here."
    ),
) -> None:
    """Bbox alignment (IoU, centre error), fg identity (also on seen / unseen shape-colour pairs) and leakage of a
    toy-world model and its ablations."""
    from .evaluation.compose_eval import run_eval

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


@app.command()
@user_errors
def bench(
    tokens: str = typer.Option("", "--tokens", help="Image tokens, comma separated [1024,4096; cuda adds 8192]."),
    refs: str = typer.Option("0,10,50,100", "--refs", help="Reference counts, comma separated."),
    text_tokens: int = typer.Option(512, "--text-tokens", help="Text tokens (T5 sequence length)."),
    batch: int = typer.Option(1, "--batch", help="Samples per call (each with its own boxes)."),
    repeats: int = typer.Option(3, "--repeats", help="Timed rounds; each case reports the median."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed rounds first; the last one also measures memory."),
    mode: str = typer.Option("all", "--mode", help="forward, train or all."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    dtype: str = typer.Option("", "--dtype", help="fp32, bf16 or fp16 [cpu: fp32, cuda: bf16]."),
    coverage: float = typer.Option(0.5, "--coverage", help="Fraction of the image inside the union of the boxes."),
    layout: bool = typer.Option(True, "--layout/--no-layout", help="Assemble-Attn on (early steps) or off (later)."),
    assemble_calls: int | None = typer.Option(
        None, "--assemble-calls", help="Assemble-Attn attention calls per layout block at most [4]; 1: one padded call."
    ),
    encoder_refs: int = typer.Option(50, "--encoder-refs", help="Images through CLIP + DINOv2, timed once (0: skip)."),
    threads: int | None = typer.Option(None, "--threads", help="Torch CPU threads [default: torch's]."),
    clock: str = typer.Option("wall", "--clock", help="wall, or process (CPU time; steadier on a shared CPU)."),
    cpu_heap: str = typer.Option(
        "keep", "--cpu-heap", help="keep: freed memory stays in the process (as on CUDA); system: glibc defaults."
    ),
    tiny: bool = typer.Option(False, "--tiny", help="Test-size model (D=32) instead of FLUX.1-dev width."),
    json_out: str | None = typer.Option(None, "--json", help="Also write every timing to this JSON file."),
) -> None:
    """Time plain FLUX against the conditioned forward on identical inputs, interleaved; one line per case."""
    import json
    from pathlib import Path

    from .backbones.assemble_rows import MAX_BUCKETS
    from .bench import (
        BenchConfig,
        default_dtype,
        default_tokens,
        format_case,
        format_encoders,
        format_header,
        format_prepare,
        parse_modes,
        parse_numbers,
        run_benchmark,
    )
    from .bench_setup import BenchShape

    cfg = BenchConfig(
        tokens=parse_numbers("--tokens", tokens) or default_tokens(device),
        refs=parse_numbers("--refs", refs),
        text_tokens=text_tokens,
        batch=batch,
        modes=parse_modes(mode),
        repeats=repeats,
        warmup=warmup,
        device=device,
        dtype=dtype or default_dtype(device),
        coverage=coverage,
        layout_active=layout,
        assemble_calls=MAX_BUCKETS if assemble_calls is None else assemble_calls,
        encoder_refs=encoder_refs,
        threads=threads,
        clock=clock,
        cpu_heap=cpu_heap,
        shape=BenchShape().tiny() if tiny else BenchShape(),
    )
    report = run_benchmark(cfg)
    typer.echo(format_header(report))
    encoders = [format_encoders(report.encoders)] if report.encoders is not None else []
    for line in [*map(format_case, report.cases), *encoders, *map(format_prepare, report.prepares)]:
        typer.echo(line)
    if json_out:
        Path(json_out).write_text(json.dumps(report.to_dict(), indent=2))
        typer.echo(f"wrote {json_out}")


@app.command()
@user_errors
def panorama(
    output: str = typer.Option(..., "-o", "--output", help="Output PNG, width = 2 x height (equirectangular)."),
    caption: str | None = typer.Option(None, "--caption", help="Text prompt."),
    scene: str | None = typer.Option(None, "--scene", help="A panorama scene (refs may wrap the seam), not --caption."),
    height: int | None = typer.Option(None, "--height", help="Height in pixels, a multiple of 16 [default: 256]."),
    steps: int = typer.Option(28, "--steps", min=1, help="Denoising steps."),
    seed: int | None = typer.Option(None, "--seed", help="Seed (default: the scene's seed, else 0)."),
    guidance: float = typer.Option(3.5, "--guidance", help="FLUX guidance embedding scale."),
    model: str | None = typer.Option(None, "--model", help="Model dir (FLUX.1-dev layout); default: embedded."),
    pad: int = typer.Option(1, "--pad", help="Wrapped token columns on each side (DiT360: 1; 0 = off)."),
    pad_ids: str = typer.Option("opposite", "--pad-ids", help="Pad position ids: opposite (DiT360) or continuous."),
    periodic_rope: bool = typer.Option(False, "--periodic-rope/--no-periodic-rope", help="Column RoPE on a circle."),
    roll: str = typer.Option("off", "--roll", help="Latent rolling between steps: off, fixed or random."),
    circular_vae: bool = typer.Option(True, "--circular-vae/--no-circular-vae", help="Circular VAE width padding."),
    html: bool = typer.Option(False, "--html", help="Also write OUT.html, a self-contained 360 viewer."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
) -> None:
    """Generate a seamless 360-degree panorama from a caption (or a panorama scene with placed refs)."""
    from pathlib import Path

    from PIL import Image

    from .encoders import TextEncoder
    from .errors import Problem, ValidationError
    from .evaluation.metrics import seam_ratio
    from .model_dir import default_model_dir
    from .panorama import PanoramaConfig, panorama_grid
    from .pipelines.panorama import PanoramaPipeline, compose_panorama
    from .viewer import write_viewer
    from .visualize import save_png

    if (caption is None) == (scene is None):
        raise ValidationError([Problem("--caption", caption, "give exactly one of --caption or --scene")])
    if scene is not None and height is not None:
        raise ValidationError([Problem("--height", height, "the scene sets the size; drop --height")])
    config = PanoramaConfig(pad=pad, pad_ids=pad_ids, periodic_rope=periodic_rope, circular_vae=circular_vae, roll=roll)
    if height is not None:
        panorama_grid(height)  # fail on a bad size before loading any weights
    md, torch_dtype = model or default_model_dir(), _torch_dtype(dtype)
    if scene is not None:
        from .pipelines.compose import ComposePipeline
        from .scene import load_scene

        loaded = load_scene(scene)  # fail on a bad scene before loading any weights
        if not loaded.panorama:
            raise ValidationError([Problem("panorama", loaded.panorama, f"{scene} is not a panorama scene")])
        compose_pipe = ComposePipeline.from_model_dir(md, dtype=torch_dtype, device=device)
        result = compose_panorama(
            compose_pipe,
            loaded,
            config=config,
            seed=seed,
            num_inference_steps=steps,
            guidance_scale=guidance,
            progress=True,
        )
        prompt = loaded.caption
    else:
        pipe = PanoramaPipeline.from_model_dir(md, config=config, dtype=torch_dtype, device=device)
        from .model_dir import ModelDir

        text = TextEncoder.load(md, dtype=torch_dtype, device=device).encode([caption], ModelDir.at(md).max_text_tokens)
        result = pipe(
            prompt_embeds=text.t5,
            pooled_prompt_embeds=text.pooled,
            height=height or 256,
            num_inference_steps=steps,
            guidance_scale=guidance,
            seed=seed,
            progress=True,
        )
        prompt = caption
    pixels = (result.images[0] * 255).round().byte().permute(1, 2, 0).cpu().numpy()  # (H, W, 3)
    meta = {"mpp:caption": prompt, "mpp:model": result.label or str(model or "embedded"), "mpp:projection": "equirect"}
    out = save_png(Image.fromarray(pixels), output, meta)
    plain, rotated = seam_ratio(pixels), seam_ratio(pixels, rotated=True)
    tokens = seam_ratio(pixels, period=16)  # against the other 16 px token boundaries (docs/panorama.md)
    seams = f"seam ratio {plain:.3f} (tokens {tokens:.3f}), rotated view {rotated:.3f}"
    label = f" [{result.label}]" if result.label else ""
    typer.echo(f"wrote {out} ({pixels.shape[1]}x{pixels.shape[0]}), {seams}{label}")
    if html:
        typer.echo(f"wrote {write_viewer(out, Path(out).with_suffix('.html'))}")


@app.command()
@user_errors
def view(
    image: str = typer.Argument(..., help="Equirectangular panorama (PNG or JPEG, 2:1)."),
    output: str = typer.Option(..., "-o", "--output", help="Output HTML page (self-contained, works offline)."),
    title: str | None = typer.Option(None, "--title", help="Page title (default: the image file name)."),
) -> None:
    """Write a self-contained HTML 360-degree viewer for a panorama: drag to look around, wheel to zoom."""
    from .viewer import write_viewer

    typer.echo(f"wrote {write_viewer(image, output, title=title)}")


@app.command()
@user_errors
def fill(
    image: str = typer.Option(..., "--image", help="The plate to repaint (PNG or JPEG)."),
    output: str = typer.Option(..., "-o", "--output", help="Output PNG (same size as the plate)."),
    mask: str | None = typer.Option(
        None, "--mask", help="Repaint mask, white = repaint, binarised at 50% grey; default with --refs: their boxes."
    ),
    semantic: str | None = typer.Option(None, "--semantic", help="Semantic map (class colours), same size as --image."),
    refs: str | None = typer.Option(None, "--refs", help="Scene: insert its refs at their bboxes (caption = prompt)."),
    prompt: str = typer.Option("", "--prompt", help="Text prompt (not with --refs)."),
    model: str | None = typer.Option(None, "--model", help="FLUX-Fill model dir (+ fill/ weights); default: embedded."),
    steps: int = typer.Option(28, "--steps", min=1, help="Denoising steps."),
    seed: int = typer.Option(0, "--seed", help="Noise seed."),
    guidance: float = typer.Option(30.0, "--guidance", help="FLUX guidance embedding scale (FLUX-Fill default 30)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
) -> None:
    """Repaint the masked part of a plate (FLUX-Fill); pixels outside the mask are kept exactly."""
    from .fill_weights import default_fill_model_dir
    from .pipelines.fill import FillPipeline
    from .pipelines.fill_inputs import read_fill_inputs
    from .visualize import save_png

    inputs = read_fill_inputs(image, mask, semantic=semantic, scene=refs, prompt=prompt)  # before loading weights
    pipe = FillPipeline.from_model_dir(
        model or default_fill_model_dir(),
        semantic=semantic is not None,
        refs=refs is not None,
        dtype=_torch_dtype(dtype),
        device=device,
    )
    result = pipe(inputs, num_inference_steps=steps, guidance_scale=guidance, seed=seed, progress=True)
    out = save_png(result.images[0], output, {"mpp:prompt": inputs.prompt, "mpp:model": result.label or str(model)})
    h, w = result.mask.shape
    label = f" [{result.label}]" if result.label else ""
    typer.echo(f"wrote {out} ({w}x{h}), repainted {int(result.mask.sum())} px ({100 * result.mask.mean():.1f}%){label}")


@app.command()
@user_errors
def vary(
    ref: str = typer.Option(..., "--ref", help="Reference image (PNG or JPEG): its DINO features steer the result."),
    output: str = typer.Option(..., "-o", "--output", help="Output PNG."),
    caption: str | None = typer.Option(None, "--caption", help="Caption to steer the variation (default: none)."),
    model: str | None = typer.Option(
        None, "--model", help="Model dir with nanodit/ (config.json + model.safetensors); default: embedded."
    ),
    steps: int = typer.Option(28, "--steps", min=1, help="Denoising steps."),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise."),
    text_scale: float = typer.Option(4.0, "--text-scale", help="Dual CFG text scale s_T (unused without --caption)."),
    image_scale: float = typer.Option(1.5, "--image-scale", help="Dual CFG image scale s_I."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
) -> None:
    """A variation of a reference image with NanoDiT (DINO CLS + patch features), optionally steered by a caption."""
    from .model_dir import default_model_dir
    from .pipelines.vary import VaryPipeline, load_reference
    from .visualize import save_png

    image = load_reference(ref, "--ref")  # fail on a bad reference before loading any weights
    pipe = VaryPipeline.from_model_dir(model or default_model_dir(), dtype=_torch_dtype(dtype), device=device)
    inputs = pipe.encode([image], [caption] if caption else None)
    result = pipe(
        **inputs,
        text_scale=text_scale,
        image_scale=image_scale,
        num_inference_steps=steps,
        seed=seed,
        output_type="pil",
        progress=True,
    )
    picture = result.images[0]
    source = pipe.label or str(model or "embedded")
    meta = {"mpp:caption": caption or "", "mpp:reference": str(ref), "mpp:model": source}
    out = save_png(picture, output, meta)
    typer.echo(f"wrote {out} ({picture.width}x{picture.height}){' [' + pipe.label + ']' if pipe.label else ''}")


if __name__ == "__main__":  # python -m moviepostproduction.cli (accelerate launch / torchrun -m ...)
    app()
