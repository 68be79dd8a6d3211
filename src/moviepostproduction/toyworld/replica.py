"""Tiny random-init FLUX.1 folders in the exact layout users download from the hub (dev, schnell, Fill-dev).

The file lists are those of black-forest-labs/FLUX.1-dev, FLUX.1-schnell and FLUX.1-Fill-dev: `model_index.json`,
`scheduler/scheduler_config.json`, a sharded `transformer/` and `text_encoder_2/` with their index files,
`text_encoder/model.safetensors`, `tokenizer/` as vocab.json + merges.txt, `tokenizer_2/` as a sentencepiece
`spiece.model` (neither with a tokenizer.json: transformers converts them when it loads), `vae/`, and the root
single-file duplicates (`flux1-dev.safetensors` / `flux1-schnell.safetensors` / `flux1-fill-dev.safetensors` and
`ae.safetensors`). Sizes are toyworld/tiny.py's; the weights are random, so what they draw is noise. Tests load
these folders with diffusers' own pipelines and with ours (tests/test_replica.py, tests/test_diffusers_parity.py).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moviepostproduction.encoders.checks import quiet_progress
from moviepostproduction.files import build_once, save_pretrained_readable
from moviepostproduction.model_dir import default_cache_dir
from moviepostproduction.toyworld.tiny import (
    FLUX_PIPELINE_COMPONENTS,
    FLUX_SCHEDULER,
    T5_MAX_TOKENS,
    TinySpec,
    _corpus,
    _seeded,
    tiny_configs,
    tiny_tokenizers,
)

logger = logging.getLogger(__name__)

__all__ = ["REPLICA_VERSION", "VARIANTS", "HubLayout", "flux_replica", "write_flux_replica", "write_single_files"]

REPLICA_VERSION = 1  # bump when the layout or sizes change, so cached replicas are rebuilt
DIFFUSERS_VERSION = "0.30.0.dev0"  # what the hub folders' JSON files name
T5_SPM_VOCAB = 300  # sentencepiece target size (a soft limit: the tiny corpus gives fewer pieces)

# scheduler/scheduler_config.json of the hub folders, value for value
DEV_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": DIFFUSERS_VERSION,
    **FLUX_SCHEDULER,
}
SCHNELL_SCHEDULER = {**DEV_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


@dataclass(frozen=True)
class HubLayout:
    """What differs between the three hub folders."""

    pipeline: str  # model_index.json's _class_name
    single_file: str  # the root transformer duplicate (BFL's single-file checkpoint)
    scheduler: dict[str, Any]
    guidance_embeds: bool  # dev and Fill-dev are guidance-distilled; schnell is not
    fill: bool  # FLUX-Fill: in_channels 384 (latent + masked-image latent + packed 8x8 mask), out_channels 64


VARIANTS = {
    "dev": HubLayout("FluxPipeline", "flux1-dev.safetensors", DEV_SCHEDULER, True, False),
    "schnell": HubLayout("FluxPipeline", "flux1-schnell.safetensors", SCHNELL_SCHEDULER, False, False),
    "fill": HubLayout("FluxFillPipeline", "flux1-fill-dev.safetensors", DEV_SCHEDULER, True, True),
}


def _layout(variant: str) -> HubLayout:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[variant]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _save_sharded(model: torch.nn.Module, folder: Path) -> None:
    """save_pretrained in two or more shards (the hub's transformer has 3, T5 2) with the index file."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    biggest = max(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(folder, max_shard_size=max(total // 3, biggest + 1))
    shards = list(folder.glob("*-of-*.safetensors"))
    if len(shards) < 2:
        raise RuntimeError(f"{folder}: expected 2+ shards, got {len(shards)}")


# --------------------------------------------------------------------------------------------------- tokenizers
def _write_clip_tokenizer(folder: Path) -> None:
    """tokenizer/ as on the hub: vocab.json + merges.txt (the tiny BPE's own), configs, no tokenizer.json."""
    clip, _ = tiny_tokenizers()
    model = json.loads(clip.backend_tokenizer.to_str())["model"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    _write_json(folder / "special_tokens_map.json", {**special, "pad_token": "<|endoftext|>"})
    config = {
        **special,
        "pad_token": "<|endoftext|>",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": clip.model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    _write_json(folder / "tokenizer_config.json", config)


def _write_t5_tokenizer(folder: Path) -> None:
    """tokenizer_2/ as on the hub: a sentencepiece spiece.model (trained here on the tiny corpus, deterministic
    with one thread), configs, no tokenizer.json. T5's ids: pad 0, eos 1, unk 2; no extra ids at this size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=model,
        vocab_size=T5_SPM_VOCAB,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", {**special, "additional_special_tokens": []})
    config = {
        **special,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
        "extra_ids": 0,
        "legacy": True,
        "model_max_length": T5_MAX_TOKENS,
        "tokenizer_class": "T5Tokenizer",
    }
    _write_json(folder / "tokenizer_config.json", config)


def _t5_vocab(folder: Path) -> tuple[int, int, int]:
    """(vocab size, pad id, eos id) of the written tokenizer_2/, as transformers loads it."""
    from transformers import AutoTokenizer

    with quiet_progress():
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return len(tok), tok.pad_token_id, tok.eos_token_id


# ---------------------------------------------------------------------------------------------------- writers
def write_replica_files(path: str | Path, *, variant: str = "dev", seed: int = 0, spec: TinySpec | None = None) -> Path:
    """Write one replica into `path` (absent or empty); returns it. Random weights from `seed`."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    layout = _layout(variant)
    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"replica dir {root} is not empty")
    spec = spec or TinySpec(guidance_embeds=layout.guidance_embeds)
    cfg = tiny_configs(spec)
    _write_clip_tokenizer(root / "tokenizer")
    _write_t5_tokenizer(root / "tokenizer_2")
    vocab, pad, eos = _t5_vocab(root / "tokenizer_2")
    t5_config = cfg.text_encoder_2
    t5_config.vocab_size, t5_config.pad_token_id, t5_config.eos_token_id = vocab, pad, eos
    transformer = dict(cfg.transformer)
    if layout.fill:
        latent = 4 * spec.latent_channels  # packed 2x2
        transformer.update(in_channels=2 * latent + 4 * 8 * 8, out_channels=latent)  # + masked latent + 8x8 mask
    with quiet_progress():
        save_pretrained_readable(_seeded(seed * 1000, lambda: CLIPTextModel(cfg.text_encoder)), root / "text_encoder")
        _save_sharded(_seeded(seed * 1000 + 1, lambda: T5EncoderModel(t5_config)), root / "text_encoder_2")
        _save_sharded(_seeded(seed * 1000 + 2, lambda: FluxTransformer2DModel(**transformer)), root / "transformer")
        save_pretrained_readable(_seeded(seed * 1000 + 3, lambda: AutoencoderKL(**cfg.vae)), root / "vae")
    _write_json(root / "scheduler" / "scheduler_config.json", dict(layout.scheduler))
    _write_json(root / "model_index.json", _model_index(layout))
    write_single_files(root, variant=variant)
    logger.info("wrote FLUX.1-%s replica %s (seed %d)", variant, root, seed)
    return root


def _model_index(layout: HubLayout) -> dict[str, Any]:
    return {
        "_class_name": layout.pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        **FLUX_PIPELINE_COMPONENTS,
    }


def write_single_files(root: str | Path, *, variant: str = "dev") -> tuple[Path, Path]:
    """The root single-file duplicates (transformer, `ae.safetensors`): here the folder's own tensors under their
    diffusers names, so the files have the download's relative size; BFL's key names are not reproduced."""
    from safetensors.torch import load_file, save_file

    root = Path(root)
    out = []
    for name, folder in ((_layout(variant).single_file, "transformer"), ("ae.safetensors", "vae")):
        tensors: dict[str, torch.Tensor] = {}
        for file in sorted((root / folder).glob("*.safetensors")):
            tensors.update(load_file(file))
        save_file(tensors, root / name)
        out.append(root / name)
    return out[0], out[1]


def flux_replica(cache_dir: str | Path | None = None, *, variant: str = "dev", seed: int = 0) -> Path:
    """A replica per (variant, seed), built once under `cache_dir` (default: the package cache)."""
    _layout(variant)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"flux1-{variant}-replica-v{REPLICA_VERSION}-seed{seed}"
    return build_once(target, lambda d: write_replica_files(d, variant=variant, seed=seed))


def write_flux_replica(root: str | Path | None = None, variant: str = "dev", seed: int = 0) -> Path:
    """The issue's name for `flux_replica`: the cached replica of `variant` under the directory `root`."""
    return flux_replica(root, variant=variant, seed=seed)
