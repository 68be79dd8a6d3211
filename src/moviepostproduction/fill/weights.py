"""Fill weights in a model dir (DESIGN 7): what `FillPipeline.from_model_dir` loads and `FillTask.save` writes.

A fill model dir is the FLUX layout (docs/model-directory.md) whose transformer takes the fill input
(in_channels = 2 x 4C + 4 f^2, out_channels = 4C, e.g. FLUX.1-Fill-dev), plus optionally:

    fill/config.json                        layout, SemanticCrossAttention config, LoRA spec, x_embedder flag
    fill/semantic_attention.safetensors     needed for a semantic map
    fill/lora.safetensors                   peft LoRA of the transformer, when config.lora is set
    fill/x_embedder.safetensors             the widened input projection, when config.x_embedder is true

Without fill/config.json the dir is plain FLUX-Fill: single layout, no semantic map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moviepostproduction.encoders import load_transformer
from moviepostproduction.errors import WeightsError
from moviepostproduction.files import (
    load_safetensors,
    load_strict,
    save_pretrained_readable,
    save_safetensors,
    staged_copy,
    write_json_atomic,
)
from moviepostproduction.fill.model import LAYOUTS, FillChannels, FillFlux, expand_to_fill
from moviepostproduction.fill.semantic_attention import SemanticAttentionConfig, SemanticCrossAttention
from moviepostproduction.model_dir import ModelDir, read_json

__all__ = [
    "FillWeightsConfig",
    "LoraSpec",
    "load_fill_weights",
    "save_fill_weights",
    "staged_fill_dir",
    "write_fill_model_dir",
]

FILL_FOLDER = "fill"
FILL_DIR_VERSION = 1
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets), init_lora_weights=True)


@dataclass(frozen=True)
class FillWeightsConfig:
    """fill/config.json. Without the file a model dir is plain FLUX-Fill: single layout, no semantic map."""

    layout: str = "single"
    semantic: SemanticAttentionConfig | None = None
    lora: LoraSpec | None = None
    x_embedder: bool = False

    @classmethod
    def from_dict(cls, raw: dict) -> FillWeightsConfig:
        sem, lora = raw.get("semantic"), raw.get("lora")
        cfg = cls(
            layout=raw.get("layout", "single"),
            semantic=SemanticAttentionConfig(**sem) if sem else None,
            lora=LoraSpec(**{**lora, "targets": tuple(lora.get("targets", DEFAULT_LORA_TARGETS))}) if lora else None,
            x_embedder=bool(raw.get("x_embedder", False)),
        )
        if cfg.layout not in LAYOUTS:
            raise ValueError(f"layout {cfg.layout!r} is not one of {LAYOUTS}")
        return cfg


def save_fill_weights(root: str | Path, model: FillFlux, cfg: FillWeightsConfig) -> Path:
    """Write `root/fill/`: the config and the trained parts (semantic attention, LoRA, x_embedder), atomically."""
    folder = Path(root) / FILL_FOLDER
    if (cfg.semantic is None) != (model.semantic is None):
        raise ValueError("FillWeightsConfig.semantic and the model's SemanticCrossAttention must both be set or unset")
    if model.semantic is not None:
        save_safetensors(model.semantic.state_dict(), folder / "semantic_attention.safetensors")
    if cfg.lora is not None:
        from peft.utils import get_peft_model_state_dict

        save_safetensors(get_peft_model_state_dict(model.transformer), folder / "lora.safetensors")
    if cfg.x_embedder:
        save_safetensors(model.transformer.x_embedder.state_dict(), folder / "x_embedder.safetensors")
    write_json_atomic(dataclasses.asdict(cfg), folder / "config.json")
    return folder


def load_fill_weights(md: ModelDir, transformer: torch.nn.Module, *, need_semantic: bool):
    """(FillWeightsConfig, SemanticCrossAttention | None); LoRA and x_embedder are loaded into `transformer`."""
    path = md.root / FILL_FOLDER / "config.json"
    if not path.is_file():
        if need_semantic:
            raise WeightsError(
                f"model dir {md.root}: missing {path} (expected the fill config with a 'semantic' "
                "section and fill/semantic_attention.safetensors, needed for a semantic map)"
            )
        return FillWeightsConfig(), None
    try:
        cfg = FillWeightsConfig.from_dict(read_json(path, "the fill config", md.root))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"model dir {md.root}: {path} is not a valid fill config ({exc})") from None
    if need_semantic and cfg.semantic is None:
        raise WeightsError(
            f"model dir {md.root}: {path} has no 'semantic' section (expected SemanticCrossAttention "
            "weights, needed for a semantic map)"
        )
    semantic = None
    if cfg.semantic is not None:
        semantic = SemanticCrossAttention(cfg.semantic)
        load_strict(semantic, path.parent / "semantic_attention.safetensors", "SemanticCrossAttention weights")
    if cfg.lora is not None:
        _load_lora(transformer, cfg.lora, path.parent / "lora.safetensors")
    if cfg.x_embedder:
        load_strict(transformer.x_embedder, path.parent / "x_embedder.safetensors", "the fill x_embedder weights")
    return cfg, semantic


def _load_lora(transformer: torch.nn.Module, spec: LoraSpec, file: Path) -> None:
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    state = load_safetensors(file, f"the fill LoRA (rank {spec.rank}, {', '.join(spec.targets)})")
    transformer.add_adapter(spec.config())
    expected = set(get_peft_model_state_dict(transformer))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise WeightsError(f"{file}: does not match the LoRA spec (missing {missing[:3]}, unexpected {extra[:3]})")
    set_peft_model_state_dict(transformer, state)
    transformer.requires_grad_(False)


@contextmanager
def staged_fill_dir(base: str | Path, out: str | Path, *, replace: bool = False) -> Iterator[tuple[Path, nn.Module]]:
    """Build the fill model dir `out` from `base` (`files.staged_copy`: renamed into place when the block ends):
    `base` copied less its fill/, its transformer widened to the fill input (`expand_to_fill`) when it is a plain
    one, kept when it already takes the fill input. Yields (the temporary folder, the fill transformer); the
    caller adds fill/."""
    md = ModelDir.at(base)
    vae_cfg = read_json(md.vae / "config.json", "an AutoencoderKL config", md.root)
    channels = FillChannels.from_vae(vae_cfg["latent_channels"], 2 ** (len(vae_cfg["block_out_channels"]) - 1))
    transformer = load_transformer(md)
    plain = int(transformer.config.in_channels) == channels.latent
    if plain:
        transformer = expand_to_fill(transformer, channels)
    leave_out = ("transformer", FILL_FOLDER) if plain else (FILL_FOLDER,)
    with staged_copy(md.root, out, leave_out=leave_out, replace=replace) as tmp:
        if plain:
            save_pretrained_readable(transformer, tmp / "transformer")
        yield tmp, transformer


def write_fill_model_dir(base: str | Path, out: str | Path, *, layout: str = "single", seed: int = 0) -> Path:
    """`base` (a plain FLUX-layout dir) copied to `out` with its transformer widened to the fill input
    (`expand_to_fill`) and fill/ holding a SemanticCrossAttention at init (seeded): an untrained fill model."""
    with staged_fill_dir(base, out) as (tmp, wide):
        latent = int(wide.config.out_channels or wide.config.in_channels)
        cfg = SemanticAttentionConfig(dim=latent, context_dim=latent)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            semantic = SemanticCrossAttention(cfg)
        save_fill_weights(tmp, FillFlux(wide, semantic), FillWeightsConfig(layout=layout, semantic=cfg))
    return Path(out)
