"""`mpp annotate`: footage with no annotations -> scene files (detector + SAM + depth + captioner)."""

from __future__ import annotations

import typer

from moviepostproduction.cli.common import app, user_errors


@app.command("annotate")
@user_errors
def annotate(
    images: str = typer.Argument(..., metavar="DIR", help="Folder of .png / .jpg / .jpeg / .webp images."),
    out: str = typer.Option(..., "-o", "--out", help="Output folder of scene files + images + refs/."),
    detector: str = typer.Option(..., "--detector", help="Zero-shot detector folder (OWLv2, OWL-ViT, Grounding DINO)."),
    segmenter: str = typer.Option(..., "--segmenter", help="SAM model folder (facebook/sam-vit-base)."),
    depth: str | None = typer.Option(None, "--depth", help="Depth-estimation folder (left out: the box rule)."),
    captioner: str | None = typer.Option(None, "--captioner", help="Captioner folder, BLIP (left out: labels joined)."),
    labels: str | None = typer.Option(
        None, "--labels", help='Text queries, "person,car,chair" (default: 10 everyday things).'
    ),
    labels_file: str | None = typer.Option(None, "--labels-file", help="Text queries, one a line."),
    threshold: float = typer.Option(0.2, "--threshold", help="Least detector score."),
    nms_iou: float = typer.Option(0.5, "--nms-iou", help="Boxes of one label overlapping more: the best kept."),
    max_refs: int = typer.Option(20, "--max-refs", help="Most refs per image (the best-scoring boxes)."),
    min_area: float = typer.Option(0.001, "--min-area", help="Least box area / image area."),
    max_images: int | None = typer.Option(
        None, "--max-images", help="Refuse a DIR with more images (default 2,000,000)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip and count unreadable or odd-sized images."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder whole."),
) -> None:
    """Detect, segment, depth-label and caption every image of DIR and write scene files that `mpp prepare-data
    --from-scenes` turns into shards (docs/training-data.md, "Footage without annotations")."""
    from moviepostproduction.datasets.annotate import AnnotateConfig, parse_labels, read_labels_file
    from moviepostproduction.datasets.annotate import annotate as run
    from moviepostproduction.errors import Problem, ValidationError

    if labels is not None and labels_file is not None:
        raise ValidationError([Problem("--labels-file", labels_file, "give --labels or --labels-file, not both")])
    options = {"threshold": threshold, "nms_iou": nms_iou, "max_refs": max_refs, "min_area": min_area}
    options |= {"skip_bad": skip_bad, "overwrite": overwrite}
    if max_images is not None:
        options["max_images"] = max_images
    if labels is not None:
        options["labels"] = parse_labels(labels)
    elif labels_file is not None:
        options["labels"] = read_labels_file(labels_file)
    tally = run(images, out, detector=detector, segmenter=segmenter, depth=depth, captioner=captioner,
                device=device, config=AnnotateConfig(**options), progress=True)  # fmt: skip
    typer.echo(f"{out}: {tally.summary()}")
