"""A compose recipe checked whole against the file system before the first step (`mpp train` runs this after the
field checks of recipe_checks.py and before any weights load): one Problem per line, nothing trained.

- `model` is a FLUX folder whose transformer, VAE, text encoders and tokenizers load (model_dir.ModelDir.check);
- `data` is a folder of `mpp prepare-data` shards with a readable manifest.json and a train split;
- the adapter: `adapter_dir` an adapter folder (mpp init-adapter, or a stage's export), or absent with
  `init_adapter: {clip: DIR, dino: DIR}` to create it there, or neither and MODEL/adapter (the toy model's combined
  layout); its image encoders load, and its config fits the model: width, double and single blocks, CLIP and DINOv2
  widths (compose/adapter_init.adapter_config: what init-adapter would size for this model);
- `export`: stages 1, 2 and 3 write an adapter folder (training/adapter_export.py), which may replace only an adapter
  folder; the full-backbone `toy` stage writes a model dir, which may not replace an adapter folder; either must be
  a folder name that can be created or written (files.check_output);
- free disk under `out` for the feature cache, when it is still to be built: `cache_bytes` below.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from moviepostproduction.errors import NOTHING, WITHHELD, MppError, Problem, ValidationError
from moviepostproduction.training.adapter_export import export_problem, is_adapter_folder
from moviepostproduction.training.stages import STAGES

FIT_KEYS = ("hidden_dim", "num_double_blocks", "num_single_blocks", "clip_dim", "dino_dim")
INIT_KEYS = {"clip": str, "dino": str, "copy_encoders": bool, "seed": int}
BASE_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
HELDOUT_CACHED = 8  # heldout samples the run caches for its sample grids (recipe.build_compose_task)
UNKNOWN_PIXELS = 1024 * 1024  # target size assumed when the manifest names none (FLUX's training resolution)
CACHE_SAFETY = 2  # a split's cache exists twice while it is written (worker files + the merged one, or tmp + final)


def exports_adapter(recipe) -> bool:
    """Stages that keep the FLUX backbone frozen or train a LoRA on it export an adapter folder."""
    return recipe.task == "compose" and STAGES[recipe.stage].backbone != "full"


def init_adapter_problems(value) -> list[Problem]:
    """`init_adapter:` must be a mapping with `clip` and `dino` folder paths (+ optional copy_encoders, seed)."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [Problem("init_adapter", value, "must be a mapping {clip: DIR, dino: DIR} or null")]
    problems = [
        Problem(f"init_adapter.{k}", NOTHING, "required (a folder path)") for k in ("clip", "dino") if k not in value
    ]
    for key, item in value.items():
        kind = INIT_KEYS.get(key)
        if kind is None:
            problems.append(Problem(f"init_adapter.{key}", WITHHELD, f"unknown key (known: {', '.join(INIT_KEYS)})"))
        elif not isinstance(item, kind) or isinstance(item, bool) != (kind is bool) or item == "":
            what = {str: "a folder path", bool: "true or false", int: "an integer >= 0"}[kind]
            problems.append(Problem(f"init_adapter.{key}", item, f"must be {what}"))
        elif kind is int and not 0 <= item < 2**63:
            problems.append(Problem(f"init_adapter.{key}", item, "must be an integer >= 0"))
    return problems


@dataclass(frozen=True)
class CacheDims:
    """Widths that size a cached sample (their config files), for `cache_bytes`."""

    latent_channels: int  # VAE latent channels (x4 once packed 2x2)
    t5: int  # T5 d_model
    pooled: int  # CLIP text pooled width
    clip: int  # CLIP image projection width
    dino: int  # DINOv2 hidden size
    dino_patches: int  # DINOv2 patch tokens per ref: (image_size / patch_size)^2


def cache_bytes(dims: CacheDims, pixels: int, max_refs: int, max_text_tokens: int) -> int:
    """A conservative size of one cached sample in bytes: every float stored as fp32 (the cache keeps latents and T5 in
    fp16), DINOv2 patch tokens of `max_refs` refs whether a sample has them or not, latents of the largest target the
    data set may hold (`pixels`). Today's cache (feature_cache.py) is at most this; a rewrite that stores less still
    fits under it."""
    tokens = pixels // 256  # VAE 8x down, 2x2 packing
    floats = tokens * 4 * dims.latent_channels + max_text_tokens * dims.t5 + dims.pooled
    floats += max_refs * (4 + dims.clip + dims.dino + dims.dino_patches * dims.dino)  # bbox, CLS, patches
    return 4 * floats + max_refs * (max_text_tokens + 1 + 8)  # spans, valid (bytes), depth (int64)


def cache_dims(md) -> CacheDims:
    """The widths of `md`'s VAE, text and image encoders (their config.json files)."""

    def read(folder: Path) -> dict:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))

    clip, dino = read(md.image_clip), read(md.image_dino)
    text = read(md.text_encoder)
    return CacheDims(
        latent_channels=int(read(md.vae).get("latent_channels", 16)),
        t5=int(read(md.text_encoder_2).get("d_model", 4096)),
        pooled=int(text.get("projection_dim", text.get("hidden_size", 768))),
        clip=int(clip.get("projection_dim", 768)),
        dino=int(dino.get("hidden_size", 1024)),
        dino_patches=(int(dino.get("image_size", 518)) // int(dino.get("patch_size", 14))) ** 2,
    )


def manifest_samples(recipe, manifest: dict) -> tuple[int, int]:
    """(samples the run caches, the largest target's pixels) from a data set's manifest.json."""
    splits = manifest.get("splits", {})
    train = int(splits.get("train", {}).get("count", 0))
    heldout = int(splits.get("heldout", {}).get("count", 0))
    config = manifest.get("config", {})
    if isinstance(config.get("size"), int):  # the toy world: square scenes (mixed sets: each source, mix_toy_data.py)
        sides = [source.get("config", {}).get("size") for source in manifest.get("mixed_from", [])]
        pixels = max(side for side in [config["size"], *sides] if isinstance(side, int)) ** 2
    else:
        pixels = int(config.get("max_pixels", UNKNOWN_PIXELS))
        if isinstance(recipe.buckets, dict) and isinstance(area := recipe.buckets.get("area"), int):
            pixels = max(pixels, area)  # explicit buckets may be larger than the stored targets (cache_key.py)
    return min(train, recipe.limit or train) + min(heldout, HELDOUT_CACHED), pixels


def _problem(field: str, value, exc: MppError) -> Problem:
    """The library's one line, which already names the path (so no second "(got ...)")."""
    del value
    return Problem(field, WITHHELD, str(exc).splitlines()[0])


def recipe_preflight(recipe) -> list[Problem]:
    """Every problem of a compose recipe's paths, model/adapter fit, export and free disk (module docstring)."""
    from moviepostproduction.compose.adapter_init import adapter_config
    from moviepostproduction.files import check_output
    from moviepostproduction.model_dir import IMAGE_COMPONENTS, ModelDir

    problems: list[Problem] = []
    model, data = Path(recipe.model), Path(recipe.data)
    md = None
    if not model.is_dir():
        problems.append(Problem("model", recipe.model, "not a directory (expected a FLUX-layout model folder)"))
    else:
        try:
            md = ModelDir.at(model)
            md.check(BASE_COMPONENTS)
        except MppError as exc:
            problems.append(_problem("model", recipe.model, exc))
            md = None
    manifest = None
    if not (data / "manifest.json").is_file():
        problems.append(Problem("data", recipe.data, "holds no manifest.json (expected `mpp prepare-data` output)"))
    elif not (data / "train").is_dir():
        problems.append(Problem("data", recipe.data, "holds no train/ split"))
    else:
        try:
            manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(Problem("data", recipe.data, f"manifest.json is not readable JSON ({exc})"))
    problems += init_adapter_problems(recipe.init_adapter)
    folder = Path(recipe.adapter_dir) if recipe.adapter_dir else None
    with_encoders = None
    if folder is not None and folder.exists():
        if not is_adapter_folder(folder):
            problems.append(Problem("adapter_dir", recipe.adapter_dir, "is not an adapter folder (mpp init-adapter)"))
        elif md is not None:  # with init_adapter too: made by this recipe's first run (a resume), used as it is
            with_encoders = ModelDir.at(model, folder)
    elif folder is not None and not recipe.init_adapter:
        message = "not found; make it with `mpp init-adapter` or give init_adapter"
        problems.append(Problem("adapter_dir", recipe.adapter_dir, message))
    elif folder is None and recipe.init_adapter:
        problems.append(Problem("init_adapter", recipe.init_adapter, "needs adapter_dir: the folder to create"))
    elif md is not None and folder is None:
        with_encoders = md  # MODEL/adapter, the combined layout
        if not md.adapter.config.is_file():
            problems.append(
                Problem("adapter_dir", None, f"required: {model} holds no adapter/ (give adapter_dir + init_adapter)")
            )
            with_encoders = None
    creates = folder is not None and not folder.exists() and recipe.init_adapter
    if md is not None and creates and not init_adapter_problems(recipe.init_adapter):
        given = {"image_clip": recipe.init_adapter["clip"], "image_dino": recipe.init_adapter["dino"]}
        with_encoders = replace(md, **{k: Path(v).expanduser() for k, v in given.items()})
    if with_encoders is not None:
        problems += _fit_problems(recipe, with_encoders, adapter_config, IMAGE_COMPONENTS, bool(creates))
    if recipe.export:
        target = Path(recipe.export)
        try:
            check_output(target, "export", folder=True)
        except MppError as exc:  # "export PATH: reason"
            problems.append(Problem("export", recipe.export, str(exc).split(": ", 1)[-1]))
        else:
            if exports_adapter(recipe):
                problems += [p for p in [export_problem(target)] if p]
            elif recipe.task == "compose" and is_adapter_folder(target):
                message = f"is an adapter folder; stage {recipe.stage} trains the whole backbone and writes a model dir"
                problems.append(Problem("export", recipe.export, message))
            named = any(p.field == "export" for p in problems)
            if not named and model.is_dir() and target.resolve() == model.resolve():
                problems.append(Problem("export", recipe.export, "is the model folder itself; pick another folder"))
    sized_by = ("model", "data", "adapter_dir", "init_adapter")  # the cache is sized from their configs
    if with_encoders is not None and manifest is not None and not any(p.field in sized_by for p in problems):
        problems += _disk_problems(recipe, with_encoders, manifest)
    return problems


def _fit_problems(recipe, md, adapter_config, image_components, creates: bool) -> list[Problem]:
    """The adapter's image encoders load and its config.json fits the model (one Problem per mismatched size);
    `creates`: the adapter is still to be made by init_adapter from these encoders."""
    field = "init_adapter" if creates else "adapter_dir"
    try:
        md.check(image_components)
        want = adapter_config(md)
    except MppError as exc:
        return [_problem(field, recipe.init_adapter if creates else str(md.adapter.root), exc)]
    try:  # an adapter still to be created is made from these very configs
        have = asdict(want) if creates else json.loads(md.adapter.config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [Problem(field, str(md.adapter.config), f"not readable JSON ({exc})")]
    problems = [
        Problem(field, str(md.adapter.root), f"{key} {have.get(key)!r} does not fit the model ({getattr(want, key)})")
        for key in FIT_KEYS
        if have.get(key) != getattr(want, key)
    ]
    if recipe.stage == "3" and (have.get("feedback_rank") == 0 or want.num_double_blocks < 2):  # bridges b < L-1
        message = "trains the feedback bridge, which this adapter does not have (feedback_rank 0 or one double block)"
        problems.append(Problem("stage", recipe.stage, message))
    return problems


def _disk_problems(recipe, md, manifest: dict) -> list[Problem]:
    """Free space under `out` for the train and heldout caches not yet built (`cache_bytes` x samples x 2)."""
    cache = Path(recipe.out) / "cache"
    if (cache / "train").exists() or (cache / "train.safetensors").exists():  # built, or being resumed: not sized
        return []
    try:
        samples, pixels = manifest_samples(recipe, manifest)
        need = CACHE_SAFETY * samples * cache_bytes(cache_dims(md), pixels, recipe.max_refs, recipe.max_text_tokens)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        return [Problem("data", recipe.data, f"cannot size the feature cache ({exc})")]
    where = Path(recipe.out).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if free < need:
        return [
            Problem(
                "out",
                recipe.out,
                f"needs about {need / 1e9:.2f} GB free for the feature cache ({samples} samples), "
                f"{where} has {free / 1e9:.2f} GB",
            )
        ]
    return []


def check_recipe(recipe, source: str | None = None) -> None:
    """Raise one ValidationError with a line per problem of a compose recipe (nothing for fill and vary)."""
    if recipe.task != "compose":
        return
    if problems := recipe_preflight(recipe):
        raise ValidationError(problems, source=source)
