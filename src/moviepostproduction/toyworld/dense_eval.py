"""`mpp eval --refs-per-scene 1,2,4,8,16` (issue 44): how placement and identity hold as the ref count grows.

Per count, held-out scenes of the dense toy world (`ToyWorldConfig.dense`: one canvas for every count, exactly that
many refs, colours repeating) are sampled through the real `ComposePipeline` and scored as `mpp eval` scores:
IoU and centre error of every ref, found by its colour near its box (`locate_sprite_near`: colours repeat, so the
same colour elsewhere is another sprite), and fg identity (named colour and shape class of the crop at the box) of
the fg refs the layout leaves >= 90 % visible. The collapse rate is the share of those fg refs whose crop the
model's own frozen DINO no longer matches to the reference: cosine(DINO CLS of ref, of crop) below a threshold that
is fit, every run, on target images of the train split (`collapse_threshold`: right vs wrong sprites). Every count
is also scored on its target images ("targets" rows): the ceiling of each metric in those scenes.
Scene i of every count comes from the same seed stream, so counts share backgrounds and first sprites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.metrics import bbox_iou, box_crop, centre_error, locate_sprite_near
from moviepostproduction.toyworld.sprite_match import classify_sprite, parts_match
from moviepostproduction.toyworld.synthetic import ToyScene, ToyWorldConfig, generate_scene
from moviepostproduction.toyworld.world_config import MAX_DENSE_REFS

DEFAULT_COUNTS = "1,2,4,8,16"
MIN_VISIBLE_FOR_IDENTITY = 0.9  # as compose_eval: a fg sprite the layout hides in part cannot be judged by shape
CALIBRATION_COUNTS = (1, 2, 4, 8)  # train-split scenes per count that the collapse threshold is fit on
CALIBRATION_SCENES = 60


def parse_counts(text: str) -> list[int]:
    """ "1,2,4,8,16" -> [1, 2, 4, 8, 16]; one line naming --refs-per-scene otherwise."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    counts = [int(p) for p in parts if p.isdigit()]
    if not parts or len(counts) != len(parts) or not all(1 <= c <= MAX_DENSE_REFS for c in counts):
        expected = f"expected comma-separated counts in [1, {MAX_DENSE_REFS}], e.g. 1,2,4,8"
        raise ValidationError([Problem("--refs-per-scene", text, expected)])
    return sorted(set(counts))


def dense_world(world: ToyWorldConfig, count: int, size: int) -> ToyWorldConfig:
    """The dense world at `size` px with exactly `count` refs, keeping the model's ref size and held-out pairs."""
    return ToyWorldConfig.dense(
        size=size, ref_size=world.ref_size, min_refs=count, max_refs=count, heldout_combos=world.heldout_combos
    )


@dataclass
class CountScore:
    name: str  # "model" or "targets"
    count: int
    iou: list[float] = field(default_factory=list)
    centre: list[float] = field(default_factory=list)
    identity: list[bool] = field(default_factory=list)  # per judged fg ref
    similarity: list[float] = field(default_factory=list)  # per judged fg ref: DINO cosine(ref, crop)
    collapsed: list[bool] = field(default_factory=list)  # per judged fg ref: similarity below the threshold
    samples: list[dict] = field(default_factory=list)  # one record per (scene, ref): the rows of samples.csv

    def row(self) -> dict[str, float | int | str]:
        def mean(xs) -> float:
            xs = [float(x) for x in xs if not math.isnan(x)]
            return float(np.mean(xs)) if xs else float("nan")

        return {"model": self.name, "refs per scene": self.count, "IoU": mean(self.iou),
                "centre error": mean(self.centre), "fg identity": mean(self.identity),
                "fg DINO similarity": mean(self.similarity), "collapse rate": mean(self.collapsed),
                "refs": len(self.iou), "fg refs judged": len(self.identity)}  # fmt: skip


@torch.no_grad()
def dino_similarity(encoder, refs: list[np.ndarray], crops: list[np.ndarray]) -> np.ndarray:
    """(N, N) cosine similarity of the DINO CLS of ref i and crop j (`encoder`: the pipeline's ImageEncoder)."""
    a = encoder.encode([Image.fromarray(r) for r in refs]).dino_cls.float()  # (N, D)
    b = encoder.encode([Image.fromarray(c) for c in crops]).dino_cls.float()  # (N, D)
    a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    return (a @ b.T).cpu().numpy()


def _judged(toy: ToyScene) -> list[int]:
    return [r for r, ref in enumerate(toy.refs) if ref.depth == "fg" and ref.visible >= MIN_VISIBLE_FOR_IDENTITY]


def collapse_threshold(encoder, world: ToyWorldConfig, seed: int, size: int) -> dict[str, float | int]:
    """The DINO similarity that best separates right from wrong sprites on target images of the train split.

    Right: a judged fg ref against the crop at its own box; wrong: every other ref of the set whose (shape, colour)
    differs, against that crop. Threshold = the one of highest balanced accuracy; also returned: the share of
    right crops below it (the collapse rate of a perfect image) and of wrong ones at or above it."""
    refs, crops, pairs = [], [], []
    for count in CALIBRATION_COUNTS:
        cfg = dense_world(world, count, size)
        for i in range(CALIBRATION_SCENES):
            toy = generate_scene(i, seed, cfg, split="train")
            for r in _judged(toy):
                ref = toy.refs[r]
                refs.append(ref.image)
                crops.append(box_crop(toy.image, ref.bbox))
                pairs.append((ref.shape, ref.colour))
    sim = dino_similarity(encoder, refs, crops)  # (N, N): ref i, crop j
    same = np.asarray([[p == q for q in pairs] for p in pairs])
    right, wrong = np.diag(sim), sim[~same]
    candidates = np.unique(np.concatenate([right, wrong]))
    balanced = [(np.mean(right >= t) + np.mean(wrong < t)) / 2 for t in candidates]
    t = float(candidates[int(np.argmax(balanced))])
    return {"threshold": round(t, 4), "balanced accuracy": float(max(balanced)),
            "right below": float(np.mean(right < t)), "wrong at or above": float(np.mean(wrong >= t)),
            "right": int(right.size), "wrong": int(wrong.size)}  # fmt: skip


def score_dense(score: CountScore, image: np.ndarray, toy: ToyScene, encoder, threshold: float) -> None:
    """Append the scores of one image (generated or the target) of the dense scene `toy`."""
    records = []
    for r, ref in enumerate(toy.refs):
        found = locate_sprite_near(image, ref.image, ref.bbox)
        score.iou.append(float(bbox_iou(found, ref.bbox)) if found is not None else 0.0)
        score.centre.append(float(centre_error(found, ref.bbox)) if found is not None else float("nan"))
        records.append({"refs per scene": score.count, "scene": toy.index, "ref": r, "depth": ref.depth,
                        "shape": ref.shape, "colour": ref.colour, "visible": round(ref.visible, 4),
                        "IoU": round(score.iou[-1], 4), "centre error": round(score.centre[-1], 4), "judged": False,
                        "read colour": "", "read shape": "", "identity": "", "DINO similarity": ""})  # fmt: skip
    judged = _judged(toy)
    crops = [box_crop(image, toy.refs[r].bbox) for r in judged]
    sims = np.diag(dino_similarity(encoder, [toy.refs[r].image for r in judged], crops)) if judged else []
    for r, crop, sim in zip(judged, crops, sims, strict=True):
        reading = classify_sprite(crop)
        same = all(parts_match(classify_sprite(toy.refs[r].image), reading))
        score.identity.append(same)
        score.similarity.append(float(sim))
        score.collapsed.append(bool(sim < threshold))
        records[r].update({"judged": True, "read colour": reading[0] or "", "read shape": reading[1] or "",
                           "identity": same, "DINO similarity": round(float(sim), 4)})  # fmt: skip
    score.samples.extend(records)


def dense_scenes(world: ToyWorldConfig, count: int, size: int, seed: int, n: int, start: int, folder: Path):
    """Held-out dense scenes start .. start + n - 1 with `count` refs, as (ToyScene, Scene) pairs."""
    from moviepostproduction.toyworld.compose_eval import heldout_scenes

    return heldout_scenes(n, seed, dense_world(world, count, size), folder / f"refs-{count:02d}", start=start)


def evaluate_counts(pipe, scenes_by_count: dict, *, steps: int, threshold: float, guidance, temperature, progress=True):
    """{count: (model CountScore, targets CountScore, first generated image)} over each count's scenes."""
    from tqdm import tqdm

    out = {}
    for count, scenes in scenes_by_count.items():
        model, targets, first = CountScore("model", count), CountScore("targets", count), None
        for toy, scene in tqdm(scenes, desc=f"eval {count} refs", disable=not progress):
            image = pipe(scene, num_inference_steps=steps, ref_guidance_scale=guidance,
                         noise_temperature=temperature, seed=scene.seed or 0).images[0]  # fmt: skip
            image = np.asarray(image)
            first = image if first is None else first
            score_dense(model, image, toy, pipe.image_encoder, threshold)
            score_dense(targets, toy.image, toy, pipe.image_encoder, threshold)
        out[count] = (model, targets, first)
    return out
