"""`mpp eval-fill --refs`: reference insertion of a fill model on held-out toy-world plates (docs/fill.md, "Reference
insertion"), through the real `FillPipeline` given a scene's refs. `run_fill_eval(refs=True)` checks the options and
calls `run_refs_eval`.

Held-out draw: plate i is held-out scene i of the fill eval's world (`generate_scene(i, seed, world,
split="heldout")`, the scene that fill eval's triptych i cuts). Into it goes the front sprite (refs[0]: fg, nothing in
front of it) of its donor scene: the first held-out scene DONOR_START + DONOR_SEARCH i + k (k = 0, 1, ...) whose front
sprite's colour no sprite of plate i has. Colours name sprites in the scorer, so the plate alone never scores; each
plate has donors of its own (no ref repeats across plates), and no donor is a plate (plate indices stay below
DONOR_START: `--start` + `--n` <= 10,100,000). The ref is that sprite's reference image
(the sprite alone on white, re-rendered with jitter), its box the sprite's box in scene j, the mask the box rounded
outward to whole pixels (the pipeline's default for refs), the caption the toy world's own caption of a one-sprite
scene, "<ref caption> on a <plate's background> background" (the ref's caption is its span in it).

Scores per inserted ref, pooled over plates and seeds (`score_insertion`): the IoU with the box of the largest region
of the ref's colour near the box (`metrics.locate_sprite_near`; 0 when there is none), placed = IoU >= PLACED_IOU
(issue 43's target), the centre error, identity as compose's fg identity (the same named colour and shape class in
the ref and in the crop at the box; colour and shape also alone), and the known-region error (the largest uint8
difference from the plate outside the mask: 0 by paste-back).

Variants, one row each (the same plates, refs, masks, prompts and noise seeds):
- `model`: the dir with the refs, at its reference guidance default (`ref_guidance_scale` of its model_index.json);
- `caption-only`: the same plate, mask and prompt without the refs' conditioning: the fill model alone;
- `untrained`: the fill architecture at init (`fill_eval.untrained_pipeline`: transformer/ with its LoRA spec and
  SemanticCrossAttention at init, no trained x_embedder) with the dir's adapter and image encoders, which fill training
  does not change;
- `pasted`: the donor scene's own pixels of the sprite pasted into the plate: a perfect insertion (the ceiling).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.fill.inputs import bbox_mask
from moviepostproduction.scene import Scene, scene_from_dict
from moviepostproduction.toyworld.backgrounds import BACKGROUNDS
from moviepostproduction.toyworld.compose_eval import SEED_STRIDE
from moviepostproduction.toyworld.eval_report import markdown_table, write_eval_files
from moviepostproduction.toyworld.metrics import bbox_iou, box_crop, centre_error, locate_sprite_near
from moviepostproduction.toyworld.shards import encode_png
from moviepostproduction.toyworld.sprite_match import classify_sprite, parts_match
from moviepostproduction.toyworld.synthetic import ToyRef, ToyScene, ToyWorldConfig, generate_scene

__all__ = [
    "PLACED_IOU",
    "REFS_VARIANTS",
    "Insertion",
    "RefsScore",
    "RefsVariant",
    "build_refs_variants",
    "evaluate_refs",
    "heldout_insertions",
    "refs_grid",
    "refs_table",
    "run_refs_eval",
    "score_insertion",
]

REFS_VARIANTS = ("model", "caption-only", "untrained", "pasted")
PLACED_IOU = 0.6  # issue 43: an inserted ref counts as placed at this IoU with its box
DONOR_START = 10**8  # donor scenes of plate i: held-out DONOR_START + DONOR_SEARCH i + k, k < DONOR_SEARCH
DONOR_SEARCH = 100  # tried before giving up (only a plate holding every sprite colour exhausts them)
GRID_PLATES = 3  # grid.png: this many plates per variant
TABLE_COLUMNS = ("model", "IoU", "placed (IoU >= 0.6)", "centre error", "identity", "colour", "shape",
                 "known-region error", "refs")  # fmt: skip


@dataclass
class Insertion:
    """Plate `index` (a held-out scene) and the front sprite of the `donor` scene inserted into it (`scene`)."""

    index: int
    plate: ToyScene
    donor: ToyScene
    scene: Scene  # the scene file: the ref's image at its box, and the caption

    @property
    def ref(self) -> ToyRef:
        return self.donor.refs[0]

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the repaint mask, the ref's box rounded outward (what the pipeline uses for refs)."""
        return bbox_mask(self.scene, self.plate.image.shape[:2])


def insertion_caption(ref: ToyRef, plate: ToyScene) -> str:
    """The toy world's caption of a one-sprite scene: the ref on the plate's background."""
    return f"{ref.caption} on a {BACKGROUNDS[plate.background]} background"


def donor_index(plate: ToyScene, world: ToyWorldConfig, seed: int) -> int:
    """The first of the plate's donor scenes whose front sprite's colour no sprite of the plate has."""
    taken = {r.colour for r in plate.refs}
    first = DONOR_START + DONOR_SEARCH * plate.index
    for j in range(first, first + DONOR_SEARCH):
        if generate_scene(j, seed, world, split="heldout").refs[0].colour not in taken:
            return j
    why = f"plate {plate.index} holds the colours {sorted(taken)}: no held-out front sprite of another to insert"
    raise ValidationError([Problem("--max-refs", world.max_refs, why)])


def heldout_insertions(
    n: int, world: ToyWorldConfig, folder: Path, *, seed: int = 0, start: int = 0
) -> list[Insertion]:
    """Plates start .. start + n - 1 with their insertions (module docstring); the ref images are written under
    `folder` (the scene files name them)."""
    out = []
    for i in range(start, start + n):
        plate = generate_scene(i, seed, world, split="heldout")
        donor = generate_scene(donor_index(plate, world, seed), seed, world, split="heldout")
        ref = donor.refs[0]
        sub = folder / f"plate-{i:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / "ref.png").write_bytes(encode_png(ref.image))
        height, width = plate.image.shape[:2]
        entry = {"image": "ref.png", "bbox": list(ref.bbox), "depth": "fg", "caption": ref.caption}
        data = {"caption": insertion_caption(ref, plate), "width": width, "height": height, "seed": i, "refs": [entry]}
        out.append(Insertion(i, plate, donor, scene_from_dict(data, base_dir=sub)))
    return out


def pasted(item: Insertion) -> np.ndarray:
    """(H, W, 3) uint8: the plate with the donor scene's own pixels of the sprite (a perfect insertion)."""
    image = item.plate.image.copy()
    image[item.ref.visible_mask] = item.donor.image[item.ref.visible_mask]
    return image


def score_insertion(image: np.ndarray, item: Insertion, world: ToyWorldConfig, *, seed: int = 0) -> dict:
    """The judgement of one (H, W, 3) uint8 image of the plate with the ref inserted (module docstring): one record
    of samples.csv, pooled by `RefsScore.row`."""
    ref = item.ref
    found = locate_sprite_near(image, ref.image, ref.bbox)
    iou = float(bbox_iou(found, ref.bbox)) if found is not None else 0.0
    reading = classify_sprite(box_crop(image, ref.bbox))
    colour, shape = parts_match(classify_sprite(ref.image), reading)
    outside = np.abs(image.astype(np.int64) - item.plate.image.astype(np.int64))[~item.mask]
    return {"plate": item.index, "donor": item.donor.index, "seed": seed, "shape": ref.shape, "colour": ref.colour,
            "unseen pair": (ref.shape, ref.colour) in {tuple(c) for c in world.heldout_combos},
            "IoU": round(iou, 4), "placed": iou >= PLACED_IOU,
            "centre error": round(float(centre_error(found, ref.bbox)), 4) if found is not None else math.nan,
            "read colour": reading[0] or "", "read shape": reading[1] or "", "colour kept": colour,
            "shape kept": shape, "identity": colour and shape, "known error": int(outside.max(initial=0))}  # fmt: skip


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


@dataclass
class RefsScore:
    """A variant's per-ref records (the rows of samples.csv) and their pooled table row."""

    name: str
    samples: list[dict] = field(default_factory=list)

    def row(self) -> dict[str, float | str | int]:
        s = self.samples

        def mean(key: str) -> float:
            return _mean([float(r[key]) for r in s])

        return {"model": self.name, "IoU": mean("IoU"), "placed (IoU >= 0.6)": mean("placed"),
                "centre error": mean("centre error"), "identity": mean("identity"), "colour": mean("colour kept"),
                "shape": mean("shape kept"), "known-region error": max((r["known error"] for r in s), default=0),
                "refs": len(s)}  # fmt: skip


@dataclass
class RefsVariant:
    name: str
    pipe: object | None  # a FillPipeline loaded with refs=True; None: the pasted ceiling
    use_refs: bool


def build_refs_variants(model_dir, names: list[str], untrained: Callable, *, device: str = "cpu") -> list[RefsVariant]:
    """The pipelines of the requested variants, the dir loaded once (nothing loads for `pasted` alone).
    `untrained(md, pipe)`: the dir's fill architecture at init (`fill_eval.untrained_pipeline`)."""
    from moviepostproduction.fill.model import FillFlux
    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.model_dir import as_model_dir

    if not [v for v in names if v != "pasted"]:
        return [RefsVariant("pasted", None, False)]
    md = as_model_dir(model_dir)
    pipe = FillPipeline.from_model_dir(md, refs=True, device=device)
    out = []
    for name in names:
        if name == "untrained":  # the init, given the dir's adapter and image encoders to insert the refs with
            fresh = untrained(md, pipe)
            model = FillFlux(fresh.model.transformer, fresh.model.semantic, pipe.model.adapter)
            parts = {"layout": fresh.layout, "label": fresh.label, "defaults": pipe.defaults}
            fresh = FillPipeline(model, pipe.vae, pipe.text_encoder, image_encoder=pipe.image_encoder, **parts)
            out.append(RefsVariant(name, fresh, True))
        else:
            out.append(RefsVariant(name, None if name == "pasted" else pipe, name != "caption-only"))
    return out


def generate(variant: RefsVariant, item: Insertion, *, steps: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: the variant's fill of the plate's box (with or without the ref's conditioning)."""
    if variant.pipe is None:
        return pasted(item)
    if variant.use_refs:  # the mask: the box, from the scene (the pipeline's default for refs)
        out = variant.pipe(item.plate.image, scene=item.scene, num_inference_steps=steps, seed=seed)
    else:
        out = variant.pipe(item.plate.image, item.mask, prompt=item.scene.caption, num_inference_steps=steps, seed=seed)
    return np.asarray(out.images[0])


def evaluate_refs(
    variants: list[RefsVariant],
    items: list[Insertion],
    world: ToyWorldConfig,
    *,
    steps: int,
    seeds: int = 1,
    progress: bool = True,
) -> tuple[dict[str, RefsScore], dict[str, list[np.ndarray]]]:
    """Scores per variant and its images of each plate's first seed. Seed j of plate i draws the noise of seed
    i + SEED_STRIDE j, for every variant alike."""
    from tqdm import tqdm

    scores, images = {}, {}
    for variant in variants:
        score, kept = RefsScore(variant.name), []
        for item in tqdm(items, desc=f"eval-fill --refs {variant.name}", disable=not progress):
            for j in range(seeds if variant.pipe is not None else 1):  # the pasted ceiling has no noise
                image = generate(variant, item, steps=steps, seed=item.index + SEED_STRIDE * j)
                score.samples.append(score_insertion(image, item, world, seed=j))
                if j == 0:
                    kept.append(image)
        scores[variant.name], images[variant.name] = score, kept
    return scores, images


def _with_box(item: Insertion) -> Image.Image:
    out = Image.fromarray(item.plate.image)
    h, w = item.plate.image.shape[:2]
    x0, y0, x1, y1 = item.ref.bbox
    ImageDraw.Draw(out).rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=(255, 64, 64))
    return out


def refs_grid(items: list[Insertion], images: dict[str, list[np.ndarray]], per_variant: int = GRID_PLATES):
    """Rows of [plate with the box | fill | the ref], `per_variant` plates per variant, variants in order; pixels
    doubled."""
    from moviepostproduction.visualize import image_grid

    tiles = []
    for fills in images.values():
        for item, fill in zip(items[:per_variant], fills, strict=False):
            tiles += [_with_box(item), Image.fromarray(fill), Image.fromarray(item.ref.image)]
    grid = image_grid(tiles, columns=3)  # the ref is scaled to the plate's size
    return grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)


def refs_table(rows: list[dict]) -> str:
    """Markdown table, one row per variant (TABLE_COLUMNS); a score with nothing to judge shows as '-'."""
    return markdown_table(rows, TABLE_COLUMNS)


def run_refs_eval(
    model_dir,
    chosen: list[str],
    world: ToyWorldConfig,
    *,
    n: int,
    steps: int,
    seeds: int,
    untrained: Callable,
    seed: int = 0,
    start: int = 0,
    out: str | None = None,
    progress: bool = True,
    device: str = "cpu",
) -> list[str]:
    """What `mpp eval-fill --refs` does once `run_fill_eval` has checked the options; returns the lines to print
    (header, markdown table, files written)."""

    built = build_refs_variants(model_dir, chosen, untrained, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        items = heldout_insertions(n, world, Path(tmp), seed=seed, start=start)
        scores, images = evaluate_refs(built, items, world, steps=steps, seeds=seeds, progress=progress)
    rows = [scores[v].row() for v in chosen]
    table = refs_table(rows)
    pipe = next((v.pipe for v in built if v.pipe is not None), None)
    label = pipe.label if pipe is not None else ""
    guidance = pipe.defaults.ref_guidance_scale if pipe is not None else None
    header = (
        f"held-out plates {start}-{start + n - 1} (split heldout, toy-world seed {seed}, {world.size} px, up to "
        f"{world.max_refs} sprites), each with the front sprite of a held-out donor scene (a colour the plate lacks) "
        f"inserted at its box, {steps} steps, {seeds} seed(s) per plate"
        + (f", ref guidance {guidance:g} (the dir's)" if guidance is not None else "")
        + f", model {model_dir or 'none (pasted only)'}"
        + (f" [{label}]" if label else "")
    )
    lines = [header, table]
    if out:
        report = {"task": "fill", "refs": True, "split": "heldout", "seed": seed, "start": start, "n": n,
                  "seeds": seeds, "steps": steps, "size": world.size, "max_refs": world.max_refs,
                  "ref_guidance": guidance, "placed_iou": PLACED_IOU, "model": str(model_dir), "label": label,
                  "insertions": [{"plate": it.index, "donor": it.donor.index, "caption": it.scene.caption,
                                  "bbox": list(it.ref.bbox)} for it in items], "rows": rows}  # fmt: skip
        lines.append(
            write_eval_files(out, header, table, report, [scores[v] for v in chosen], refs_grid(items, images))
        )
    return lines
