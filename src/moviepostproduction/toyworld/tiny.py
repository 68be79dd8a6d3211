"""Tiny random-init model directories in the FLUX.1-dev layout (see docs/model-directory.md).

The real classes (FluxTransformer2DModel, AutoencoderKL, CLIPTextModel, T5EncoderModel,
CLIPVisionModelWithProjection, Dinov2Model, CLIPTokenizer, T5Tokenizer) are built with tiny sizes and
saved with `save_pretrained`, so every loader in the package runs its real code path in tests. The
weights are random: output made with such a directory is noise and is labelled through the
`"tiny_random": true` marker in model_index.json.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moviepostproduction.encoders.checks import quiet_progress
from moviepostproduction.files import build_once, save_pretrained_readable
from moviepostproduction.model_dir import default_cache_dir

logger = logging.getLogger(__name__)

TINY_MARKER = "tiny_random"
TINY_DIR_VERSION = 3  # bump when the tiny layout or sizes change, so cached dirs are rebuilt

# FLUX.1-dev facts the tiny configs keep (scaled sizes change, these do not).
FLUX_VAE_SCALING = 0.3611
FLUX_VAE_SHIFT = 0.1159
FLUX_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
# model_index.json's component entries of a FluxPipeline folder, as the hub's FLUX.1-dev lists them
FLUX_PIPELINE_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
CLIP_MAX_TOKENS = 77
T5_MAX_TOKENS = 512
# DINOv2 resizes the short edge to 256 before its 224 crop; the tiny preprocessor keeps that ratio.
DINO_RESIZE_RATIO = 256 / 224


@dataclass(frozen=True)
class TinySpec:
    """Size knobs of a tiny model directory; every config dimension is derived from these."""

    heads: int = 2
    head_dim: int = 16
    double_blocks: int = 1
    single_blocks: int = 1
    latent_channels: int = 16
    vae_channels: tuple[int, ...] = (8, 8, 16, 16)  # 4 levels -> 8x downsampling, as FLUX's VAE
    vae_groups: int = 4
    t5_dim: int = 32  # -> transformer joint_attention_dim
    clip_text_dim: int = 32  # -> transformer pooled_projection_dim
    clip_vision_dim: int = 32
    clip_image_dim: int = 24  # C: CLIP image_embeds
    dino_dim: int = 40  # G: DINO CLS / patch features
    encoder_layers: int = 1
    encoder_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    guidance_embeds: bool = True

    def __post_init__(self) -> None:
        if any(c % self.vae_groups for c in self.vae_channels):
            raise ValueError(f"vae_channels {self.vae_channels} must be divisible by vae_groups {self.vae_groups}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        for name in ("clip_text_dim", "clip_vision_dim", "dino_dim"):
            if getattr(self, name) % self.encoder_heads:
                raise ValueError(f"{name} {getattr(self, name)} must be divisible by {self.encoder_heads} heads")


@dataclass(frozen=True)
class TinyConfigs:
    """Constructor arguments / configs of every component, in the order they are saved."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    scheduler: dict[str, Any]
    text_encoder: Any  # CLIPTextConfig
    text_encoder_2: Any  # T5Config
    image_clip: Any  # CLIPVisionConfig
    image_dino: Any  # Dinov2Config
    clip_preprocessor: dict[str, Any]
    dino_preprocessor: dict[str, Any]
    adapter: Any  # ConditioningConfig of the CompositionAdapter (adapter/)


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split a head dim into (time, height, width) RoPE axes like FLUX's (16, 56, 56) for 128; all even."""
    first = 2 * max(1, round(head_dim / 16))
    while (head_dim - first) % 4:
        first += 2
    rest = (head_dim - first) // 2
    if rest <= 0:
        raise ValueError(f"head_dim {head_dim} is too small to split into three even RoPE axes")
    return first, rest, rest


# Toy-world and film words; the tiny tokenizers are trained on phrases of these plus every ASCII character.
CORPUS_WORDS = (
    "a an the of in on at with and red orange yellow green blue purple pink white black gray brown solid "
    "striped dotted checkered gradient noisy circle square triangle star hexagon ring cross heart sprite "
    "kitchen street forest city sky studio beach room night chef person dog cat car house tree actor lamp "
    "reference foreground background left right top bottom light dark neon "
    # every word of the toy world's captions (data/synthetic.py, data/backgrounds.py): tests/test_toy_encoders.py
    "cyan diamond front behind scene sunset daylight desert grey foggy banded"
).split()


def _corpus() -> list[str]:
    phrases = [" ".join(CORPUS_WORDS[i : i + 7]) for i in range(0, len(CORPUS_WORDS), 2)]
    ascii_chars = "".join(chr(i) for i in range(33, 127))
    return phrases + [p.capitalize() + "." for p in phrases] + [ascii_chars, " ".join(ascii_chars)]


TOKENIZER_DIR = (
    Path(__file__).parents[1] / "assets" / "tiny-tokenizers"
)  # clip/ and t5/, as train_tiny_tokenizers wrote


def train_tiny_tokenizers() -> tuple[Any, Any]:
    """(CLIPTokenizer, T5Tokenizer) trained on the built-in corpus; no hub access.

    Not reproducible across processes: the trainers break ties between equally frequent merges in hash-map order,
    so two runs give different token ids. The tokenizers every model dir uses are therefore frozen files
    (TOKENIZER_DIR, written by `scripts/build_tiny_tokenizers.py`); this only makes new ones.
    """
    from transformers import CLIPTokenizer, T5Tokenizer

    corpus = _corpus()
    clip = CLIPTokenizer().train_new_from_iterator(corpus, vocab_size=600)
    clip.model_max_length = CLIP_MAX_TOKENS
    t5 = T5Tokenizer(extra_ids=0).train_new_from_iterator(corpus, vocab_size=400)
    t5.model_max_length = T5_MAX_TOKENS
    return clip, t5


@functools.lru_cache(maxsize=1)
def tiny_tokenizers() -> tuple[Any, Any]:
    """(CLIP, T5) tokenizers of every tiny and toy model dir, loaded from TOKENIZER_DIR: the same token ids in
    every process (cached: do not mutate)."""
    from transformers import AutoTokenizer

    for sub in ("clip", "t5"):
        if not (TOKENIZER_DIR / sub / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{TOKENIZER_DIR / sub}: tiny tokenizer files missing (tokenizer.json expected)")
    return tuple(AutoTokenizer.from_pretrained(TOKENIZER_DIR / sub, local_files_only=True) for sub in ("clip", "t5"))


def tiny_configs(spec: TinySpec | None = None) -> TinyConfigs:
    """Configs of the real classes at tiny size, wired so that every interface dimension matches."""
    from transformers import CLIPTextConfig, CLIPVisionConfig, Dinov2Config, T5Config

    s = spec or TinySpec()
    clip_tok, t5_tok = tiny_tokenizers()
    transformer = {
        "patch_size": 1,
        "in_channels": 4 * s.latent_channels,  # FLUX packs 2x2 latent patches into one token
        "out_channels": None,
        "num_layers": s.double_blocks,
        "num_single_layers": s.single_blocks,
        "attention_head_dim": s.head_dim,
        "num_attention_heads": s.heads,
        "joint_attention_dim": s.t5_dim,
        "pooled_projection_dim": s.clip_text_dim,
        "guidance_embeds": s.guidance_embeds,  # FLUX.1-dev is guidance-distilled; the toy model is not
        "axes_dims_rope": rope_axes(s.head_dim),
    }
    levels = len(s.vae_channels)
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(s.vae_channels),
        "layers_per_block": 1,
        "latent_channels": s.latent_channels,
        "norm_num_groups": s.vae_groups,
        "sample_size": 8 * 2 ** (levels - 1),
        "scaling_factor": FLUX_VAE_SCALING,
        "shift_factor": FLUX_VAE_SHIFT,
        "use_quant_conv": False,  # FLUX's VAE has neither quant conv
        "use_post_quant_conv": False,
    }
    text_encoder = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=s.clip_text_dim,
        intermediate_size=2 * s.clip_text_dim,
        projection_dim=s.clip_text_dim,
        num_hidden_layers=s.encoder_layers,
        num_attention_heads=s.encoder_heads,
        max_position_embeddings=CLIP_MAX_TOKENS,
        bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id,  # CLIP pools at the first eos token
        pad_token_id=clip_tok.pad_token_id,
    )
    text_encoder_2 = T5Config(
        vocab_size=len(t5_tok),
        d_model=s.t5_dim,
        d_kv=s.t5_dim // s.encoder_heads,
        d_ff=2 * s.t5_dim,
        num_layers=s.encoder_layers,
        num_heads=s.encoder_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as FLUX's T5-XXL
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=t5_tok.pad_token_id,
        eos_token_id=t5_tok.eos_token_id,
    )
    image_clip = CLIPVisionConfig(
        hidden_size=s.clip_vision_dim,
        intermediate_size=2 * s.clip_vision_dim,
        projection_dim=s.clip_image_dim,
        num_hidden_layers=s.encoder_layers,
        num_attention_heads=s.encoder_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
    )
    image_dino = Dinov2Config(
        hidden_size=s.dino_dim,
        num_hidden_layers=s.encoder_layers,
        num_attention_heads=s.encoder_heads,
        mlp_ratio=2,
        image_size=s.image_size,
        patch_size=s.patch_size,
    )
    clip_pre = {"size": {"shortest_edge": s.image_size}, "crop_size": {"height": s.image_size, "width": s.image_size}}
    dino_pre = {  # DINOv2 normalises with ImageNet statistics
        **clip_pre,
        "size": {"shortest_edge": round(s.image_size * DINO_RESIZE_RATIO)},
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
    }
    from moviepostproduction.compose.modules import ConditioningConfig

    adapter = ConditioningConfig(
        hidden_dim=s.heads * s.head_dim,
        clip_dim=s.clip_image_dim,
        dino_dim=s.dino_dim,
        instance_dim=32,
        dense_k=3,
        fourier_freqs=4,
        alpha_hidden=16,
        num_double_blocks=s.double_blocks,
        num_single_blocks=s.single_blocks,
        modulation_rank=4,
        feedback_rank=4,
    )
    return TinyConfigs(
        transformer,
        vae,
        dict(FLUX_SCHEDULER),
        text_encoder,
        text_encoder_2,
        image_clip,
        image_dino,
        clip_pre,
        dino_pre,
        adapter,
    )


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module from its own seed so components do not depend on construction order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _model_index(seed: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """FluxPipeline's index, so diffusers loads the dir too; `_` keys are ignored by diffusers."""
    import diffusers

    return {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        **FLUX_PIPELINE_COMPONENTS,
        TINY_MARKER: True,
        "_tiny_seed": seed,
        "_tiny_version": TINY_DIR_VERSION,
        **(extra or {}),
    }


def write_tiny_model_dir(
    path: str | Path,
    *,
    seed: int = 0,
    spec: TinySpec | None = None,
    modules: Mapping[str, torch.nn.Module] | None = None,
    index: Mapping[str, Any] | None = None,
) -> Path:
    """Write a tiny model directory at `path` (must be absent or empty); returns its path.

    Components are random-init unless `modules` gives one by sub-folder name (e.g. a trained "vae" or
    "image_encoders/clip", see toy_model.py); `index` adds or overrides model_index.json keys.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import (
        BitImageProcessorPil,
        CLIPImageProcessorPil,
        CLIPTextModel,
        CLIPVisionModelWithProjection,
        Dinov2Model,
        T5EncoderModel,
    )

    from moviepostproduction.compose.modules import CompositionAdapter

    root = Path(path)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"tiny model dir {root} is not empty")
    spec = spec or TinySpec()
    cfg = tiny_configs(spec)
    models: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: FluxTransformer2DModel(**cfg.transformer),
        "vae": lambda: AutoencoderKL(**cfg.vae),
        "text_encoder": lambda: CLIPTextModel(cfg.text_encoder),
        "text_encoder_2": lambda: T5EncoderModel(cfg.text_encoder_2),
        "image_encoders/clip": lambda: CLIPVisionModelWithProjection(cfg.image_clip),
        "image_encoders/dino": lambda: Dinov2Model(cfg.image_dino),
        "adapter": lambda: CompositionAdapter(cfg.adapter),
    }
    unknown = sorted(set(modules or {}) - set(models))
    if unknown:
        raise KeyError(f"unknown model dir components {unknown}; known: {', '.join(models)}")
    clip_tok, t5_tok = tiny_tokenizers()
    with quiet_progress():
        for offset, (sub, build) in enumerate(models.items()):
            given = (modules or {}).get(sub)
            save_pretrained_readable(given if given is not None else _seeded(seed * 1000 + offset, build), root / sub)
        clip_tok.save_pretrained(root / "tokenizer")
        t5_tok.save_pretrained(root / "tokenizer_2")
    CLIPImageProcessorPil(**cfg.clip_preprocessor).save_pretrained(root / "image_encoders/clip")
    BitImageProcessorPil(**cfg.dino_preprocessor).save_pretrained(root / "image_encoders/dino")
    FlowMatchEulerDiscreteScheduler(**cfg.scheduler).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(_model_index(seed, index), indent=2) + "\n")
    given = f"given {sorted(modules)}, the rest random" if modules else "random"
    logger.info("wrote tiny model dir %s (%s, seed %d)", root, given, seed)
    return root


def tiny_random_model_dir(cache_dir: str | Path | None = None, *, seed: int = 0) -> Path:
    """A tiny random-init model dir (`write_tiny_model_dir`) for tests and smoke runs, built once into the cache.
    Its model_index.json carries `"tiny_random": true`, so its output is labelled as noise."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return build_once(
        cache / f"tiny-random-v{TINY_DIR_VERSION}-seed{seed}", lambda d: write_tiny_model_dir(d, seed=seed)
    )
