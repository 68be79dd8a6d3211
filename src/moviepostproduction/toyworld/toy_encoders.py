"""The toy image and text encoders (real CLIPVisionModelWithProjection, Dinov2Model, CLIPTextModel,
T5EncoderModel), trained jointly so that their frozen features carry the toy world's attributes (DESIGN 6):

- CLIP image embeds and the DINO CLS: colour / shape / pattern of a sprite view (linear heads, cross-entropy);
- DINO patch tokens: colour and shape of the sprite under each patch, "none" off the sprite;
- CLIP image embeds <-> CLIP text pooled output of the sprite's caption: CLIP's contrastive loss;
- CLIP text pooled output of a scene caption: its background and front sprite;
- T5 tokens: colour / shape / pattern / depth of the sprite phrase each token belongs to ("none" elsewhere).

Optionally (`recolour_prob`) a share of the sprite views has its RGB channels reordered: those views train the
shape and pattern heads only (colour is ignored, and they leave the contrastive loss), so that shape features
cannot lean on the sprite's hue.

The heads only shape the features; they are discarded when the model dir is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.toyworld.toy_data import (
    ATTRIBUTES,
    CHANNEL_ORDERS,
    IGNORE,
    CaptionPool,
    SpritePool,
    permute_channels,
)
from moviepostproduction.training.task import LossOutput

__all__ = ["EncoderTask", "EncoderTrainConfig", "ToyHeads"]

SPRITE_ATTRS = ("colour", "shape", "pattern")
PATCH_ATTRS = ("colour", "shape")
TOKEN_ATTRS = ("colour", "shape", "pattern", "depth")
SCENE_ATTRS = ("background", "colour", "shape")  # of a scene caption: its background and its fg sprite


@dataclass(frozen=True)
class EncoderTrainConfig:
    sprite_batch: int = 64
    caption_batch: int = 8
    batches_per_epoch: int = 256
    lr: float = 1e-3
    contrastive_weight: float = 1.0
    # T5 runs without an attention mask (as in FLUX), so padding shapes its features: train on several padded
    # lengths (trailing pads cut off the pool's longest) so the tokens mean the same at 64 or 512.
    t5_lengths: tuple[int, ...] = (64, 512)
    recolour_prob: float = 0.0  # share of sprite views with reordered RGB channels (shape / pattern labels only)

    def __post_init__(self) -> None:
        if not 0.0 <= self.recolour_prob < 1.0:
            raise ValidationError([Problem("recolour_prob", self.recolour_prob, "must be in [0, 1)")])


def _heads(dim: int, attrs: tuple[str, ...], none_class: bool) -> nn.ModuleDict:
    return nn.ModuleDict({a: nn.Linear(dim, len(ATTRIBUTES[a]) + int(none_class)) for a in attrs})


class ToyHeads(nn.Module):
    """Linear read-outs used only while training the encoders (not saved in the model dir)."""

    def __init__(self, clip_image_dim: int, dino_dim: int, clip_text_dim: int, t5_dim: int):
        super().__init__()
        self.clip = _heads(clip_image_dim, SPRITE_ATTRS, False)
        self.dino = _heads(dino_dim, SPRITE_ATTRS, False)
        self.patch = _heads(dino_dim, PATCH_ATTRS, True)
        self.ref_text = _heads(clip_text_dim, SPRITE_ATTRS, False)
        self.scene_text = _heads(clip_text_dim, SCENE_ATTRS, False)
        self.token = _heads(t5_dim, TOKEN_ATTRS, True)
        self.t5_scene = _heads(t5_dim, ("background",), False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature
        # The contrastive loss compares text pooled outputs with image embeds directly when their widths agree (the
        # toy spec), so FLUX's pooled_projections and the refs' CLIP embeds share one space; else through a map.
        same = clip_text_dim == clip_image_dim
        self.text_proj = nn.Identity() if same else nn.Linear(clip_text_dim, clip_image_dim, bias=False)


def _ce(heads: nn.ModuleDict, features: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the heads' attributes of the mean cross-entropy; features (..., D), labels (...)."""
    return sum(
        F.cross_entropy(head(features).flatten(0, -2), labels[a].flatten(), ignore_index=IGNORE)
        for a, head in heads.items()
    )


class EncoderTask:
    """TrainTask over a sprite pool (image views + captions) and a scene-caption pool."""

    name = "toy_encoders"

    def __init__(
        self,
        encoders: dict[str, nn.Module],  # clip_vision, dino, clip_text, t5
        clip_tokenizer: Any,
        sprites: SpritePool,
        captions: CaptionPool,
        cfg: EncoderTrainConfig | None = None,
    ):
        self.encoders = encoders
        self.cfg = cfg or EncoderTrainConfig()
        self.sprites, self.captions = sprites, captions
        self.heads = ToyHeads(
            encoders["clip_vision"].config.projection_dim,
            encoders["dino"].config.hidden_size,
            encoders["clip_text"].config.hidden_size,
            encoders["t5"].config.d_model,
        )
        # Sprite captions, tokenised once as TextEncoder does: each row names its caption's index.
        names = sorted(set(sprites.captions))
        self.caption_index = torch.tensor([names.index(c) for c in sprites.captions])  # (N,)
        self.caption_ids = clip_tokenizer(
            names, padding="max_length", max_length=clip_tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        )["input_ids"]  # (U, 77)  # fmt: skip
        first = [sprites.captions.index(c) for c in names]
        self.caption_labels = {a: sprites.labels[a][first] for a in SPRITE_ATTRS}  # (U,) per attribute

    def modules(self) -> dict[str, nn.Module]:
        return {**self.encoders, "heads": self.heads}

    def param_groups(self, stage: str) -> list[dict[str, Any]]:
        del stage  # one stage: every encoder and head
        for module in self.modules().values():
            module.requires_grad_(True).train()
        return [{"params": [p for m in self.modules().values() for p in m.parameters()], "lr": self.cfg.lr}]

    def batches(self, epoch: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        for _ in range(self.cfg.batches_per_epoch):
            yield {
                "sprite": torch.randint(len(self.sprites), (self.cfg.sprite_batch,), generator=g),
                "caption": torch.randint(len(self.captions), (self.cfg.caption_batch,), generator=g),
            }

    @property
    def device(self) -> torch.device:
        return next(self.heads.parameters()).device

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> LossOutput:
        pick = int(torch.randint(len(self.cfg.t5_lengths), (1,), generator=generator, device=generator.device))
        length = min(self.cfg.t5_lengths[pick], self.captions.t5_ids.shape[1])
        parts = {**self._image_losses(batch["sprite"], generator), **self._caption_losses(batch["caption"], length)}
        total = sum(self.cfg.contrastive_weight * v if k == "contrastive" else v for k, v in parts.items())
        return LossOutput(total, {k: float(v.detach()) for k, v in parts.items()})

    def _recolour(self, idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(clip pixels, dino pixels, recoloured (B,) bool) of the views idx; a view is recoloured with
        probability recolour_prob, by one of the five non-identity channel orders."""
        sp = self.sprites
        clip, dino = sp.clip_pixels[idx].to(self.device), sp.dino_pixels[idx].to(self.device)
        if self.cfg.recolour_prob == 0.0:
            return clip, dino, torch.zeros(len(idx), dtype=torch.bool, device=self.device)
        if sp.clip_pre is None or sp.dino_pre is None:
            raise ValueError("recolour_prob > 0 needs a SpritePool built with its preprocessing (build_sprite_pool)")
        draw = torch.rand(len(idx), generator=generator, device=generator.device).to(self.device)
        pick = torch.randint(len(CHANNEL_ORDERS), (len(idx),), generator=generator, device=generator.device)
        recoloured = draw < self.cfg.recolour_prob  # (B,)
        orders = CHANNEL_ORDERS[pick.cpu()]  # (B, 3)
        keep = ~recoloured[:, None, None, None]  # the other views stay bit-exact
        clip = torch.where(keep, clip, permute_channels(clip, orders, sp.clip_pre))
        return clip, torch.where(keep, dino, permute_channels(dino, orders, sp.dino_pre)), recoloured

    def _image_losses(self, idx: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        dev, sp = self.device, self.sprites
        clip_px, dino_px, recoloured = self._recolour(idx, generator)
        labels = {a: sp.labels[a][idx].to(dev) for a in SPRITE_ATTRS}
        patch_labels = {a: sp.patch_labels[a][idx].to(dev) for a in PATCH_ATTRS}
        # A recoloured view keeps its shape and pattern; its colour (a sprite patch's too) is unknown.
        labels["colour"] = labels["colour"].masked_fill(recoloured, IGNORE)
        none = len(ATTRIBUTES["colour"])
        patch_labels["colour"] = patch_labels["colour"].masked_fill(
            recoloured[:, None] & (patch_labels["colour"] != none), IGNORE
        )
        clip = self.encoders["clip_vision"](pixel_values=clip_px).image_embeds  # (B, C)
        dino = self.encoders["dino"](pixel_values=dino_px)
        cls, patches = dino.pooler_output, dino.last_hidden_state[:, 1:]  # (B, G), (B, P, G)
        out = {
            "clip_attr": _ce(self.heads.clip, clip, labels),
            "dino_attr": _ce(self.heads.dino, cls, labels),
            "dino_patch": _ce(self.heads.patch, patches, patch_labels),
        }
        return out | self._contrastive(clip[~recoloured], idx[~recoloured.cpu()])

    def _contrastive(self, clip: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLIP contrastive loss between image embeds (B, C) of views idx and their captions' pooled outputs, over
        the distinct captions of the batch (rows sharing a caption are all positives); caption attribute heads."""
        dev = self.device
        unique, which = torch.unique(self.caption_index[idx], return_inverse=True)  # (U,), (B,)
        text = self.encoders["clip_text"](input_ids=self.caption_ids[unique].to(dev)).pooler_output  # (U, D)
        scale = self.heads.logit_scale.exp().clamp(max=100)
        logits = scale * F.normalize(clip, dim=-1) @ F.normalize(self.heads.text_proj(text), dim=-1).T  # (B, U)
        which = which.to(dev)
        positives = F.one_hot(which, len(unique)).T.float()  # (U, B)
        to_text = F.cross_entropy(logits, which)
        to_image = F.cross_entropy(logits.T, positives / positives.sum(1, keepdim=True))  # soft: several positives
        text_labels = {a: self.caption_labels[a][unique].to(dev) for a in SPRITE_ATTRS}
        return {
            "contrastive": 0.5 * (to_text + to_image),
            "clip_text_attr": _ce(self.heads.ref_text, text, text_labels),
        }

    def _caption_losses(self, idx: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
        """Scene captions, T5 padded to `length` tokens."""
        dev, cp = self.device, self.captions
        pooled = self.encoders["clip_text"](input_ids=cp.clip_ids[idx].to(dev)).pooler_output  # (B, D)
        scene_labels = {a: cp.labels[a][idx].to(dev) for a in SCENE_ATTRS}
        hidden = self.encoders["t5"](input_ids=cp.t5_ids[idx, :length].to(dev)).last_hidden_state  # (B, T, d)
        token_labels = {a: cp.token_labels[a][idx, :length].to(dev) for a in TOKEN_ATTRS}
        real = (token_labels["colour"] != IGNORE).float()[..., None]  # (B, T, 1)
        mean = (hidden * real).sum(1) / real.sum(1)  # (B, d) mean over the caption's tokens
        return {
            "clip_scene": _ce(self.heads.scene_text, pooled, scene_labels),
            "t5_token": _ce(self.heads.token, hidden, token_labels),
            "t5_scene": _ce(self.heads.t5_scene, mean, {"background": scene_labels["background"]}),
        }

    def samples(self, generator: torch.Generator) -> None:
        del generator  # the encoders are judged by probes (toy_probe.py), not pictures
        return None
