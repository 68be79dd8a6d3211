"""`mpp fill`: FLUX-Fill repainting of a plate's mask, with a semantic map and refs."""

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
    vae_tiling_option,
)


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
    adapter: str | None = adapter_option(),
    lora: list[str] | None = lora_option(),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    seed: int = typer.Option(0, "--seed", help="Noise seed in [0, 2**64)."),
    guidance: float = typer.Option(30.0, "--guidance", help="FLUX guidance embedding scale (FLUX-Fill default 30)."),
    ref_guidance: float | None = ref_guidance_option(),
    noise_temperature: float | None = noise_temperature_option(),
    quantize: str | None = quantize_option(),
    offload: str | None = offload_option(),
    compile_model: bool = compile_option(),
    vae_tiling: bool = vae_tiling_option(),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Repaint the masked part of a plate (FLUX-Fill); pixels outside the mask are kept exactly."""
    from moviepostproduction.files import check_output
    from moviepostproduction.fill.inputs import read_fill_inputs
    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.resources import LOADS, ModelDims, Request, memory_guard, preflight
    from moviepostproduction.toyworld.toy_model import default_fill_model_dir
    from moviepostproduction.visualize import save_png

    # Everything that can be refused is, before any weights load: numbers, the output, the inputs, the memory.
    check_options(steps=steps, seed=seed, guidance=guidance, ref_guidance=ref_guidance,
                  noise_temperature=noise_temperature)  # fmt: skip
    loras = parse_loras(lora)
    check_output(output)
    inputs = read_fill_inputs(image, mask, semantic=semantic, scene=refs, prompt=prompt)
    device, torch_dtype = parse_device_dtype(device, dtype)
    memory = parse_memory(quantize, offload, vae_tiling, device)
    md = model or default_fill_model_dir()
    n_refs = len(inputs.scene.refs) if inputs.scene is not None else 0
    request = Request("fill", inputs.size[0], inputs.size[1], refs=n_refs, device=device)
    loads = (*LOADS["fill"], *(LOADS["compose"] if refs is not None else ()))
    preflight(request, ModelDims.from_model_dir(md, torch_dtype, adapter=adapter, components=loads, **memory.counted()))
    with memory_guard(request):
        pipe = FillPipeline.from_model_dir(
            md,
            semantic=semantic is not None,
            refs=refs is not None,
            adapter=adapter,
            dtype=torch_dtype,
            device=device,
            **memory.keywords(),
        )
        finish_loading(pipe, loras, compile_model)
        result = pipe(
            inputs,
            num_inference_steps=steps,
            guidance_scale=guidance,
            ref_guidance_scale=ref_guidance,
            noise_temperature=noise_temperature,
            seed=seed,
            progress=True,
        )
    out = save_png(result.images[0], output, {"mpp:prompt": inputs.prompt, "mpp:model": result.label or str(model)})
    h, w = result.mask.shape
    label = f" [{result.label}]" if result.label else ""
    typer.echo(f"wrote {out} ({w}x{h}), repainted {int(result.mask.sum())} px ({100 * result.mask.mean():.1f}%){label}")
