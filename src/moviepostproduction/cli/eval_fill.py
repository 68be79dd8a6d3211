"""`mpp eval-fill`: a fill model dir on held-out toy-world triptychs (toyworld/fill_eval.py, docs/fill.md)."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import STEPS_HELP, app, user_errors


@app.command("eval-fill")
@user_errors
def eval_fill(
    model: str | None = typer.Option(
        None, "--model", help="Fill model dir (mpp train, task: fill); default: the embedded fill model."
    ),
    n: int = typer.Option(100, "--n", help="Held-out triptychs (split heldout, toy-world seed 0, from index 0)."),
    seeds: int = typer.Option(1, "--seeds", help="Samples per triptych, seed j from the noise of i + 100003 j."),
    steps: int = typer.Option(28, "--steps", help=STEPS_HELP),
    variants: str | None = typer.Option(
        None,
        "--variants",
        help="Comma separated: model, no-map (no semantic map), zeroed (semantic attention gate 0), untrained (the "
        "same architecture at init), targets (the target images: the ceiling); default all. With --refs: model, "
        "caption-only (no ref conditioning), untrained, pasted (the sprite pasted in: the ceiling); default all.",
    ),
    modes: str | None = typer.Option(
        None, "--modes", help="Hole kinds drawn: sprites, box, extend (default all); not with --refs."
    ),
    refs: bool = typer.Option(
        False,
        "--refs",
        help="Reference insertion instead: a held-out scene's front sprite inserted at its box into another held-out "
        "plate; IoU of the inserted ref with its box, identity (colour, shape), known-region error.",
    ),
    size: int = typer.Option(128, "--size", help="Triptych side in pixels: the model's training world [128]."),
    max_refs: int = typer.Option(3, "--max-refs", help="Sprites per scene at most: the training world's [3]."),
    out: str | None = typer.Option(
        None, "--out", help="Write eval.md, eval.json, samples.csv (one row per triptych and seed) and grid.png here."
    ),
) -> None:
    """Semantic class accuracy inside the mask, boundary error across its edge and the known-region error outside it,
    for a fill model, without its map, with its semantic attention zeroed and untrained."""
    from moviepostproduction.toyworld.fill_eval import run_fill_eval

    lines = run_fill_eval(model=model, n=n, steps=steps, seeds=seeds, variants=variants, out=out, modes=modes,
                          size=size, max_refs=max_refs, refs=refs)  # fmt: skip
    for line in lines:
        typer.echo(line)
