"""`mpp eval`: the compose model on held-out toy-world scenes (DESIGN 8), through the real `ComposePipeline`.

Per scene and ref: the sprite of the ref's colour is located in the generated image (largest region of that
colour) and compared with the requested bbox (IoU, centre error; a ref that is not found scores IoU 0);
fg refs that the layout leaves >= 90% visible are checked for identity (same named colour and shape class
in the ref and in the crop at the requested bbox; both parts are also reported alone: fg colour, fg shape), and
fg identity is also split by whether the ref's (shape, colour) pair occurs in training or is one of the world's
held-out pairs (`ToyWorldConfig.heldout_combos`: compositional generalisation).
Leakage: the scene is generated again without its last ref (same seed) and the mean change outside every box
is measured. With several seeds per scene (`seeds`), every scene is sampled from each seed's noise and the table
pools all samples; the fg identity of each seed alone is reported too (its spread is the metric's sampling noise).
Variants: the model as is, its two pathway ablations (layout-only: the modulation offsets and feedback off;
modulation-only: Assemble-Attn off), the untrained model (same architecture and frozen encoders, random
transformer + adapter), and `vae-roundtrip`: the target scenes themselves encoded and decoded by the model's
VAE, no transformer; the most any backbone generating in that latent space can score (its leakage is not
defined, and it is the same for every seed).
Every judgement is also kept per sample (`VariantScore.samples`; `samples.csv` beside the table): which ref of
which scene and seed, its IoU and centre error, and for the judged fg refs what the crop reads as.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.scene import Scene, scene_from_dict
from moviepostproduction.toyworld.eval_report import choice_problems, eval_grid, format_table, samples_csv
from moviepostproduction.toyworld.metrics import bbox_iou, box_crop, centre_error, leakage
from moviepostproduction.toyworld.shards import encode_png
from moviepostproduction.toyworld.sprite_match import classify_sprite, locate_sprite, parts_match
from moviepostproduction.toyworld.synthetic import (
    HELDOUT_COMBOS,
    ToyScene,
    ToyWorldConfig,
    generate_scene,
    named_phrase,
)

VARIANTS = ("model", "layout-only", "modulation-only", "untrained", "vae-roundtrip")
MIN_VISIBLE_FOR_IDENTITY = 0.9  # an fg sprite the layout itself hides in part cannot be judged by its shape
MAX_EVAL_SCENES = 100_000  # `--n`: scene files are written up front, so the count is bounded before any work
MAX_EVAL_SEEDS = 1_000  # `--seeds`
SEED_STRIDE = 100_003  # seed j of scene i draws the noise of seed i + SEED_STRIDE * j (j = 0: the scene's own)


@dataclass
class VariantScore:
    name: str
    iou: list[float] = field(default_factory=list)
    centre: list[float] = field(default_factory=list)
    identity: list[bool] = field(default_factory=list)
    leak: list[float] = field(default_factory=list)
    colour: list[bool] = field(default_factory=list)  # per fg ref judged for identity: the colour part
    shape: list[bool] = field(default_factory=list)  # and the shape part (identity = both)
    unseen: list[bool] = field(default_factory=list)  # and whether its (shape, colour) pair is held out of training
    seed: list[int] = field(default_factory=list)  # and which of the scene's seeds (0, 1, ...) drew the sample
    samples: list[dict] = field(default_factory=list)  # one record per (scene, ref, seed): the rows of samples.csv

    def row(self) -> dict[str, float | str | int]:
        def mean(xs):
            xs = [x for x in xs if not math.isnan(x)]
            return float(np.mean(xs)) if xs else float("nan")

        pairs = list(zip(self.identity, self.unseen, strict=True))  # (identity, pair unseen) per judged fg ref
        by_pair = {u: [float(x) for x, unseen in pairs if bool(unseen) == u] for u in (False, True)}
        by_seed = {  # each seed once (not once per judged ref)
            j: [float(x) for x, k in zip(self.identity, self.seed, strict=True) if k == j] for j in set(self.seed)
        }
        return {"model": self.name, "IoU": mean(self.iou), "centre error": mean(self.centre),
                "fg identity": mean([float(x) for x in self.identity]),
                "fg colour": mean([float(x) for x in self.colour]), "fg shape": mean([float(x) for x in self.shape]),
                "fg identity (seen pairs)": mean(by_pair[False]), "fg identity (unseen pairs)": mean(by_pair[True]),
                "leakage": mean(self.leak), "refs": len(self.iou),
                "fg refs (seen pairs)": len(by_pair[False]), "fg refs (unseen pairs)": len(by_pair[True]),
                "fg identity per seed": [mean(by_seed[j]) for j in sorted(by_seed)]}  # fmt: skip


def heldout_scenes(
    n: int, seed: int, cfg: ToyWorldConfig, folder: Path, split: str = "heldout", start: int = 0
) -> list[tuple[ToyScene, Scene]]:
    """Toy scenes start .. start + n - 1 of a split and the same scenes as scene files (ref PNGs under folder)."""
    out = []
    for i in range(start, start + n):
        toy = generate_scene(i, seed, cfg, split=split)
        sub = folder / f"scene-{i:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        refs = []
        for r, ref in enumerate(toy.refs):
            (sub / f"ref{r}.png").write_bytes(encode_png(ref.image))
            refs.append({"image": f"ref{r}.png", "bbox": list(ref.bbox), "depth": ref.depth,
                         "caption": named_phrase(ref.caption, toy.caption)})  # fmt: skip
        height, width = toy.image.shape[:2]
        data = {"caption": toy.caption, "width": width, "height": height, "seed": i, "refs": refs}
        out.append((toy, scene_from_dict(data, base_dir=sub)))
    return out


def score_image(
    score: VariantScore,
    image: np.ndarray,
    toy: ToyScene,
    heldout_combos: tuple[tuple[str, str], ...] = HELDOUT_COMBOS,
    seed: int = 0,
) -> None:
    """Append the scores of one generated image of `toy`; `heldout_combos`: the (shape, colour) pairs of the
    world that training never showed (its `ToyWorldConfig.heldout_combos`); `seed`: which of the scene's seeds."""
    held = {tuple(c) for c in heldout_combos}
    for r, ref in enumerate(toy.refs):
        found = locate_sprite(image, ref.image)
        score.iou.append(float(bbox_iou(found, ref.bbox)) if found is not None else 0.0)
        score.centre.append(float(centre_error(found, ref.bbox)) if found is not None else float("nan"))
        record = {"scene": toy.index, "ref": r, "seed": seed, "depth": ref.depth, "shape": ref.shape,
                  "colour": ref.colour, "visible": round(ref.visible, 4), "IoU": round(score.iou[-1], 4),
                  "centre error": round(score.centre[-1], 4), "judged": False, "read colour": "", "read shape": "",
                  "identity": ""}  # fmt: skip
        score.samples.append(record)
        if ref.depth == "fg" and ref.visible >= MIN_VISIBLE_FOR_IDENTITY:
            reading = classify_sprite(box_crop(image, ref.bbox))
            colour, shape = parts_match(classify_sprite(ref.image), reading)
            record.update({"judged": True, "read colour": reading[0] or "", "read shape": reading[1] or "",
                           "identity": colour and shape})  # fmt: skip
            score.colour.append(colour)
            score.shape.append(shape)
            score.identity.append(colour and shape)
            score.unseen.append((ref.shape, ref.colour) in held)
            score.seed.append(seed)


class Ablation:
    """Switch a pipeline's pathways off for a variant, and restore it afterwards."""

    def __init__(self, pipe, variant: str, untrained_seed: int = 0):
        self.pipe, self.variant, self.seed = pipe, variant, untrained_seed
        self.saved = None

    def __enter__(self):
        pipe = self.pipe
        self.saved = (pipe.use_layout, pipe.use_modulation, pipe.model.transformer, pipe.model.adapter)
        if self.variant == "layout-only":
            pipe.use_modulation = False
        elif self.variant == "modulation-only":
            pipe.use_layout = False
        elif self.variant == "untrained":
            from diffusers import FluxTransformer2DModel

            from moviepostproduction.compose.modules import CompositionAdapter
            from moviepostproduction.model_dir import move_like

            torch.manual_seed(self.seed)
            tr = pipe.model.transformer
            fresh = FluxTransformer2DModel.from_config(tr.config)
            pipe.model.transformer = move_like(fresh, tr.device, tr.dtype).eval()
            pipe.model.adapter = CompositionAdapter(pipe.model.adapter.cfg).to(tr.device, tr.dtype).eval()
        return pipe

    def __exit__(self, *exc):
        pipe = self.pipe
        pipe.use_layout, pipe.use_modulation, pipe.model.transformer, pipe.model.adapter = self.saved


@torch.no_grad()
def vae_roundtrip(pipe, image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the same image encoded (posterior mode) and decoded by the pipeline's VAE."""
    from moviepostproduction.visualize import pil_to_tensor, tensor_to_pil

    latents = pipe.vae.encode(pil_to_tensor(Image.fromarray(image)).to(pipe.device))
    return np.asarray(tensor_to_pil(pipe.vae.decode(latents))[0])


def evaluate(
    pipe,
    scenes,
    variants=VARIANTS,
    *,
    steps: int = 28,
    leak_scenes: int | None = None,
    progress=True,
    ref_guidance: float | None = None,
    heldout_combos: tuple[tuple[str, str], ...] = HELDOUT_COMBOS,
    seeds: int = 1,
    noise_temperature: float | None = None,
    first_seed: int = 0,
):
    """Scores per variant and the generated images of each scene's first seed (variant -> list of (H, W, 3)
    uint8), scene order.

    `ref_guidance`, `noise_temperature`: the same reference guidance scale and factor on the starting noise for
    every variant (None: the pipeline's defaults); `heldout_combos`: the world's held-out (shape, colour) pairs, for
    the seen / unseen identity split;
    `seeds`: samples per scene, seed j from the noise of seed scene.seed + SEED_STRIDE * j (1: the scene's seed only);
    `first_seed`: j runs from first_seed to first_seed + seeds - 1 (more draws of the same scenes, none repeated).
    """
    from tqdm import tqdm

    def generate(scene: Scene, j: int) -> np.ndarray:
        seed = (scene.seed or 0) + SEED_STRIDE * j
        out = pipe(
            scene,
            num_inference_steps=steps,
            ref_guidance_scale=ref_guidance,
            noise_temperature=noise_temperature,
            seed=seed,
        )
        return np.asarray(out.images[0])

    scores, images = {}, {}
    for variant in variants:
        score, imgs = VariantScore(variant), []
        with Ablation(pipe, variant):
            for k, (toy, scene) in enumerate(tqdm(scenes, desc=f"eval {variant}", disable=not progress)):
                roundtrip = vae_roundtrip(pipe, toy.image) if variant == "vae-roundtrip" else None  # seed-free
                leak = roundtrip is None and len(toy.refs) > 1 and (leak_scenes is None or k < leak_scenes)
                for j in range(first_seed, first_seed + seeds):
                    image = roundtrip if roundtrip is not None else generate(scene, j)
                    score_image(score, image, toy, heldout_combos, seed=j)
                    if leak:
                        without = generate(scene.model_copy(update={"refs": scene.refs[:-1]}), j)
                        score.leak.append(leakage(without, image, [r.bbox for r in toy.refs[:-1]]))
                    if j == first_seed:
                        imgs.append(image)
        scores[variant], images[variant] = score, imgs
    return scores, images


def run_eval(
    *,
    split: str,
    model: str | None,
    n: int,
    steps: int,
    variants: str,
    leak_scenes: int,
    out: str | None,
    ref_guidance: float | None = None,
    start: int = 0,
    seeds: int = 1,
    noise_temperature: float | None = None,
    first_seed: int = 0,
    adapter: str | None = None,
) -> list[str]:
    """What `mpp eval` does; returns the lines to print (header, markdown table, files written). `adapter`: an
    adapter folder used with `model` instead of MODEL/adapter (`mpp eval --adapter DIR`; the toy world and its seed
    are still the model dir's)."""
    import json
    import tempfile

    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.errors import Problem, ValidationError
    from moviepostproduction.files import check_output, write_text_atomic
    from moviepostproduction.model_dir import ModelDir, default_model_dir
    from moviepostproduction.resources import LOADS, ModelDims, Request, preflight
    from moviepostproduction.toyworld.synthetic import SPLITS
    from moviepostproduction.visualize import save_png

    chosen, problems = choice_problems("--variants", variants, VARIANTS)
    if split not in SPLITS:
        problems.append(Problem("--split", split, f"expected one of {', '.join(SPLITS)}"))
    if problems:
        raise ValidationError(problems)
    if out:
        check_output(out, "--out", folder=True)  # before the compute, not after it
    md = ModelDir.at(model or default_model_dir(), adapter)
    world = md.index.get("toy_world_data")
    if world is None:
        raise ValidationError([Problem("--model", md.root, "has no toy_world_data in model_index.json; "
                                       "mpp eval scores toy-world models only")])  # fmt: skip
    cfg = ToyWorldConfig.from_dict(world["config"])
    dims = ModelDims.from_model_dir(md, components=LOADS["compose"])  # md: its adapter's encoders count
    preflight(Request("eval", cfg.size, cfg.size, refs=cfg.max_refs), dims)
    pipe = ComposePipeline.from_model_dir(md)
    used = pipe.defaults.resolve(ref_guidance_scale=ref_guidance, noise_temperature=noise_temperature)  # reported
    guidance, temperature = used.ref_guidance_scale, used.noise_temperature
    with tempfile.TemporaryDirectory() as tmp:
        scenes = heldout_scenes(n, int(world["seed"]), cfg, Path(tmp), split=split, start=start)
        scores, images = evaluate(pipe, scenes, chosen, steps=steps, leak_scenes=leak_scenes, ref_guidance=guidance,
                                  heldout_combos=cfg.heldout_combos, seeds=seeds,
                                  noise_temperature=temperature, first_seed=first_seed)  # fmt: skip
    rows = [scores[v].row() for v in chosen]
    table = format_table(rows)
    counts = (  # the same refs are judged in every variant (and once per seed)
        f"fg refs judged for identity: {rows[0]['fg refs (seen pairs)'] // seeds} with a (shape, colour) pair seen "
        f"in training, {rows[0]['fg refs (unseen pairs)'] // seeds} with a held-out pair"
    )
    lines = [
        f"{split} split of the model's toy world ({cfg.size} px, {cfg.min_refs}-{cfg.max_refs} refs), scenes "
        f"{start}-{start + n - 1}, {steps} steps, ref guidance {guidance:g}, "
        f"noise temperature {temperature:g}, model {md.root}" + (f", adapter {md.adapter.root}" if adapter else ""),
        table,
        counts,
    ]
    if seeds > 1 or first_seed:
        per_seed = rows[0]["fg identity per seed"]
        lines.append(
            f"{seeds} seeds per scene ({first_seed}-{first_seed + seeds - 1}; the table pools them: refs counts each "
            f"ref once per seed); {rows[0]['model']} fg identity per seed: "
            + " ".join(f"{x:.3f}" for x in per_seed)
            + (f" (sd {np.std(per_seed, ddof=1):.3f})" if seeds > 1 else "")
        )
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic("\n\n".join([table, *lines[2:]]) + "\n", folder / "eval.md")
        report = {
            "split": split,
            "start": start,
            "n": n,
            "seeds": seeds,
            "first_seed": first_seed,
            "steps": steps,
            "ref_guidance": guidance,
            "noise_temperature": temperature,
            "model": str(md.root),
            "adapter": str(md.adapter.root) if adapter else None,
            "rows": rows,
        }
        write_text_atomic(json.dumps(report, indent=2), folder / "eval.json")
        write_text_atomic(samples_csv([scores[v] for v in chosen]), folder / "samples.csv")
        lines.append(f"wrote {save_png(eval_grid(scenes, images), folder / 'grid.png')}")
    return lines
