"""`mpp eval-fill` (`mpp eval --task fill`): a fill model dir on held-out toy-world triptychs (docs/fill.md,
"Measuring a fill model"), through the real `FillPipeline`, scored by toyworld/fill_eval_metrics.py.

Held-out draw: triptych i is `make_triptych(i, seed, cfg, split="heldout")`, whose scene and hole come from the
streams SeedSequence([seed, 1, i]) and ([seed, 1, i, 4]); `FillTask.batches` draws only `split="train"` (stream id
0), so no held-out triptych is a training one, whatever the training's data seed and scene count. (FillTask's
preview samples use held-out triptychs 0 and 1; they are pictures, never a gradient.) As every held-out toy split,
half of the scenes have a (shape, colour) pair training never shows as their front sprite (`heldout_combos`).

Variants, one table row each (the same triptychs, prompts and noise seeds):
- `model`: the fill dir as it is, with the semantic map;
- `no-map`: the same pipeline without the map;
- `zeroed`: with the map, through a copy of its SemanticCrossAttention whose gate is zero: the residual is then
  exactly zero, so this row equals `no-map` bit for bit (pinned by a test): the map reaches the fill only through
  that attention;
- `untrained`: the same architecture at init: the dir's transformer/ (the frozen base) with its LoRA spec added at
  init (B = 0) and a SemanticCrossAttention of its config at init (gate 0), no trained x_embedder;
- `targets`: the target images themselves, the ceiling of every score.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.compose_eval import MAX_EVAL_SCENES, MAX_EVAL_SEEDS, SEED_STRIDE
from moviepostproduction.toyworld.eval_report import choice_problems, markdown_table, write_eval_files
from moviepostproduction.toyworld.fill_eval_metrics import FillScore, score_fill
from moviepostproduction.toyworld.synthetic import COLOURS, ToyScene, ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.triptych import MASK_MODES, Triptych, TriptychConfig, make_triptych

__all__ = [
    "FILL_VARIANTS",
    "FillItem",
    "Variant",
    "build_variants",
    "evaluate_fill",
    "fill_grid",
    "fill_table",
    "heldout_triptychs",
    "run_fill_eval",
    "untrained_pipeline",
    "zeroed_pipeline",
]

FILL_VARIANTS = ("model", "no-map", "zeroed", "untrained", "targets")
HELDOUT_SEED = 0  # the toy-world seed of the held-out draw (FillTaskConfig.data_seed's default)
EVAL_WORLD = {"size": 128, "max_refs": 3}  # the default toy world: examples/train/toy-fill.yaml's triptychs
GRID_TRIPTYCHS = 3  # grid.png: this many triptychs per variant
TABLE_COLUMNS = ("model", "class acc", "class acc (sprites)", "class acc (box)", "class acc (extend)",
                 "background acc", "boundary error", "known-region error", "samples")  # fmt: skip


@dataclass
class FillItem:
    """One held-out triptych and the scene it cuts (its sprites' colours and shapes read the fill)."""

    index: int
    triptych: Triptych
    scene: ToyScene

    def unseen_pair(self, cfg: TriptychConfig) -> bool:
        """Whether a sprite the hole covers has a (shape, colour) pair training never shows."""
        held = {tuple(c) for c in cfg.world.heldout_combos}
        mask = self.triptych.mask
        return any((r.shape, r.colour) in held for r in self.scene.refs if (r.visible_mask & mask).any())


def heldout_triptychs(n: int, cfg: TriptychConfig, *, seed: int = HELDOUT_SEED, start: int = 0) -> list[FillItem]:
    """Held-out triptychs start .. start + n - 1 of `seed` (module docstring)."""
    return [
        FillItem(i, make_triptych(i, seed, cfg, split="heldout"), generate_scene(i, seed, cfg.world, split="heldout"))
        for i in range(start, start + n)
    ]


@dataclass
class Variant:
    name: str
    pipe: object | None  # a FillPipeline; None: the targets themselves
    use_map: bool


def _fill_config(md):
    """The dir's fill/config.json (already checked by FillPipeline.from_model_dir), or the plain FLUX-Fill one."""
    from moviepostproduction.fill.weights import FILL_FOLDER, FillWeightsConfig
    from moviepostproduction.model_dir import read_json

    path = md.root / FILL_FOLDER / "config.json"
    return FillWeightsConfig.from_dict(read_json(path, "the fill config", md.root)) if path.is_file() else None


def _sibling(pipe, model, layout: str | None = None, label: str | None = None):
    """A FillPipeline on `model` sharing `pipe`'s VAE, text encoder and sampling defaults."""
    from moviepostproduction.fill.pipeline import FillPipeline

    return FillPipeline(
        model,
        pipe.vae,
        pipe.text_encoder,
        layout=layout or pipe.layout,
        label=pipe.label if label is None else label,
        defaults=pipe.defaults,
    )


def zeroed_pipeline(pipe):
    """`pipe` with a copy of its SemanticCrossAttention whose gate is zero (the pipe itself is left as it is)."""
    from moviepostproduction.fill.model import FillFlux

    semantic = copy.deepcopy(pipe.model.semantic)
    with torch.no_grad():
        semantic.gate.zero_()
    return _sibling(pipe, FillFlux(pipe.model.transformer, semantic))


def untrained_pipeline(md, pipe, seed: int = 0):
    """The dir's architecture at init: transformer/ + its LoRA spec at init + its SemanticCrossAttention at init."""
    from moviepostproduction.encoders import load_transformer
    from moviepostproduction.fill.model import FillFlux
    from moviepostproduction.fill.semantic_attention import SemanticCrossAttention

    cfg = _fill_config(md)
    transformer = load_transformer(md, dtype=pipe.dtype, device=str(pipe.device))
    semantic = None
    with torch.random.fork_rng(devices=[]):  # LoRA A and the attention draw from the global generator
        torch.manual_seed(seed)
        if cfg is not None and cfg.lora is not None:
            transformer.add_adapter(cfg.lora.config())  # peft: B = 0, so the LoRA adds nothing
            transformer.requires_grad_(False)
        if cfg is not None and cfg.semantic is not None:
            semantic = SemanticCrossAttention(cfg.semantic).to(pipe.device, pipe.dtype)
    layout = cfg.layout if cfg is not None else "single"
    return _sibling(pipe, FillFlux(transformer, semantic), layout, label=f"{pipe.label} (at init)")


def build_variants(model_dir, names: list[str], *, device: str = "cpu") -> list[Variant]:
    """The pipelines of the requested variants, the fill dir loaded once (nothing loads for `targets` alone)."""
    from moviepostproduction.fill.pipeline import FillPipeline
    from moviepostproduction.model_dir import as_model_dir

    generated = [v for v in names if v != "targets"]
    if not generated:
        return [Variant("targets", None, False)]
    md = as_model_dir(model_dir)
    pipe = FillPipeline.from_model_dir(md, semantic=bool({"model", "zeroed"} & set(generated)), device=device)
    out = []
    for name in names:
        if name == "model":
            out.append(Variant(name, pipe, True))
        elif name == "no-map":
            out.append(Variant(name, pipe, False))
        elif name == "zeroed":
            out.append(Variant(name, zeroed_pipeline(pipe), True))
        elif name == "untrained":
            fresh = untrained_pipeline(md, pipe)
            out.append(Variant(name, fresh, fresh.model.semantic is not None))
        else:
            out.append(Variant(name, None, False))
    return out


def generate(variant: Variant, item: FillItem, *, steps: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: the variant's fill of the item's hole (the target for `targets`)."""
    tri = item.triptych
    if variant.pipe is None:
        return tri.target
    out = variant.pipe(
        tri.target,
        tri.mask,
        semantic=tri.semantic if variant.use_map else None,
        prompt=tri.caption,
        num_inference_steps=steps,
        seed=seed,
    )
    return np.asarray(out.images[0])


def evaluate_fill(
    variants: list[Variant], items: list[FillItem], cfg: TriptychConfig, *, steps: int, seeds: int = 1, progress=True
) -> tuple[dict[str, FillScore], dict[str, list[np.ndarray]]]:
    """Scores per variant and its fills of each item's first seed (variant -> list of (H, W, 3) uint8). Seed j of
    triptych i draws the noise of seed i + SEED_STRIDE j, for every variant alike."""
    from tqdm import tqdm

    scores, images = {}, {}
    for variant in variants:
        score, fills = FillScore(variant.name), []
        for item in tqdm(items, desc=f"eval-fill {variant.name}", disable=not progress):
            tri = item.triptych
            for j in range(seeds if variant.pipe is not None else 1):  # the targets do not depend on the seed
                image = generate(variant, item, steps=steps, seed=item.index + SEED_STRIDE * j)
                record = {"triptych": item.index, "seed": j, "mode": tri.mode, "unseen pair": item.unseen_pair(cfg)}
                score.samples.append({**record, **score_fill(image, tri.target, tri.semantic, tri.mask, item.scene)})
                if j == 0:
                    fills.append(image)
        scores[variant.name], images[variant.name] = score, fills
    return scores, images


def fill_grid(items: list[FillItem], images: dict[str, list[np.ndarray]], per_variant: int = GRID_TRIPTYCHS):
    """Rows of [plate with hole | fill | target | map], `per_variant` triptychs per variant, variants in order."""
    from moviepostproduction.visualize import image_grid

    tiles = []
    for fills in images.values():
        for item, fill in zip(items[:per_variant], fills, strict=False):
            tri = item.triptych
            tiles += [Image.fromarray(a) for a in (tri.visible, fill, tri.target, tri.semantic)]
    grid = image_grid(tiles, columns=4)
    return grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST)  # 64 px tiles: doubled to be seen


def fill_table(rows: list[dict]) -> str:
    """Markdown table, one row per variant (TABLE_COLUMNS); a score with nothing to judge shows as '-'."""
    return markdown_table(rows, TABLE_COLUMNS)


def parse_choices(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """Comma separated names, each one of `allowed`, none twice; one-line errors naming the flag."""
    chosen, problems = choice_problems(flag, text, allowed)
    if len(set(chosen)) != len(chosen):
        problems.append(Problem(flag, text, "names a choice twice"))
    if problems:
        raise ValidationError(problems)
    return chosen


def run_fill_eval(
    *,
    model: str | None,
    n: int,
    steps: int = 28,
    seeds: int = 1,
    variants: str | None = None,
    out: str | None = None,
    modes: str | None = None,
    size: int = EVAL_WORLD["size"],
    max_refs: int = EVAL_WORLD["max_refs"],
    start: int = 0,
    progress: bool = True,
    device: str = "cpu",
    refs: bool = False,
) -> list[str]:
    """What `mpp eval-fill` does; returns the lines to print (header, markdown table, files written). `size`,
    `max_refs`: the toy world of the triptychs, which should be the one the model trained on (`fill.triptych.world`
    of its recipe; the defaults are examples/train/toy-fill.yaml's). `variants`, `modes`: None for all. `refs`:
    reference insertion instead (`mpp eval-fill --refs`, toyworld/fill_refs_eval.py; its own variants, no modes)."""
    from moviepostproduction.files import check_output
    from moviepostproduction.sampling import require_valid, steps_problem
    from moviepostproduction.toyworld.fill_refs_eval import REFS_VARIANTS, run_refs_eval
    from moviepostproduction.toyworld.toy_model import default_fill_model_dir

    counts = (("--n", n, 1, MAX_EVAL_SCENES), ("--seeds", seeds, 1, MAX_EVAL_SEEDS),
              ("--start", start, 0, MAX_EVAL_SCENES * 100), ("--size", size, 32, 4096),
              ("--max-refs", max_refs, 1, len(COLOURS)))  # fmt: skip
    require_valid(
        steps_problem("--steps", steps),
        *(Problem(flag, v, f"must be an integer in [{lo}, {hi}]") for flag, v, lo, hi in counts if not lo <= v <= hi),
    )
    allowed = REFS_VARIANTS if refs else FILL_VARIANTS
    chosen = parse_choices("--variants", ",".join(allowed) if variants is None else variants, allowed)
    if refs and modes is not None:
        raise ValidationError([Problem("--modes", modes, "is not used with --refs (the mask is the ref's box)")])
    world = ToyWorldConfig(size=size, ref_size=max(16, size // 2), max_refs=max_refs)
    modes = ",".join(MASK_MODES) if modes is None else modes
    cfg = TriptychConfig(world=world, modes=tuple(parse_choices("--modes", modes, MASK_MODES)))
    if out:
        check_output(out, "--out", folder=True)  # before the compute, not after it
    md = model or (default_fill_model_dir() if set(chosen) - {"targets", "pasted"} else "")  # ceilings load nothing
    if refs:
        return run_refs_eval(md, chosen, world, n=n, steps=steps, seeds=seeds, untrained=untrained_pipeline,
                             seed=HELDOUT_SEED, start=start, out=out, progress=progress, device=device)  # fmt: skip
    built = build_variants(md, chosen, device=device)
    items = heldout_triptychs(n, cfg, start=start)
    scores, images = evaluate_fill(built, items, cfg, steps=steps, seeds=seeds, progress=progress)
    rows = [scores[v].row() for v in chosen]
    table = fill_table(rows)
    label = next((v.pipe.label for v in built if v.pipe is not None), "")
    header = (
        f"held-out triptychs {start}-{start + n - 1} (split heldout, toy-world seed {HELDOUT_SEED}, "
        f"{cfg.world.size} px, up to {cfg.world.max_refs} sprites, modes {','.join(cfg.modes)}), {steps} steps, "
        f"{seeds} seed(s) per triptych, "
        f"model {md or 'none (targets only)'}" + (f" [{label}]" if label else "")
    )
    lines = [header, table]
    if out:
        report = {"task": "fill", "split": "heldout", "seed": HELDOUT_SEED, "start": start, "n": n, "seeds": seeds,
                  "steps": steps, "modes": list(cfg.modes), "size": cfg.world.size, "max_refs": cfg.world.max_refs,
                  "model": str(md), "label": label, "rows": rows}  # fmt: skip
        lines.append(
            write_eval_files(out, header, table, report, [scores[v] for v in chosen], fill_grid(items, images))
        )
    return lines
