"""`mpp train CONFIG`: a training recipe file (YAML or JSON) -> encoders, cached features, task, Trainer, export.

    task: compose                 # the only task with a recipe so far
    model: build/toy-encoders     # model dir: frozen encoders + VAE, transformer/ and adapter/ to start from
    data: build/toy-data          # `mpp prepare-data` output (train/ and heldout/ shards)
    out: runs/toy                 # checkpoints/, logs/ (TensorBoard), samples/*.png, curves.png, cache/
    stage: toy                    # 1 | 2 | 3 | toy (training/stages.py)
    max_refs: 4
    max_text_tokens: 48
    limit: null                   # use the first N training scenes
    cache_workers: 1              # processes decoding the shards for the feature cache (the encoders run once, here)
    cache_device: auto            # where the cache's encoders run: auto (cuda if available, in bf16), cpu, cuda[:N]
    buckets: auto                 # resolution buckets: auto, native (own sizes), null (off), {area, step, max_ratio}
    init_from: null               # warm start (checkpoint folder, .safetensors or an exported model dir)
    adapter: {}                   # ConditioningConfig changes to the adapter it starts from (e.g. box_patch_rank: 64)
    adapter_dir: null             # adapter folder to start from (init-adapter's, a stage's export); null: MODEL/adapter
    init_adapter: null            # {clip: DIR, dino: DIR[, copy_encoders, seed]}: create adapter_dir before training
    export: build/toy-model       # stage toy: a complete model dir; stages 1-3: an adapter folder (adapter_export.py)
    backbone_dtype: fp32          # stages 1-3: the frozen FLUX weights in bf16 (with trainer.mixed_precision: bf16)
    ref_guidance: 1.0             # the exported dir's default reference guidance (ComposePipeline)
    noise_temperature: 1.0        # the exported dir's default factor on the starting noise (ComposePipeline)
    trainer: {max_steps: 4000, checkpoint_every: 500, sample_every: 500, log_every: 20, seed: 0}
                                  # TrainConfig; lr_scale: 0.2 runs every stage LR at a fifth
    compose: {batch_size: 16}     # ComposeTaskConfig; drop_caption: 0.15 trains 15 % of the samples on the empty
                                  # caption (for true CFG with the negative prompt ""); batch_tokens: 4096 sizes
                                  # each bucket's batches by image tokens (docs/training.md, "Resolution buckets")

Relative paths are relative to the current directory. Every field is checked when the file is read, before anything
loads (training/recipe_checks.py: types, bounds, seeds in [0, 2**64), the task's stages; one line per bad field), and
a compose recipe is checked whole before the first step (training/recipe_preflight.py: paths, adapter fit, export,
free disk for the feature cache).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.files import (
    STORAGE_DTYPES,
    cast_safetensors_files,
    read_structured,
    save_pretrained_readable,
    staged_copy,
)
from moviepostproduction.sampling import is_probability
from moviepostproduction.training.recipe_checks import recipe_problems
from moviepostproduction.training.trainer import TrainConfig, Trainer, TrainResult
from moviepostproduction.vary.nanodit_io import FOLDER as NANODIT_FOLDER

logger = logging.getLogger(__name__)


@dataclass
class Recipe:
    model: str
    data: str
    out: str
    task: str = "compose"
    stage: str = "toy"
    max_refs: int = 4
    max_text_tokens: int = 48
    limit: int | None = None
    cache_workers: int = 1  # processes decoding shards for the feature cache; 1: this process
    cache_device: str = "auto"  # the cache encoders' device (bf16 on CUDA, fp32 on the CPU); feature_cache.py
    buckets: dict | str | bool | None = "auto"  # resolution buckets of the cache (training/cache_key.py)
    init_from: str | None = None
    adapter: dict = field(default_factory=dict)  # ConditioningConfig changes applied to the adapter it starts from
    adapter_dir: str | None = None  # adapter folder to start from (None: MODEL/adapter); stages 1-3 export one
    init_adapter: dict | None = None  # {clip: DIR, dino: DIR}: create adapter_dir with `mpp init-adapter` first
    export: str | None = None
    export_dtype: str = "fp16"
    backbone_dtype: str = "fp32"  # the frozen FLUX weights while training (bf16 halves them; trained weights stay fp32)
    ref_guidance: float = 1.0  # written to the exported model_index.json as its default ref_guidance_scale
    noise_temperature: float = 1.0  # written to the exported model_index.json as its default noise_temperature
    trainer: dict = field(default_factory=dict)
    compose: dict = field(default_factory=dict)
    fill: dict = field(default_factory=dict)  # FillTaskConfig fields (task: fill)
    vary: dict = field(default_factory=dict)  # VaryTaskConfig fields (task: vary)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a recipe and check every field (training/recipe_checks.py), its trainer and its task's sections
        included: each bad one is a line of one ValidationError naming the file, before anything loads."""
        raw = read_structured(path, "recipe", fmt="json" if Path(path).suffix == ".json" else "yaml")
        if not isinstance(raw, dict):
            raise ValidationError([Problem("(top level)", raw, "must be a mapping of recipe fields")], source=str(path))
        problems = recipe_problems(cls, raw, section_configs(), task_stages)
        if problems:
            raise ValidationError(problems, source=str(path))
        recipe = cls(**raw)
        for section, build in (("trainer", _trainer_config), (recipe.task, TASK_CONFIGS[recipe.task])):
            try:  # the sections' own range checks, now rather than after the caches are built
                build(recipe)
            except ValidationError as err:
                named = [replace(p, field=f"{section}.{p.field.removeprefix(section + '.')}") for p in err.problems]
                raise ValidationError(named, source=str(path)) from None
        return recipe


def section_configs() -> dict[str, type]:
    """The dataclass each section of a recipe sets (`trainer:` TrainConfig, `compose:` ComposeTaskConfig, ...)."""
    from moviepostproduction.training.compose_task import ComposeTaskConfig
    from moviepostproduction.training.fill_task import FillTaskConfig
    from moviepostproduction.training.vary_task import VaryTaskConfig

    return {"trainer": TrainConfig, "compose": ComposeTaskConfig, "fill": FillTaskConfig, "vary": VaryTaskConfig}


def task_stages(task: str) -> tuple[str, ...]:
    """The stages a task trains in (training/stages.py for compose; its own STAGES for fill and vary)."""
    from moviepostproduction.training import fill_task, stages, vary_task

    return tuple({"compose": stages.STAGES, "fill": fill_task.STAGES, "vary": vary_task.STAGES}[task])


def check_fields(cls, values: dict, prefix: str, reason: str = "unknown field", exclude: frozenset = frozenset()):
    """Raise one one-line problem named `prefix.field` per key of `values` that is not a field of `cls`."""
    known = {f.name for f in dataclasses.fields(cls)} - exclude
    bad = [Problem(f"{prefix}.{k}", v, reason) for k, v in values.items() if k not in known]
    if bad:
        raise ValidationError(bad)


def require_mapping(name: str, value, what: str) -> None:
    """A recipe field that must be a mapping (`adapter:`): a one-line problem for anything else."""
    if not isinstance(value, dict):
        raise ValidationError([Problem(name, value, f"must be a mapping of {what}")])


def dataclass_from(cls, values: dict, prefix: str):
    """`cls(**values)` with unknown fields reported as one-line problems named `prefix.field`."""
    check_fields(cls, values, prefix)
    return cls(**values)


def _task_config(recipe: Recipe):
    """The recipe's `compose:` fields as a ComposeTaskConfig (one-line problems for bad ones)."""
    from moviepostproduction.training.compose_task import ComposeTaskConfig

    values = recipe.compose
    problems = [
        Problem(f"compose.{name}", values[name], "must be a probability in [0, 1]")
        for name in ("drop_refs", "drop_caption")
        if name in values and not is_probability(values[name])
    ]
    tokens = values.get("batch_tokens")  # its type is checked with the recipe's other fields
    if isinstance(tokens, int) and tokens < 1:
        problems.append(Problem("compose.batch_tokens", tokens, "must be an integer >= 1 (or null: batch_size)"))
    if problems:
        raise ValidationError(problems)
    return dataclass_from(ComposeTaskConfig, values, "compose")


def _fill_config(recipe: Recipe):
    from moviepostproduction.toyworld.triptych import TriptychConfig
    from moviepostproduction.toyworld.world_config import ToyWorldConfig
    from moviepostproduction.training.fill_task import FillTaskConfig

    values = dict(recipe.fill)
    if isinstance(triptych := values.get("triptych"), dict):  # fill.triptych.world: the toy world's fields
        triptych = dict(triptych)
        if isinstance(world := triptych.get("world"), dict):
            triptych["world"] = dataclass_from(ToyWorldConfig, world, "fill.triptych.world")
        values["triptych"] = dataclass_from(TriptychConfig, triptych, "fill.triptych")
    return dataclass_from(FillTaskConfig, values, "fill")


def _vary_config(recipe: Recipe):
    from moviepostproduction.training.vary_task import VaryTaskConfig

    return dataclass_from(VaryTaskConfig, recipe.vary, "vary")


TASK_CONFIGS = {"compose": _task_config, "fill": _fill_config, "vary": _vary_config}


def _trainer_config(recipe: Recipe) -> TrainConfig:
    check_fields(TrainConfig, recipe.trainer, "trainer", exclude=frozenset({"out_dir", "stage", "init_from"}))
    return TrainConfig(out_dir=recipe.out, stage=recipe.stage, init_from=recipe.init_from, **recipe.trainer)


def cached_features(recipe: Recipe, split: str, encoders, limit: int | None, patches: bool):
    """Open the cache folder OUT/cache/SPLIT/, or build it from the shards (resuming an interrupted build), with the
    buckets of the data set's train split (training/cache_key.py) for either split."""
    from moviepostproduction.datasets.buckets import BucketSpec
    from moviepostproduction.training.cache_key import cache_meta, resolve_buckets
    from moviepostproduction.training.feature_cache import open_cache, write_cache

    root = Path(recipe.out) / "cache" / split
    meta = cache_meta(recipe, encoders.model_dir, limit, patches)
    cache = open_cache(root, recipe.max_refs, expect=meta)
    if cache is not None:
        return cache
    spec = resolve_buckets(recipe.buckets, recipe.data, recipe.limit)
    sizes = {"max_refs": recipe.max_refs, "max_text_tokens": recipe.max_text_tokens, "limit": limit}
    buckets = spec.buckets if isinstance(spec, BucketSpec) else spec  # None, NATIVE or the spec's (w, h) list
    sizes |= {"buckets": buckets, "workers": recipe.cache_workers, "patches": patches}
    return write_cache(Path(recipe.data) / split, root, encoders, meta=meta, **sizes)


def reconfigure_adapter(adapter, changes: dict):
    """The model dir's adapter with the recipe's `adapter:` ConditioningConfig changes; new tensors start fresh."""
    require_mapping("adapter", changes, "ConditioningConfig fields")
    if not changes:
        return adapter
    check_fields(type(adapter.cfg), changes, "adapter", reason="unknown ConditioningConfig field")
    try:
        adapter, fresh = adapter.reconfigured(**changes)
    except (TypeError, ValueError) as exc:
        raise ValidationError([Problem("adapter", changes, str(exc))]) from None
    logger.info("adapter reconfigured with %s: %d new tensors start from their init", changes, len(fresh))
    return adapter


def build_compose_task(recipe: Recipe):
    from moviepostproduction.compose.flux import ConditionedFlux
    from moviepostproduction.compose.modules import CompositionAdapter
    from moviepostproduction.devices import resolve_device
    from moviepostproduction.encoders import ImageEncoder, Vae, load_transformer
    from moviepostproduction.model_dir import ModelDir
    from moviepostproduction.training.adapter_start import start_lora
    from moviepostproduction.training.cache_encoders import CacheEncoders, empty_caption_features
    from moviepostproduction.training.compose_task import ComposeTask

    md = ModelDir.at(recipe.model, recipe.adapter_dir)
    md.check()
    config = _task_config(recipe)  # fail early, before the caches are built
    adapter = reconfigure_adapter(CompositionAdapter.from_pretrained(md.adapter.root), recipe.adapter)  # fail early
    transformer = load_transformer(md, dtype=STORAGE_DTYPES[recipe.backbone_dtype])  # trained weights: fp32 (task)
    if md.adapter.lora is not None:  # a stage's export: its LoRA goes on training (stage 2) or stays frozen (stage 3)
        start_lora(transformer, md.adapter.lora)
    encoders = CacheEncoders(md, resolve_device(recipe.cache_device, "cache_device"))  # loaded if needed
    train = cached_features(recipe, "train", encoders, recipe.limit, adapter.uses_box_patches)
    preview = None  # no held-out scene (a small set, --heldout-frac 0): the sample grids show training scenes
    if any((Path(recipe.data) / "heldout").glob("shard-*.tar")):
        preview = cached_features(recipe, "heldout", encoders, 8, adapter.uses_box_patches)
    else:
        logger.warning("%s has no held-out scenes; the sample grids show training scenes", recipe.data)
    empty_caption = empty_caption_features(encoders, recipe.max_text_tokens, train) if config.drop_caption else None
    del encoders  # the cache build's encoder copies; training loads its own frozen VAE and image encoder
    image, vae = ImageEncoder.load(md), Vae.load(md)
    model = ConditionedFlux(transformer, adapter)
    task = ComposeTask(model, train, vae, image, config=config, preview=preview, empty_caption=empty_caption)
    return task, md


KEPT_FOLDERS = (NANODIT_FOLDER,)  # other capabilities' weights in an existing export dir survive a re-export


def export_model_dir(recipe: Recipe, task, source, steps: int | None = None) -> Path:
    """A complete model dir: the source's encoders, VAE, tokenizers and scheduler + the trained weights, built under a
    temporary name and renamed into place (`staged_copy`).

    Folders of `KEPT_FOLDERS` already in the export dir (NanoDiT, trained by another recipe) are carried over.
    """
    from moviepostproduction.adapter_dir import write_index
    from moviepostproduction.files import write_json_atomic

    transformer, adapter = task.model.transformer, task.model.adapter
    if getattr(transformer, "peft_config", None):
        raise ValidationError(
            [
                Problem(
                    "export",
                    recipe.export,
                    "LoRA stages export an adapter folder (training/adapter_export.py); only full-backbone "
                    "stages write a model dir",
                )
            ]
        )
    index, out = _export_index(recipe, task, source, steps), Path(recipe.export)
    with staged_copy(source.root, out, leave_out=("transformer", "adapter"), replace=True) as tmp:
        save_pretrained_readable(transformer, tmp / "transformer")
        cast_safetensors_files(tmp / "transformer", STORAGE_DTYPES[recipe.export_dtype])  # the live model stays as is
        adapter.save_pretrained(tmp / "adapter")
        if not (tmp / "image_encoders").is_dir():  # the run's adapter folder named its encoders: so does the export
            write_index(tmp / "adapter", clip=str(source.image_clip.resolve()), dino=str(source.image_dino.resolve()))
        write_json_atomic(index, tmp / "model_index.json")
        for folder in KEPT_FOLDERS:
            if (out / folder).is_dir() and not (tmp / folder).exists():
                shutil.copytree(out / folder, tmp / folder)
    return out


def _export_index(recipe: Recipe, task, source, steps: int | None) -> dict:
    """model_index.json of an export: the source's, with the training data, the sampling defaults and the label."""
    from moviepostproduction.toyworld.shards import read_manifest

    manifest = read_manifest(recipe.data)
    world = {"seed": manifest["seed"], "config": manifest["config"], "generator_version": manifest["generator_version"]}
    config = task.model.transformer.config
    index = {
        **source.index,
        "tiny_random": False,
        "toy_world_data": world,
        "label": f"{'toy-world' if source.index.get('toy_world') else recipe.task} model (mpp train, stage "
        f"{recipe.stage}, {config.num_layers}+{config.num_single_layers} "
        f"blocks{'' if steps is None else f', {steps} steps'})",
        "max_text_tokens": recipe.max_text_tokens,
        "ref_guidance_scale": float(recipe.ref_guidance),
        "noise_temperature": float(recipe.noise_temperature),
        "trained_by": f"mpp train (stage {recipe.stage})",
    }
    index.pop("trained_steps", None)  # the source's count is not this export's
    if steps is not None:
        index["trained_steps"] = steps
    if source.index.get("toy_world"):
        index["_toy_stage"] = "backbone"
    return index


def run_recipe(recipe: Recipe, *, checked: bool = False) -> TrainResult:
    """Train a recipe and export it; `checked`: the caller ran recipe_preflight.check_recipe already (mpp train)."""
    if recipe.task == "fill":
        from moviepostproduction.training.fill_task import FillTask, export_fill_model_dir

        task = FillTask.from_model_dir(recipe.model, _fill_config(recipe))
        result = Trainer(task, _trainer_config(recipe)).run()
        if recipe.export:
            steps = result.step + (warm_start_steps(recipe.init_from) or 0)  # counted from the chain's start
            logger.info("exported %s", export_fill_model_dir(task, recipe.model, recipe.export, steps))
        return result
    if recipe.task == "vary":
        from moviepostproduction.training.vary_task import VaryTaskConfig, build_vary_task
        from moviepostproduction.vary.nanodit_io import save_nanodit_dir

        config = dataclass_from(VaryTaskConfig, recipe.vary, "vary")
        task = build_vary_task(
            recipe.model, n=recipe.limit or 4096, cache_dir=Path(recipe.out) / "cache", config=config
        )
        result = Trainer(task, _trainer_config(recipe)).run()
        if recipe.export:
            logger.info("exported %s", save_nanodit_dir(task.model, Path(recipe.export) / NANODIT_FOLDER))
        return result
    from moviepostproduction.training.adapter_export import export_adapter_dir
    from moviepostproduction.training.adapter_start import prepare_adapter
    from moviepostproduction.training.recipe_preflight import check_recipe, exports_adapter

    if not checked:
        check_recipe(recipe)  # paths, adapter fit, export, free disk: before anything loads
    prepare_adapter(recipe)
    task, md = build_compose_task(recipe)
    result = Trainer(task, _trainer_config(recipe)).run()
    if recipe.export and exports_adapter(recipe):
        logger.info("exported the adapter folder %s", export_adapter_dir(recipe, task, md))
    elif recipe.export:
        prior = steps_before(recipe, md)
        label_steps = result.step + prior if prior is not None else None
        logger.info("exported %s", export_model_dir(recipe, task, md, steps=label_steps))
    return result


def steps_before(recipe: Recipe, source) -> int | None:
    """Optimiser steps behind the weights a compose run starts from: its warm-start chain, or without one the
    `trained_steps` of the model dir it loads (0 for an untrained one). None when unknown. A warm-start chain does
    not add the `trained_steps` of the model dir its first run loaded (checkpoints do not record it)."""
    if recipe.init_from:
        return warm_start_steps(recipe.init_from)
    return _step_count(source.index.get("trained_steps", 0))


def _step_count(value) -> int | None:
    """A model dir's `trained_steps` when it is a count (a non-negative int), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def warm_start_steps(init_from: str | None) -> int | None:
    """Optimiser steps behind a warm-start checkpoint, following each checkpoint's own `init_from` back to a start
    from scratch or to an exported model dir (its `trained_steps`); 0 without a warm start. None when a link of the
    chain is neither a readable checkpoint folder nor a model dir with a count."""
    total, seen = 0, set()
    while init_from:
        state_file, index_file = Path(init_from) / "state.json", Path(init_from) / "model_index.json"
        if not state_file.is_file() and index_file.is_file():  # an exported model dir: its label's count ends it
            try:
                value = json.loads(index_file.read_text()).get("trained_steps")
            except (OSError, ValueError, AttributeError):
                return None
            count = _step_count(value)
            return None if count is None else total + count
        if init_from in seen or not state_file.is_file():
            return None
        seen.add(init_from)
        try:
            state = json.loads(state_file.read_text())
            total += int(state["step"])
            init_from = state.get("config", {}).get("init_from")
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return total
