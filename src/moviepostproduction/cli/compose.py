"""`mpp validate` and `mpp compose`: scene files -> checks, or one shot."""

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
def validate(
    scene: str = typer.Argument(..., help="Scene file (.json, .yaml or .yml)."),
    max_refs: int = typer.Option(50, "--max-refs", min=0, help="Most refs the scene may have."),
) -> None:
    """Check a scene file and list its refs; on problems print one line each and exit with code 2."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from moviepostproduction.scene import DEPTHS, load_scene

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


@app.command()
@user_errors
def compose(
    scene: str = typer.Argument(..., help="Scene file (.json or .yaml)."),
    output: str = typer.Option(..., "-o", "--output", help="Output PNG."),
    model: str | None = typer.Option(
        None, "--model", help="A FLUX.1 folder as downloaded (or a model dir with adapter/); default: embedded."
    ),
    adapter: str | None = adapter_option(),
    lora: list[str] | None = lora_option(),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    seed: int | None = typer.Option(None, "--seed", help="Seed in [0, 2**64) (default: the scene's seed, else 0)."),
    guidance: float = typer.Option(3.5, "--guidance", help="FLUX guidance embedding scale."),
    true_cfg: float = typer.Option(1.0, "--true-cfg", help="True CFG scale (> 1 with --negative)."),
    negative: str | None = typer.Option(None, "--negative", help="Negative prompt for true CFG."),
    ref_guidance: float | None = ref_guidance_option(),
    noise_temperature: float | None = noise_temperature_option(),
    overlay: bool = typer.Option(False, "--overlay", help="Also write OUT.layout.png: boxes, depth, alpha."),
    max_refs: int = typer.Option(50, "--max-refs", min=0, help="Most refs the scene may have."),
    quantize: str | None = quantize_option(),
    offload: str | None = offload_option(),
    compile_model: bool = compile_option(),
    vae_tiling: bool = vae_tiling_option(),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Compose a scene: caption + references placed by bbox and depth -> one image."""
    from pathlib import Path

    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.files import check_output
    from moviepostproduction.model_dir import default_model_dir
    from moviepostproduction.resources import LOADS, ModelDims, Request, memory_guard, preflight
    from moviepostproduction.scene import load_scene
    from moviepostproduction.visualize import draw_layout, save_png

    # Everything that can be refused is, before any weights load: numbers, outputs, the scene, the memory bound.
    check_options(steps=steps, seed=seed, guidance=guidance, true_cfg=true_cfg, ref_guidance=ref_guidance,
                  noise_temperature=noise_temperature)  # fmt: skip
    loras = parse_loras(lora)
    check_output(output)
    if overlay:
        check_output(Path(output).with_suffix(".layout.png"), "--overlay")
    loaded = load_scene(scene, max_refs=max_refs)
    device, torch_dtype = parse_device_dtype(device, dtype)
    memory = parse_memory(quantize, offload, vae_tiling, device)
    md = model or default_model_dir()
    request = Request("compose", loaded.height, loaded.width, refs=len(loaded.refs), device=device)
    preflight(
        request,
        ModelDims.from_model_dir(md, torch_dtype, adapter=adapter, components=LOADS["compose"], **memory.counted()),
    )
    with memory_guard(request):
        pipe = ComposePipeline.from_model_dir(
            md, adapter=adapter, dtype=torch_dtype, device=device, **memory.keywords()
        )
        finish_loading(pipe, loras, compile_model)
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


@app.command("init-adapter")
@user_errors
def init_adapter(
    model: str = typer.Option(
        ..., "--model", help="A FLUX.1 folder as downloaded, or flux1-dev / flux1-schnell (single files: ComfyUI)."
    ),
    out: str = typer.Option(..., "-o", "--out", help="The adapter folder to write."),
    clip: str | None = typer.Option(
        None, "--clip", help="CLIP folder as downloaded (CLIPModel or vision) [default: MODEL/image_encoders/clip]."
    ),
    dino: str | None = typer.Option(
        None, "--dino", help="DINOv2 folder as downloaded [default: MODEL/image_encoders/dino]."
    ),
    copy_encoders: bool = typer.Option(False, "--copy-encoders", help="Copy the encoders in instead of naming them."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the (non-zero) initial weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing adapter folder."),
) -> None:
    """Write a fresh composition adapter sized for MODEL: compose then samples exactly as stock FLUX until trained."""
    from moviepostproduction.compose.adapter_init import init_adapter as write_adapter

    path, cfg = write_adapter(
        model, out=out, clip=clip, dino=dino, copy_encoders=copy_encoders, seed=seed, overwrite=overwrite
    )
    sizes = f"width {cfg.hidden_dim}, {cfg.num_double_blocks} + {cfg.num_single_blocks} blocks"
    typer.echo(f"wrote {path} ({sizes}, layout blocks {list(cfg.resolved_layout_blocks)}; untrained)")
    typer.echo(f"use it with: mpp compose SCENE -o OUT.png --model {model} --adapter {path}")
