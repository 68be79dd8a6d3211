"""`mpp eval-vary`: NanoDiT variations of held-out toy-world refs, measured (docs/vary.md; toyworld/vary_eval.py)."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import DEVICE_HELP, DTYPE_HELP, STEPS_HELP, app, parse_device_dtype, user_errors

VARIANTS_HELP = (
    "Comma separated: model (text + DINO CLS + patches), no-patches (patches replaced by the learned null), "
    "image-only (CLS + patches, no text), cls-only (no patches, no text), text-only, references (the input images: "
    "the ceiling of the reading rules), scenes (each ref's held-out scene), vae-roundtrip (those scenes through the "
    "model dir's VAE: the ceiling of its latent space)."
)


@app.command("eval-vary")
@user_errors
def eval_vary(
    model: str | None = typer.Option(None, "--model", help="Model dir with nanodit/; default: the shipped toy model."),
    n: int = typer.Option(32, "--n", help="Held-out refs (scenes 1000 .. of the toy world's heldout split)."),
    seeds: int = typer.Option(4, "--seeds", help="Variations per ref (diversity needs >= 2)."),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    variants: str = typer.Option(
        "model,no-patches,image-only,cls-only,text-only,references,scenes,vae-roundtrip",
        "--variants",
        help=VARIANTS_HELP,
    ),
    out: str | None = typer.Option(
        None, "--out", help="Write eval.md, eval.json, samples.csv, grid.png and sweep.png here."
    ),
    start: int = typer.Option(1000, "--start", help="First held-out scene index (0-31: the trainer's previews)."),
    input: str = typer.Option("sprite", "--input", help="Image input: sprite (the ref on white) or scene."),
    caption: str = typer.Option("sprite", "--caption", help="sprite (the ref's phrase), scene (its caption) or none."),
    text_scale: float = typer.Option(4.0, "--text-scale", help="s_T of the variant rows (VaryPipeline's default)."),
    image_scale: float = typer.Option(1.5, "--image-scale", help="s_I of the variant rows (VaryPipeline's default)."),
    text_scales: str = typer.Option("1,4,7", "--text-scales", help="The sweep's text scales, comma separated."),
    image_scales: str = typer.Option("1,1.5,3", "--image-scales", help="The sweep's image scales, comma separated."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
) -> None:
    """Shape and colour kept, DINO similarity, diversity between seeds and layout IoU of NanoDiT variations of
    held-out refs, for the model and its conditioning ablations, and a dual-CFG sweep (text x image scale)."""
    from moviepostproduction.toyworld.vary_eval import run_vary_eval

    device, torch_dtype = parse_device_dtype(device, dtype)
    lines = run_vary_eval(model=model, n=n, seeds=seeds, steps=steps, variants=variants, out=out, start=start,
                          input=input, caption=caption, text_scale=text_scale, image_scale=image_scale,
                          text_scales=text_scales, image_scales=image_scales, device=device,
                          dtype=torch_dtype)  # fmt: skip
    for line in lines:
        typer.echo(line)
