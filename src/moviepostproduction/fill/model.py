"""FLUX-Fill conditioning (DESIGN 7, seed 004): how a plate, a repaint mask and a semantic map enter a stock
`FluxTransformer2DModel`, without forking it.

Per image token the transformer input is [noisy latent (4C) | masked-image latent (4C) | mask (4 f^2)] on the channel
axis (C VAE latent channels, f the VAE factor: 64 + 64 + 256 = 384 on FLUX.1-Fill-dev), exactly as diffusers'
`FluxFillPipeline` builds it: the mask is binarised with white (1) = repaint, the masked image is image x (1 - mask)
in [-1, 1], and the full-resolution mask is folded so that each f x f pixel block becomes f^2 channels of its latent
pixel (channel fh * f + fw), then packed 2x2 like the latents. The output is the velocity of the 4C latent channels.

Layouts: "single" is stock FLUX-Fill on the plate. "diptych" is the in-context form of seed 004: [visible | target]
side by side, the left panel (plate x (1 - mask), mask = the hole) is context whose tokens are pinned to the noised
known latent at every step and excluded from the loss; the right panel is generated whole (mask = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from moviepostproduction.compose.conditioning import Conditioning
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.errors import WeightsError
from moviepostproduction.fill.semantic_attention import SemanticCrossAttention, SemanticTokens
from moviepostproduction.model_dir import move_like
from moviepostproduction.sampling import pack_latents, unpack_latents

__all__ = [
    "LAYOUTS",
    "MASK_THRESHOLD",
    "FillArrangement",
    "FillChannels",
    "FillFlux",
    "arrange",
    "binarize_mask",
    "check_fill_transformer",
    "context_tokens",
    "crop_target",
    "expand_to_fill",
    "fill_condition",
    "fold_mask",
    "masked_image",
    "pack_mask",
    "pad_amount",
    "split_condition",
    "unfold_mask",
    "unpack_mask",
]

LAYOUTS = ("single", "diptych")
MASK_THRESHOLD = 0.5  # diffusers' VaeImageProcessor(do_binarize=True): < 0.5 -> 0, >= 0.5 -> 1


@dataclass(frozen=True)
class FillChannels:
    """Channel widths of the FLUX-Fill input, derived from the VAE (never hard-coded)."""

    latent: int  # 4C: one packed latent token (the transformer's output width)
    mask: int  # 4 f^2: one packed, folded mask token

    @classmethod
    def from_vae(cls, latent_channels: int, vae_factor: int) -> FillChannels:
        return cls(latent=4 * latent_channels, mask=4 * vae_factor * vae_factor)

    @property
    def condition(self) -> int:
        """Masked-image latent + mask: what is concatenated to the noisy latent."""
        return self.latent + self.mask

    @property
    def total(self) -> int:
        """The fill transformer's in_channels (384 for C = 16, f = 8)."""
        return 2 * self.latent + self.mask


def check_fill_transformer(config, channels: FillChannels, where: str) -> None:
    """One-line WeightsError unless `config` (a FluxTransformer2DModel config) takes the fill input."""
    in_ch, out_ch = int(config["in_channels"]), config.get("out_channels") or config["in_channels"]
    if in_ch != channels.total or int(out_ch) != channels.latent:
        raise WeightsError(
            f"{where} has in_channels={in_ch}, out_channels={out_ch} (expected a FLUX-Fill transformer: "
            f"in_channels={channels.total} = {channels.latent} noisy latent + {channels.latent} masked-image latent "
            f"+ {channels.mask} mask channels, out_channels={channels.latent})"
        )


# --------------------------------------------------------------------------------------------------- packing
def binarize_mask(mask: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """Values in [0, 1] -> exactly 0 or 1 (>= threshold is 1 = repaint), as diffusers' mask processor."""
    return (mask >= threshold).to(mask.dtype if mask.is_floating_point() else torch.float32)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """image (B, 3, H, W) in [-1, 1] x (1 - mask (B, 1, H, W)): repainted pixels become 0 (mid grey)."""
    return image * (1 - mask)


def fold_mask(mask: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, f^2, H/f, W/f): each f x f block becomes the channels of its latent pixel."""
    return rearrange(mask, "b 1 (h fh) (w fw) -> b (fh fw) h w", fh=vae_factor, fw=vae_factor)


def unfold_mask(folded: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """Inverse of `fold_mask`."""
    return rearrange(folded, "b (fh fw) h w -> b 1 (h fh) (w fw)", fh=vae_factor, fw=vae_factor)


def pack_mask(mask: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """(B, 1, H, W) -> (B, (H/2f)(W/2f), 4 f^2): folded, then packed 2x2 like the latents."""
    return pack_latents(fold_mask(mask, vae_factor))


def unpack_mask(tokens: torch.Tensor, height: int, width: int, vae_factor: int) -> torch.Tensor:
    """Inverse of `pack_mask`; height / width in pixels."""
    return unfold_mask(unpack_latents(tokens, height // vae_factor, width // vae_factor), vae_factor)


def fill_condition(masked_latents: torch.Tensor, mask: torch.Tensor, vae_factor: int) -> torch.Tensor:
    """masked-image latents (B, C, h, w) + pixel mask (B, 1, fh, fw) -> condition tokens (B, N, 4C + 4 f^2)."""
    return torch.cat([pack_latents(masked_latents), pack_mask(mask.to(masked_latents.dtype), vae_factor)], dim=2)


def split_condition(condition: torch.Tensor, channels: FillChannels) -> tuple[torch.Tensor, torch.Tensor]:
    """condition (B, N, 4C + 4 f^2) -> (packed masked-image latents (B, N, 4C), packed mask (B, N, 4 f^2))."""
    return condition[..., : channels.latent], condition[..., channels.latent :]


# --------------------------------------------------------------------------------------------------- layouts
@dataclass
class FillArrangement:
    """What the VAE and the mask packing see for one layout."""

    image: torch.Tensor  # (B, 3, H, W') in [-1, 1]; its latents are x0 in training
    mask: torch.Tensor  # (B, 1, H, W') 1 = repaint
    panels: int  # 1 (single) or 2 (diptych: [context | target])


def arrange(layout: str, image: torch.Tensor, mask: torch.Tensor) -> FillArrangement:
    """image (B, 3, H, W) in [-1, 1] (the target in training, the plate at inference) and its hole mask."""
    if layout == "single":
        return FillArrangement(image, mask, 1)
    if layout == "diptych":
        visible = masked_image(image, mask)  # the left panel: what the plate shows
        return FillArrangement(torch.cat([visible, image], dim=-1), torch.cat([mask, torch.ones_like(mask)], -1), 2)
    raise ValueError(f"unknown fill layout {layout!r}; expected one of {LAYOUTS}")


def context_tokens(layout: str, grid: tuple[int, int], device=None) -> torch.Tensor:
    """(N,) bool over the packed token grid of the arranged image: True on the diptych's context panel."""
    h, w = grid
    cols = torch.arange(w, device=device).repeat(h)  # row-major, as pack_latents
    return cols < w // 2 if layout == "diptych" else torch.zeros(h * w, dtype=torch.bool, device=device)


def crop_target(pixels: torch.Tensor, panels: int) -> torch.Tensor:
    """The generated panel of an arranged image (B, 3, H, panels x W) -> (B, 3, H, W)."""
    return pixels[..., -(pixels.shape[-1] // panels) :]


# --------------------------------------------------------------------------------------------------- models
def expand_to_fill(transformer: nn.Module, channels: FillChannels) -> nn.Module:
    """A FLUX-Fill copy of a plain FLUX transformer: x_embedder widened with zero columns for the condition.

    At init it ignores the condition and equals the original on the noisy latent (how fill / control LoRAs start
    from FLUX.1-dev); the new columns learn when x_embedder is trained.
    """
    cfg = transformer.config
    if int(cfg.in_channels) != channels.latent:
        raise ValueError(
            f"expand_to_fill needs a plain transformer with in_channels={channels.latent}, " f"got {cfg.in_channels}"
        )
    wide = type(transformer).from_config({**cfg, "in_channels": channels.total, "out_channels": channels.latent})
    state = transformer.state_dict()
    old = state.pop("x_embedder.weight")  # (D, 4C)
    weight = old.new_zeros(old.shape[0], channels.total)
    weight[:, : channels.latent] = old
    wide.load_state_dict({**state, "x_embedder.weight": weight}, strict=True)
    return move_like(wide, old.device, old.dtype).requires_grad_(False).eval()


class FillFlux(nn.Module):
    """A stock FLUX-Fill transformer, plus the optional SemanticCrossAttention on the noisy latent (seed 004: the
    latent tokens query the VAE tokens of the semantic map before the transformer) and the optional compose
    conditioning (refs inserted at their bboxes via `ConditionedFlux`). A pure velocity predictor.
    """

    def __init__(self, transformer: nn.Module, semantic: SemanticCrossAttention | None = None, adapter=None):
        super().__init__()
        self.transformer = transformer
        self.semantic = semantic
        # The transformer with a CompositionAdapter, only to insert references; built once, not per step.
        self.conditioned = ConditionedFlux(transformer, adapter) if adapter is not None else None

    @property
    def adapter(self):
        """The CompositionAdapter that inserts references, or None."""
        return self.conditioned.adapter if self.conditioned is not None else None

    def forward(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        *,
        semantic: SemanticTokens | None = None,
        latent_positions: torch.Tensor | None = None,
        conditioning: Conditioning | None = None,
        layout_active: bool = True,
    ) -> torch.Tensor:
        """latents (B, N, 4C), condition (B, N, 4C + 4 f^2) -> velocity (B, N, 4C).

        `semantic` holds the semantic-map tokens (and their positions); `latent_positions` (N, 2) the panel-local
        (y, x) of each latent token for the attention's position features.
        """
        x = latents
        if semantic is not None:
            if self.semantic is None:
                raise ValueError("semantic tokens given but this FillFlux has no SemanticCrossAttention")
            where = {"x_positions": latent_positions, "context_positions": semantic.positions}
            if self.semantic.cfg.residual_on == "condition":  # the masked-image latent: noise free
                width = x.shape[-1]
                masked = self.semantic(condition[..., :width].to(x.dtype), semantic.tokens, **where,
                                       context_mask=semantic.mask)  # fmt: skip
                condition = torch.cat([masked, condition[..., width:].to(x.dtype)], dim=2)
            else:
                x = self.semantic(x, semantic.tokens, **where, context_mask=semantic.mask)
        hidden = torch.cat([x, condition.to(x.dtype)], dim=2)  # (B, N, 2 x 4C + 4 f^2)
        if conditioning is not None and conditioning.num_refs > 0:
            if self.conditioned is None:
                raise ValueError("reference conditioning given but this FillFlux has no CompositionAdapter")
            return self.conditioned(
                hidden,
                encoder_hidden_states,
                pooled_projections,
                timestep,
                img_ids,
                txt_ids,
                guidance,
                conditioning=conditioning,
                layout_active=layout_active,
            )
        return self.transformer(
            hidden_states=hidden,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]


def pad_amount(size: int, multiple: int) -> int:
    """Pixels to add so that `size` becomes a multiple of `multiple`."""
    return math.ceil(size / multiple) * multiple - size
