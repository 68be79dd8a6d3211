"""`mpp eval-vary` (`mpp eval --task vary`): NanoDiT variations of held-out toy-world references, measured (issue 43).

Held-out draw: the fg sprite (refs[0]) of scenes `start` .. `start + n - 1` (default 1000 ..) of the toy world's
`heldout` split, seed 0, at NanoDiT's output size (64 px for the toy presets). NanoDiT training draws only the
`train` split (training/vary_data.py); its preview and validation use `heldout` scenes 0 .. 31, so from index 1000 on
no scene was ever seen, not even in a sample grid. The held-out split also gives half of its first refs a (shape,
colour) pair that training never shows (`ToyWorldConfig.heldout_combos`): identity is split by seen / unseen pair.

The image input is the ref (`--input sprite`: the sprite alone on white, what `mpp vary --ref` gets) or the scene
itself (`--input scene`: the other half of NanoDiT's training inputs); the caption is the sprite's phrase ("a red
striped star", what a user types), the scene's caption or none. Per variation (toyworld/vary_metrics.py):
- shape kept / colour kept: the image's dominant named sprite colour is the ref's; the largest region of the ref's
  colour reads as the ref's shape class (sprite_match rules), both against the toy world's labels;
- DINO sim: cosine of the model dir's frozen DINO CLS of the variation and of the input image;
- diversity: mean over the pairs of a ref's S variations of 1 - DINO CLS cosine (and RMS pixel distance);
- layout IoU: the box of that colour region against the sprite's box in the input image. DINO patch tokens keep
  where things are in the image; the CLS is one pooled vector, so this is what patches can add over CLS only.
Variants at the default scales: `model` (text + CLS + patches, dual CFG), `no-patches` (the patches replaced by the
learned `patch_null`, exactly what CFG dropout feeds for a dropped image, the CLS kept), `image-only` (CLS +
patches, no text: image guidance), `cls-only` (no patches, no text), `text-only` (image dropped), and the ceilings
`references` (the input images read by the same rules), `scenes` (the held-out scene each ref came from) and
`vae-roundtrip` (those scenes through the model dir's VAE, encode and decode: what a NanoDiT that drew the scene's own
latent would score, the ceiling of the latent space). The sweep runs `model` over text scale x image scale. Seed j
of the ref from scene i draws the noise of seed i + SEED_STRIDE * j, the same in every variant and cell, so rows
differ only by the conditioning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.eval_report import choice_problems
from moviepostproduction.toyworld.metrics import bbox_iou
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.vary_metrics import (
    cosine_similarity,
    feature_diversity,
    pixel_diversity,
    read_variation,
    sprite_box_on_white,
)

__all__ = [
    "CAPTIONS",
    "GENERATED",
    "INPUTS",
    "VARIANTS",
    "CellScore",
    "HeldoutRef",
    "check_request",
    "generate_cell",
    "heldout_refs",
    "run_vary_eval",
    "score_cell",
    "vae_round_trip",
    "variant_inputs",
]

GENERATED = ("model", "no-patches", "image-only", "cls-only", "text-only")  # sampled by NanoDiT
VARIANTS = (*GENERATED, "references", "scenes", "vae-roundtrip")  # + the ceilings: images read, nothing sampled
INPUTS = ("sprite", "scene")
CAPTIONS = ("sprite", "scene", "none")
WORLD_SEED = 0  # the seed of train_vary's default run; the held-out split never reaches training whatever the seed
HELDOUT_START = 1000  # past the 32 held-out scenes of the trainer's preview / validation
SEED_STRIDE = 100_003  # seed j of ref index i: the noise of seed i + SEED_STRIDE * j (as `mpp eval`)
USES = {  # variant -> (text, CLS, patches) given to the model; what it lacks is its learned null
    "model": (True, True, True),
    "no-patches": (True, True, False),
    "image-only": (False, True, True),
    "cls-only": (False, True, False),
    "text-only": (True, False, False),
}


@dataclass
class HeldoutRef:
    index: int  # scene index in the held-out split
    shape: str  # labels of the fg sprite
    colour: str
    unseen: bool  # its (shape, colour) pair is one training never shows
    caption: str | None  # the caption given (None: none)
    image: np.ndarray  # (H, W, 3) uint8: the image input (the ref on white, or the scene)
    box: tuple[float, float, float, float]  # the sprite's normalised xyxy box in `image`
    scene: np.ndarray  # (H, W, 3) uint8: the held-out scene the ref belongs to


def heldout_refs(n: int, size: int, *, start: int = HELDOUT_START, input: str = "sprite", caption: str = "sprite"):
    """The held-out refs `start` .. `start + n - 1` at scene side `size` (the ref images are that size too)."""
    world = ToyWorldConfig(size=size, ref_size=size)
    held = set(world.heldout_combos)
    out = []
    for i in range(start, start + n):
        scene = generate_scene(i, WORLD_SEED, world, split="heldout")
        fg = scene.refs[0]  # the front sprite, never occluded
        image, box = (fg.image, sprite_box_on_white(fg.image)) if input == "sprite" else (scene.image, fg.bbox)
        words = {"sprite": fg.caption, "scene": scene.caption, "none": None}[caption]
        out.append(HeldoutRef(i, fg.shape, fg.colour, (fg.shape, fg.colour) in held, words, image, box, scene.image))
    return out


def variant_inputs(variant: str, features: dict[str, torch.Tensor | None], model) -> dict[str, torch.Tensor | None]:
    """`VaryPipeline.__call__` inputs of a variant from the refs' full features (`VaryPipeline.encode`): a dropped
    text or image is None (the model's null), dropped patches alone are `model.patch_null` (P, G) in every row."""
    text, cls, patches = USES[variant]
    out = dict(features)
    if not text or out["text_embeds"] is None:
        out.update(text_embeds=None, text_mask=None)
    if not cls:
        out.update(image_cls=None, image_patches=None)
    elif not patches:
        null = model.patch_null.detach().to(out["image_patches"].dtype)
        out["image_patches"] = null.expand_as(out["image_patches"]).clone()  # (B, P, G)
    return out


@torch.no_grad()
def generate_cell(
    pipe,
    refs: list[HeldoutRef],
    features: dict[str, torch.Tensor | None],
    variant: str,
    text_scale: float,
    image_scale: float,
    *,
    seeds: int,
    steps: int,
    chunk: int = 16,
    progress=None,
) -> np.ndarray:
    """(N, S, H, W, 3) uint8: S variations of each ref under `variant` at (s_T, s_I); `chunk` refs per call."""
    from moviepostproduction.noise import seeded_generator

    inputs = variant_inputs(variant, features, pipe.model)
    parts = []
    for lo in range(0, len(refs), chunk):
        rows = torch.arange(lo, min(lo + chunk, len(refs))).repeat_interleave(seeds)  # ref-major: (k S,)
        batch = {k: (v[rows] if v is not None else None) for k, v in inputs.items()}
        gens = [seeded_generator(refs[int(r)].index, SEED_STRIDE * (k % seeds)) for k, r in enumerate(rows)]
        out = pipe(
            **batch,
            text_scale=text_scale,
            image_scale=image_scale,
            num_inference_steps=steps,
            generator=gens,
            output_type="pt",
        ).images  # (k S, 3, H, W) in [0, 1]
        pixels = (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        parts.append(pixels.reshape(-1, seeds, *pixels.shape[1:]))
        if progress is not None:
            progress(1)
    return np.concatenate(parts)


@dataclass
class CellScore:
    """One table row: a variant (or sweep cell) over every ref and seed; `samples` are the rows of samples.csv."""

    name: str
    text_scale: float | None  # None: the scale plays no part (no text / no image / not generated)
    image_scale: float | None
    shape: list[bool] = field(default_factory=list)
    colour: list[bool] = field(default_factory=list)
    unseen: list[bool] = field(default_factory=list)
    sim: list[float] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    diversity: list[float] = field(default_factory=list)  # per ref (S >= 2)
    pixel_diversity: list[float] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        def mean(xs) -> float:
            return float(np.mean(xs)) if len(xs) else math.nan

        both = [s and c for s, c in zip(self.shape, self.colour, strict=True)]
        split = {u: [b for b, x in zip(both, self.unseen, strict=True) if x == u] for u in (False, True)}
        return {"variant": self.name, "s_T": self.text_scale, "s_I": self.image_scale,
                "shape kept": mean(self.shape), "colour kept": mean(self.colour), "both kept": mean(both),
                "both kept (seen pairs)": mean(split[False]), "both kept (unseen pairs)": mean(split[True]),
                "DINO sim": mean(self.sim), "diversity": mean(self.diversity),
                "pixel diversity": mean(self.pixel_diversity), "layout IoU": mean(self.iou),
                "samples": len(self.shape)}  # fmt: skip


def dino_cls(image_encoder, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    """(M, G) float64 DINO CLS of (M, H, W, 3) uint8 images."""
    out = []
    for lo in range(0, len(images), chunk):
        pil = [Image.fromarray(a) for a in images[lo : lo + chunk]]
        out.append(image_encoder.encode(pil).dino_cls.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def score_cell(
    score: CellScore, refs: list[HeldoutRef], images: np.ndarray, cls: np.ndarray, input_cls: np.ndarray
) -> CellScore:
    """Append the readings of `images` (N, S, H, W, 3) uint8 with their DINO CLS `cls` (N, S, G) against each ref's
    labels, box and input CLS `input_cls` (N, G)."""
    sims = cosine_similarity(cls, input_cls[:, None])  # (N, S)
    for i, ref in enumerate(refs):
        for j, image in enumerate(images[i]):
            reading = read_variation(image, ref.colour)
            shape, colour = reading.kept(ref.shape, ref.colour)
            iou = float(bbox_iou(reading.box, ref.box)) if reading.box is not None else 0.0
            score.shape.append(shape)
            score.colour.append(colour)
            score.unseen.append(ref.unseen)
            score.sim.append(float(sims[i, j]))
            score.iou.append(iou)
            score.samples.append({"s_T": score.text_scale, "s_I": score.image_scale, "scene": ref.index, "seed": j,
                                  "shape": ref.shape, "colour": ref.colour, "pair unseen": ref.unseen,
                                  "read colour": reading.colour or "", "read shape": reading.shape or "",
                                  "shape kept": shape, "colour kept": colour, "DINO sim": round(float(sims[i, j]), 4),
                                  "layout IoU": round(iou, 4)})  # fmt: skip
        if len(images[i]) >= 2:
            score.diversity.append(feature_diversity(cls[i]))
            score.pixel_diversity.append(pixel_diversity(images[i]))
    return score


def check_request(
    variants: str, input: str, caption: str, text_scales: str, image_scales: str
) -> tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...]]:
    """The checked variant names and sweep scales of `mpp eval-vary`; every problem in one error naming its flag."""
    names, problems = choice_problems("--variants", variants, VARIANTS)
    chosen = tuple(names)
    if input not in INPUTS:
        problems.append(Problem("--input", input, f"expected one of {', '.join(INPUTS)}"))
    if caption not in CAPTIONS:
        problems.append(Problem("--caption", caption, f"expected one of {', '.join(CAPTIONS)}"))
    elif caption == "none" and "text-only" in chosen:
        problems.append(Problem("--variants", "text-only", "needs a caption (--caption sprite or scene)"))
    scales = []
    for flag, text in (("--text-scales", text_scales), ("--image-scales", image_scales)):
        try:
            values = tuple(float(x) for x in text.split(",") if x.strip())
        except ValueError:
            values = ()
        if not values or len(values) > 8 or not all(math.isfinite(v) for v in values):
            problems.append(Problem(flag, text, "expected 1 to 8 finite numbers, comma separated (e.g. 1,4,7)"))
        scales.append(tuple(dict.fromkeys(values)))  # repeats once
    if problems:
        raise ValidationError(problems)
    return chosen, scales[0], scales[1]


MAX_REFS = 10_000  # `--n`
MAX_SEEDS = 64  # `--seeds`


def vae_round_trip(model_dir, images: np.ndarray, *, device: str = "cpu") -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same through the model dir's VAE in fp32 (posterior mode, decoded, uint8)."""
    from diffusers import AutoencoderKL

    from moviepostproduction.encoders.frozen import load_frozen
    from moviepostproduction.toyworld.toy_vae import reconstruct_uint8

    vae = load_frozen(AutoencoderKL, model_dir, "vae", torch.float32).to(device)
    with torch.no_grad():
        out = reconstruct_uint8(vae, torch.from_numpy(images).permute(0, 3, 1, 2))  # (N, 3, H, W)
    return out.permute(0, 2, 3, 1).numpy()


def run_vary_eval(
    *,
    model: str | None,
    n: int,
    seeds: int,
    steps: int,
    variants: str = ",".join(VARIANTS),
    out: str | None = None,
    start: int = HELDOUT_START,
    input: str = "sprite",
    caption: str = "sprite",
    text_scale: float = 4.0,
    image_scale: float = 1.5,
    text_scales: str = "1,4,7",
    image_scales: str = "1,1.5,3",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[str]:
    """What `mpp eval-vary` does; returns the lines to print (header, the variant table, the sweep table, files)."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from moviepostproduction.files import check_output, write_text_atomic
    from moviepostproduction.model_dir import as_model_dir, default_model_dir
    from moviepostproduction.resources import LOADS, ModelDims, Request, preflight
    from moviepostproduction.sampling import finite_problem, require_valid, steps_problem
    from moviepostproduction.toyworld.eval_report import samples_csv
    from moviepostproduction.toyworld.vary_report import format_rows, sweep_grid, variant_grid
    from moviepostproduction.vary.pipeline import VaryPipeline
    from moviepostproduction.visualize import save_png

    chosen, t_scales, i_scales = check_request(variants, input, caption, text_scales, image_scales)
    counts = (("--n", n, 1, MAX_REFS), ("--seeds", seeds, 1, MAX_SEEDS), ("--start", start, 0, MAX_REFS * 100))
    require_valid(
        *(Problem(flag, v, f"must be an integer in [{lo}, {hi}]") for flag, v, lo, hi in counts if not lo <= v <= hi),
        steps_problem("--steps", steps),
        finite_problem("--text-scale", text_scale),
        finite_problem("--image-scale", image_scale),
    )
    if out:
        check_output(out, "--out", folder=True)  # before the compute, not after it
    md = as_model_dir(model or default_model_dir())
    dims = ModelDims.from_model_dir(md, dtype, components=LOADS["vary"], transformer="nanodit")
    preflight(
        Request("vary", dims.sample_pixels, dims.sample_pixels, batch=3 * min(n, 16) * seeds, device=device), dims
    )
    pipe = VaryPipeline.from_model_dir(md, dtype=dtype, device=device)
    size = pipe.model.config.sample_size * pipe.latent_factor
    refs = heldout_refs(n, size, start=start, input=input, caption=caption)
    captions = [r.caption for r in refs] if caption != "none" else None
    features = pipe.encode([Image.fromarray(r.image) for r in refs], captions)
    input_cls = features["image_cls"].double().cpu().numpy()  # (N, G)

    text = caption != "none"
    default = (float(text_scale), float(image_scale))
    jobs = [("model", s_t, s_i) for s_t in t_scales for s_i in i_scales] if "model" in chosen else []
    jobs += [(v, *default) for v in chosen if v in GENERATED and (v, *default) not in jobs]
    chunks = -(-len(refs) // 16)  # generate_cell's chunk: 16 refs (x S seeds x 3 guidance cases) per forward
    images: dict[tuple[str, float, float], np.ndarray] = {}
    with tqdm(total=len(jobs) * chunks, desc="eval-vary", unit="batch", disable=not progress) as bar:
        for variant, s_t, s_i in jobs:
            images[(variant, s_t, s_i)] = generate_cell(
                pipe, refs, features, variant, s_t, s_i, seeds=seeds, steps=steps, progress=bar.update
            )

    def scored(name: str, pictures: np.ndarray, s_t: float | None, s_i: float | None) -> CellScore:
        uses_text, uses_image = (USES[name][0] and text, USES[name][1]) if name in USES else (False, False)
        score = CellScore(name, s_t if uses_text else None, s_i if uses_image else None)
        cls = dino_cls(pipe.image_encoder, pictures.reshape(-1, *pictures.shape[2:]))
        return score_cell(score, refs, pictures, cls.reshape(*pictures.shape[:2], -1), input_cls)

    ceilings = {"references": np.stack([r.image for r in refs]), "scenes": np.stack([r.scene for r in refs])}
    if "vae-roundtrip" in chosen:
        ceilings["vae-roundtrip"] = vae_round_trip(md, ceilings["scenes"], device=device)
    scores = [
        scored(v, images[(v, *default)], *default) if v in GENERATED else scored(v, ceilings[v][:, None], None, None)
        for v in chosen
    ]
    swept = [(s_t, s_i) for s_t in t_scales for s_i in i_scales] if "model" in chosen else []
    sweep = [scored("model", images[("model", s_t, s_i)], s_t, s_i) for s_t, s_i in swept]
    for cell in sweep:
        cell.name = "sweep"  # samples.csv: the sweep's rows apart from the variant rows
    rows, sweep_rows = [s.row() for s in scores], [s.row() for s in sweep]
    for row in sweep_rows:
        row["variant"] = "model"
    label = f" [{pipe.label}]" if pipe.label else ""
    header = (
        f"held-out refs {start}-{start + n - 1} (toy world heldout split, seed {WORLD_SEED}, {size} px), input "
        f"{input}, caption {caption}, {seeds} seeds, {steps} steps, default scales s_T {text_scale:g} s_I "
        f"{image_scale:g}, model {md.root}{label}"
    )
    lines = [header, format_rows(rows)]
    if sweep_rows:
        lines += ["dual-CFG sweep of `model` (text scale s_T x image scale s_I):", format_rows(sweep_rows)]
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic("\n\n".join(lines) + "\n", folder / "eval.md")
        report = {"model": str(md.root), "label": pipe.label, "split": "heldout", "world_seed": WORLD_SEED,
                  "start": start, "n": n, "seeds": seeds, "steps": steps, "size": size, "input": input,
                  "caption": caption, "text_scale": text_scale, "image_scale": image_scale,
                  "text_scales": list(t_scales), "image_scales": list(i_scales), "rows": rows,
                  "sweep": sweep_rows}  # fmt: skip
        write_text_atomic(json.dumps(report, indent=2) + "\n", folder / "eval.json")
        write_text_atomic(samples_csv([*scores, *sweep]), folder / "samples.csv")
        shown = {v: images[(v, *default)] for v in chosen if v in GENERATED}
        written = [save_png(variant_grid(refs, shown), folder / "grid.png")] if shown else []
        if sweep:
            cells = {(s_t, s_i): images[("model", s_t, s_i)][0] for s_t in t_scales for s_i in i_scales}
            written.append(save_png(sweep_grid(refs[0], cells, t_scales, i_scales), folder / "sweep.png"))
        lines.append("wrote " + ", ".join(str(p) for p in [folder / "eval.md", folder / "eval.json",
                                                          folder / "samples.csv", *written]))  # fmt: skip
    return lines
