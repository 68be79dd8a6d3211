"""`mpp vary`: NanoDiT variations of a reference image."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import (
    DEVICE_HELP,
    DTYPE_HELP,
    STEPS_HELP,
    app,
    check_options,
    parse_device_dtype,
    user_errors,
)


@app.command()
@user_errors
def vary(
    ref: str = typer.Option(..., "--ref", help="Reference image (PNG or JPEG): its DINO features steer the result."),
    output: str = typer.Option(..., "-o", "--output", help="Output PNG."),
    caption: str | None = typer.Option(None, "--caption", help="Caption to steer the variation (default: none)."),
    model: str | None = typer.Option(
        None, "--model", help="Model dir with nanodit/ (config.json + model.safetensors); default: embedded."
    ),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of the noise, in [0, 2**64)."),
    text_scale: float = typer.Option(4.0, "--text-scale", help="Dual CFG text scale s_T (unused without --caption)."),
    image_scale: float = typer.Option(1.5, "--image-scale", help="Dual CFG image scale s_I."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """A variation of a reference image with NanoDiT (DINO CLS + patch features), optionally steered by a caption."""
    from moviepostproduction.files import check_output
    from moviepostproduction.model_dir import default_model_dir
    from moviepostproduction.resources import LOADS, ModelDims, Request, memory_guard, preflight
    from moviepostproduction.vary.pipeline import VaryPipeline, load_reference
    from moviepostproduction.visualize import save_png

    # Everything that can be refused is, before any weights load: numbers, the output, the reference, the memory.
    check_options(steps=steps, seed=seed, text_scale=text_scale, image_scale=image_scale)
    check_output(output)
    image = load_reference(ref, "--ref")
    device, torch_dtype = parse_device_dtype(device, dtype)
    md = model or default_model_dir()
    dims = ModelDims.from_model_dir(md, torch_dtype, components=LOADS["vary"], transformer="nanodit")
    request = Request("vary", dims.sample_pixels, dims.sample_pixels, device=device)  # NanoDiT's fixed size
    preflight(request, dims)
    with memory_guard(request):
        pipe = VaryPipeline.from_model_dir(md, dtype=torch_dtype, device=device)
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
