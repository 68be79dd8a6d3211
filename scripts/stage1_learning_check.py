"""Does stage 1 learn? (issue 42 item 7; docs/training.md, "Does stage 1 learn? (measured)").

The whole real-data path on the shipped toy model, measured: toy-world scenes written as a user's photos with COCO
instance annotations (an RLE mask per ref from the world's per-pixel labels, the ref's caption on the annotation)
and a captions file -> `mpp prepare-data --from-coco` -> `mpp train` stage 1 from a fresh adapter (`init_adapter`
with the toy model's own CLIP / DINO folders) on the toy model's FLUX-architecture backbone (frozen + LoRA) ->
`mpp eval --adapter` on held-out toy scenes for the fresh adapter and for the stage-1 export.

    python scripts/stage1_learning_check.py data  --scenes 2000           # photos + COCO -> OUT/data
    python scripts/stage1_learning_check.py train --steps 20              # builds the cache, times the steps
    python scripts/stage1_learning_check.py train --steps 1500            # resumes the same run (no cooldown)
    python scripts/stage1_learning_check.py eval  --n 100                 # fresh vs stage 1 -> eval/stage1-learning/
    python scripts/stage1_learning_check.py report                        # the table, curves.png, grid.png

Every `mpp` command runs as a subprocess on one thread (OMP_NUM_THREADS=1) and is printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from moviepostproduction.model_dir import ModelDir, default_model_dir
from moviepostproduction.toyworld.sprites import SHAPES
from moviepostproduction.toyworld.synthetic import ToyWorldConfig, generate_scene

ROOT = Path(__file__).resolve().parents[1]
EVAL_DIR = ROOT / "eval" / "stage1-learning"
DATA_SEED = 1  # the toy model's backbone was trained on seed 0's train scenes: these are new ones
EVAL_SETTINGS = ["--ref-guidance", "2", "--noise-temperature", "0.8"]  # the shipped toy model's defaults, for both


def mpp(*args: str) -> float:
    """Run `mpp ARGS` on one thread; returns its wall time in seconds (a failure stops the script)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "moviepostproduction.cli", *args]
    print("$ mpp " + shlex.join(args), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    return time.perf_counter() - start


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE of an (H, W) bool mask: run lengths in column-major order, starting with a 0s run."""
    flat = mask.T.ravel()
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return [0, *runs] if flat[0] else runs


def write_toy_coco(root: Path, n: int, cfg: ToyWorldConfig, seed: int = DATA_SEED) -> tuple[Path, Path, Path]:
    """Train scenes 0 .. n-1 of the toy world's `seed` as ROOT/images/scene-I.png, their refs as COCO instances
    (ROOT/instances.json: the ref's whole-sprite box, its visible pixels as an RLE mask, its shape as the category and
    its own caption, "a red striped star", on the annotation) and the scene captions (ROOT/captions.json)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, captions = [], [], []
    for i in range(n):
        toy = generate_scene(i, seed, cfg, split="train")
        height, width = toy.labels.shape
        name = f"scene-{i:05d}.png"
        Image.fromarray(toy.image).save(root / "images" / name)
        images.append({"id": i, "file_name": name, "width": width, "height": height})
        captions.append({"id": i, "image_id": i, "caption": toy.caption})
        for j, ref in enumerate(toy.refs):
            visible = toy.labels == j + 1  # (H, W) the ref's pixels not hidden by nearer sprites
            x0, y0, x1, y1 = ref.bbox
            box = [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "iscrowd": 0, "bbox": box,
                                "category_id": SHAPES.index(ref.shape) + 1, "caption": ref.caption,
                                "area": int(visible.sum()),
                                "segmentation": {"size": [height, width], "counts": rle_counts(visible)}})  # fmt: skip
    categories = [{"id": k, "name": shape} for k, shape in enumerate(SHAPES, 1)]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                     "categories": categories}))  # fmt: skip
    (root / "captions.json").write_text(json.dumps({"annotations": captions}))
    return root / "instances.json", root / "images", root / "captions.json"


def toy_world() -> ToyWorldConfig:
    """The world the shipped toy model was trained on (its model_index.json)."""
    md = ModelDir.at(default_model_dir())
    return ToyWorldConfig.from_dict(md.index["toy_world_data"]["config"])


def recipe(out: Path, steps: int) -> dict:
    """Stage 1 from a fresh adapter on the shipped toy model, with the stage's own settings (LR 1e-4, batch 16,
    LoRA rank 16, bbox and region losses); only the sampling defaults of the export follow the toy model."""
    md = ModelDir.at(default_model_dir())
    return {
        "task": "compose",
        "model": str(md.root),
        "data": str(out / "data"),
        "out": str(out / "run"),
        "stage": "1",
        "adapter_dir": str(out / "fresh"),
        "init_adapter": {"clip": str(md.image_clip), "dino": str(md.image_dino)},
        "export": str(out / "stage1"),
        "export_dtype": "fp32",
        "max_refs": toy_world().max_refs,
        "max_text_tokens": 64,
        "ref_guidance": 2.0,
        "noise_temperature": 0.8,
        "trainer": {
            "max_steps": steps,
            "seed": 0,
            "log_every": 1,
            "checkpoint_every": 50,
            "sample_every": 0,
            "tensorboard": False,
            "progress": False,
        },
        "compose": {},
    }


def cmd_data(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    instances, images, captions = write_toy_coco(args.out / "photos", args.scenes, toy_world())
    print(f"wrote {args.scenes} photos + COCO in {time.perf_counter() - start:.1f} s", flush=True)
    options = ["--max-refs", str(toy_world().max_refs), "--heldout-frac", "0.01", "--lossless"]
    source = ["--from-coco", str(instances), "--images", str(images), "--captions", str(captions)]
    mpp("prepare-data", *source, "--out", str(args.out / "data"), *options)


def cmd_train(args: argparse.Namespace) -> None:
    path = args.out / "stage1.yaml"
    path.write_text(yaml.safe_dump(recipe(args.out, args.steps), sort_keys=False))
    before = trained_steps(args.out)
    wall = mpp("train", str(path))
    done = trained_steps(args.out) - before
    print(f"{done} steps (from step {before}) in {wall:.1f} s wall, loading and caching included", flush=True)


def trained_steps(out: Path) -> int:
    states = sorted((out / "run" / "checkpoints").glob("step-*/state.json"))
    return json.loads(states[-1].read_text())["step"] if states else 0


def cmd_eval(args: argparse.Namespace) -> None:
    for name in ("fresh", "stage1"):
        target = EVAL_DIR / name
        if target.exists():
            shutil.rmtree(target)
        common = ["--n", str(args.n), "--steps", str(args.steps), "--variants", "model", "--seeds", "1"]
        wall = mpp("eval", "--adapter", str(args.out / name), *common, *EVAL_SETTINGS, "--out", str(target))
        print(f"eval {name}: {wall:.0f} s wall", flush=True)


def loss_means(out: Path) -> dict[str, tuple[float, float]]:
    """Per loss part (and the total): the mean of the first and of the last 10 % of the steps that logged it."""
    (state,) = sorted((out / "run" / "checkpoints").glob("step-*/state.json"))[-1:]
    data = json.loads(state.read_text())
    series = {"loss": data["losses"]}
    for entry in data["logs"]:
        for key, value in entry.items():
            if key not in ("step", "loss", "lr", "grad_norm"):
                series.setdefault(key, []).append(value)
    tenth = {k: max(1, len(v) // 10) for k, v in series.items()}
    return {k: (float(np.mean(v[: tenth[k]])), float(np.mean(v[-tenth[k] :]))) for k, v in series.items()}


def smoothed_curves(out: Path, window: int = 50) -> Image.Image:
    """The total loss and each logged part as a running mean over `window` steps (the raw curves.png is per step)."""
    from moviepostproduction.visualize import plot_curves

    (state,) = sorted((out / "run" / "checkpoints").glob("step-*/state.json"))[-1:]
    logs = json.loads(state.read_text())["logs"]
    series = {}
    for key in ("loss", "flow", "bbox"):
        points = [(e["step"], e[key]) for e in logs if key in e]
        values = np.convolve([v for _, v in points], np.ones(window) / window, mode="valid")
        series[f"{key} (mean of {window})"] = [(points[i + window - 1][0], float(v)) for i, v in enumerate(values)]
    return plot_curves(series, title=f"stage 1 from a fresh adapter on the toy backbone, {len(logs)} steps")


def alpha_after(out: Path) -> tuple[float, float]:
    """The stage-1 adapter's alpha over the refs of the first cached training shard: (mean, share >= 0.5, the
    foreground refs that stage 3's feedback bridge and the modulation pathway act on)."""
    import torch
    from safetensors.torch import load_file

    from moviepostproduction.compose.modules import CompositionAdapter

    cache = load_file(str(sorted((out / "run" / "cache" / "train").glob("shard-*.safetensors"))[0]))
    boxes = cache["bboxes"].float()  # (refs, 4)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    adapter = CompositionAdapter.from_pretrained(out / "stage1")
    with torch.no_grad():
        alpha = adapter.alpha_predictor(cache["clip"].float()[None], area[None], cache["depth"][None])[0]
    return float(alpha.mean()), float((alpha >= 0.5).float().mean())


def cmd_report(args: argparse.Namespace) -> None:
    EVAL_DIR.mkdir(parents=True, exist_ok=True)
    losses = loss_means(args.out)
    rows = {name: json.loads((EVAL_DIR / name / "eval.json").read_text())["rows"][0] for name in ("fresh", "stage1")}
    alpha_mean, alpha_fg = alpha_after(args.out)
    steps = trained_steps(args.out)
    lines = [f"stage 1, {steps} steps: loss mean over the first / last 10 % of the steps",
             "", "| loss | first 10 % | last 10 % | change |", "|---|---|---|---|"]  # fmt: skip
    for key, (first, last) in losses.items():
        change = f"{100 * (last / first - 1):+.1f} %" if first > 1e-6 else "-"
        lines.append(f"| {key} | {first:.4g} | {last:.4g} | {change} |")
    cols = ("IoU", "centre error", "fg identity", "leakage", "refs")
    lines += ["", "| adapter | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in rows.items():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"stage-1 alpha over the first cached shard's refs: mean {alpha_mean:.3f}, >= 0.5: {alpha_fg:.1%}"]
    summary = {"steps": steps, "losses": losses, "eval": rows, "alpha_mean": alpha_mean, "alpha_fg_share": alpha_fg}
    (EVAL_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (EVAL_DIR / "summary.md").write_text("\n".join(lines) + "\n")
    shutil.copy(args.out / "run" / "curves.png", EVAL_DIR / "curves.png")
    smoothed_curves(args.out).save(EVAL_DIR / "curves-smoothed.png")
    grids = [Image.open(EVAL_DIR / name / "grid.png").convert("RGB") for name in ("fresh", "stage1")]
    both = Image.new("RGB", (sum(g.width for g in grids) + 8, max(g.height for g in grids)), (255, 255, 255))
    both.paste(grids[0], (0, 0))
    both.paste(grids[1], (grids[0].width + 8, 0))  # target | fresh adapter || target | stage 1
    both.save(EVAL_DIR / "grid-fresh-vs-stage1.png")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("data", "train", "eval", "report"))
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "stage1-learning")
    parser.add_argument("--scenes", type=int, default=2000, help="data: toy scenes written as photos")
    parser.add_argument("--steps", type=int, default=None, help="train: total optimiser steps; eval: sampling steps")
    parser.add_argument("--n", type=int, default=100, help="eval: held-out scenes")
    args = parser.parse_args()
    if args.phase == "train" and args.steps is None:
        parser.error("train needs --steps (the run's total; a larger value resumes it)")
    if args.phase == "eval":
        args.steps = args.steps or 28
    {"data": cmd_data, "train": cmd_train, "eval": cmd_eval, "report": cmd_report}[args.phase](args)


if __name__ == "__main__":
    main()
