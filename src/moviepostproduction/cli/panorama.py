"""`mpp panorama` and `mpp view`: seamless 360 plates and their offline viewer."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import (
    DEVICE_HELP,
    DTYPE_HELP,
    STEPS_HELP,
    adapter_option,
    app,
    check_options,
    compile_option,
    finish_loading,
    lora_option,
    noise_temperature_option,
    offload_option,
    parse_device_dtype,
    parse_loras,
    parse_memory,
    quantize_option,
    ref_guidance_option,
    user_errors,
)


@app.command()
@user_errors
def panorama(
    output: str = typer.Option(..., "-o", "--output", help="Output PNG, width = 2 x height (equirectangular)."),
    caption: str | None = typer.Option(None, "--caption", help="Text prompt."),
    scene: str | None = typer.Option(None, "--scene", help="A panorama scene (refs may wrap the seam), not --caption."),
    height: int | None = typer.Option(None, "--height", help="Height in pixels, a multiple of 16 [default: 256]."),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    seed: int | None = typer.Option(None, "--seed", help="Seed in [0, 2**64) (default: the scene's seed, else 0)."),
    guidance: float = typer.Option(3.5, "--guidance", help="FLUX guidance embedding scale."),
    ref_guidance: float | None = ref_guidance_option(),
    noise_temperature: float | None = noise_temperature_option(),
    model: str | None = typer.Option(None, "--model", help="Model dir (FLUX.1-dev layout); default: embedded."),
    adapter: str | None = adapter_option(),
    lora: list[str] | None = lora_option(),
    pad: int = typer.Option(1, "--pad", help="Wrapped token columns on each side (DiT360: 1; 0 = off)."),
    pad_ids: str = typer.Option("opposite", "--pad-ids", help="Pad position ids: opposite (DiT360) or continuous."),
    periodic_rope: bool = typer.Option(False, "--periodic-rope/--no-periodic-rope", help="Column RoPE on a circle."),
    roll: str = typer.Option("off", "--roll", help="Latent rolling between steps: off, fixed or random."),
    circular_vae: bool = typer.Option(True, "--circular-vae/--no-circular-vae", help="Circular VAE width padding."),
    html: bool = typer.Option(False, "--html", help="Also write OUT.html, a self-contained 360 viewer."),
    quantize: str | None = quantize_option(),
    offload: str | None = offload_option(),
    compile_model: bool = compile_option(),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Generate a seamless 360-degree panorama from a caption (or a panorama scene with placed refs)."""
    from pathlib import Path

    from PIL import Image

    from moviepostproduction.encoders import TextEncoder
    from moviepostproduction.errors import Problem, ValidationError
    from moviepostproduction.files import check_output
    from moviepostproduction.model_dir import default_model_dir
    from moviepostproduction.panorama.pipeline import PanoramaPipeline, compose_panorama
    from moviepostproduction.panorama.seams import seam_ratio
    from moviepostproduction.panorama.viewer import write_viewer
    from moviepostproduction.panorama.wrap import PanoramaConfig, panorama_grid
    from moviepostproduction.resources import LOADS, ModelDims, Request, memory_guard, preflight
    from moviepostproduction.scene import load_scene
    from moviepostproduction.visualize import save_png

    # Everything that can be refused is, before any weights load: numbers, outputs, the scene or size, the memory.
    if (caption is None) == (scene is None):
        raise ValidationError([Problem("--caption", caption, "give exactly one of --caption or --scene")])
    if scene is not None and height is not None:
        raise ValidationError([Problem("--height", height, "the scene sets the size; drop --height")])
    check_options(steps=steps, seed=seed, guidance=guidance, ref_guidance=ref_guidance,
                  noise_temperature=noise_temperature)  # fmt: skip
    loras = parse_loras(lora)
    check_output(output)
    if html:
        check_output(Path(output).with_suffix(".html"), "--html")
    config = PanoramaConfig(pad=pad, pad_ids=pad_ids, periodic_rope=periodic_rope, circular_vae=circular_vae, roll=roll)
    loaded = load_scene(scene) if scene is not None else None
    if loaded is not None and not loaded.panorama:
        raise ValidationError([Problem("panorama", loaded.panorama, f"{scene} is not a panorama scene")])
    side = loaded.height if loaded is not None else height or 256
    config.check_grid(panorama_grid(side))
    device, torch_dtype = parse_device_dtype(device, dtype)
    memory = parse_memory(quantize, offload, False, device)
    md = model or default_model_dir()
    refs = len(loaded.refs) if loaded is not None else 0
    request = Request("panorama", side, 2 * side, refs=refs, device=device)
    loads = LOADS["compose" if loaded is not None else "panorama"]
    preflight(request, ModelDims.from_model_dir(md, torch_dtype, adapter=adapter, components=loads, **memory.counted()))
    sampling = dict(
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance,
        ref_guidance_scale=ref_guidance,  # None: the model dir's
        noise_temperature=noise_temperature,
        progress=True,
    )
    with memory_guard(request):
        if loaded is not None:
            from moviepostproduction.compose.pipeline import ComposePipeline

            compose_pipe = ComposePipeline.from_model_dir(
                md, adapter=adapter, dtype=torch_dtype, device=device, **memory.keywords()
            )
            finish_loading(compose_pipe, loras, compile_model)
            result = compose_panorama(compose_pipe, loaded, config=config, **sampling)
            prompt = loaded.caption
        else:
            pipe = PanoramaPipeline.from_model_dir(
                md, adapter=adapter, config=config, dtype=torch_dtype, device=device, **memory.keywords(tiling=False)
            )
            finish_loading(pipe, loras, compile_model)
            t5_config = memory.quantized(torch_dtype, device)[1]
            encoder = TextEncoder.load(md, dtype=torch_dtype, device=device, t5_quantization_config=t5_config)
            text = encoder.encode([caption], pipe.defaults.max_text_tokens)
            del encoder  # used once: its memory is free before sampling
            result = pipe(prompt_embeds=text.t5, pooled_prompt_embeds=text.pooled, height=side, **sampling)
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
    from moviepostproduction.panorama.viewer import write_viewer

    typer.echo(f"wrote {write_viewer(image, output, title=title)}")
