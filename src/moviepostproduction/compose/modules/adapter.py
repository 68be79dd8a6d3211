"""CompositionAdapter: the five conditioning modules and `prepare`, which fills the per-scene cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from moviepostproduction.compose.conditioning import Conditioning, RefBatch, build_packing, build_regions
from moviepostproduction.compose.modules.alpha_predictor import AlphaPredictor
from moviepostproduction.compose.modules.config import ConditioningConfig
from moviepostproduction.compose.modules.feedback_bridge import FeedbackBridge
from moviepostproduction.compose.modules.instance_encoder import InstanceEncoder
from moviepostproduction.compose.modules.layout_head import AssembleAttention, LayoutHead
from moviepostproduction.compose.modules.modulation_head import ModulationHead
from moviepostproduction.compose.modules.occlusion import occlusion_priority
from moviepostproduction.encoders.checks import first_line, require_fit
from moviepostproduction.errors import Problem, ValidationError, WeightsError
from moviepostproduction.files import load_strict, save_safetensors, write_json_atomic
from moviepostproduction.layout import bbox_area, bbox_token_mask, box_token_coords, gaussian_token_mask, token_extent

# Adapter dirs written before issue 39 learned the occlusion priority (a Parameter `occlusion.logits`); it is now a
# fixed setting. Such a dir is refused rather than read with the priority silently dropped.
REMOVED_OCCLUSION = (
    "occlusion_priority (a learned occlusion.logits tensor) was removed; set depth_priority: [fg, mg, bg] to 10 x "
    "the logits and drop occlusion_priority and occlusion.logits (docs/architecture.md, 'Removed research residue')"
)


class CompositionAdapter(nn.Module):
    """All trainable conditioning modules. The FLUX weights live elsewhere and are never copied here."""

    def __init__(self, cfg: ConditioningConfig):
        super().__init__()
        self.cfg = cfg
        self.alpha_predictor = AlphaPredictor(cfg)
        self.instance_encoder = InstanceEncoder(cfg)
        self.layout_head = LayoutHead(cfg)
        self.modulation_head = ModulationHead(cfg)
        self.feedback_bridge = FeedbackBridge(cfg)
        self.assemble = nn.ModuleDict({str(b): AssembleAttention(cfg) for b in cfg.resolved_layout_blocks})

    CONFIG_NAME = "config.json"
    WEIGHTS_NAME = "model.safetensors"

    def save_pretrained(self, directory: str | Path) -> Path:
        """`directory/config.json` + `directory/model.safetensors`, each written atomically."""
        directory = Path(directory)
        save_safetensors(self.state_dict(), directory / self.WEIGHTS_NAME, metadata={"format": "pt"})
        write_json_atomic(dataclasses.asdict(self.cfg), directory / self.CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> CompositionAdapter:
        """Load a saved adapter; the weights must match its config exactly."""
        directory = Path(directory)
        config_path, weights = directory / cls.CONFIG_NAME, directory / cls.WEIGHTS_NAME
        if not config_path.is_file():
            raise WeightsError(
                f"missing {config_path} (expected a CompositionAdapter config written by save_pretrained)"
            )
        try:
            raw = json.loads(config_path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, 5000-digit ints
            raise WeightsError(f"{config_path}: not a valid CompositionAdapter config ({first_line(exc)})") from None
        if not isinstance(raw, dict):
            raise WeightsError(f"{config_path}: not a valid CompositionAdapter config (must be a JSON object)")
        if "occlusion_priority" in raw:
            raise WeightsError(f"{config_path}: {REMOVED_OCCLUSION}")
        try:
            cfg = ConditioningConfig(**raw)
        except (TypeError, ValueError) as exc:  # TypeError: an unknown key
            raise WeightsError(f"{config_path}: not a valid CompositionAdapter config ({exc})") from None
        require_fit(lambda: cls(cfg), weights, config_path, "CompositionAdapter weights")
        adapter = cls(cfg)
        load_strict(adapter, weights, "CompositionAdapter weights")
        return adapter

    @property
    def uses_box_positions(self) -> bool:
        return self.cfg.box_position_freqs > 0 and len(self.assemble) > 0

    @property
    def uses_box_patches(self) -> bool:
        return self.cfg.box_patch_rank > 0 and len(self.assemble) > 0

    def reconfigured(self, **changes) -> tuple[CompositionAdapter, list[str]]:
        """A new adapter with `cfg.with_(**changes)` carrying every tensor of this one that still fits.

        Returns it and the names of its tensors that kept their fresh initialisation (new or resized modules).
        """
        fresh = CompositionAdapter(self.cfg.with_(**changes))
        target = fresh.state_dict()
        kept = {k: v for k, v in self.state_dict().items() if k in target and target[k].shape == v.shape}
        fresh.load_state_dict(kept, strict=False)
        return fresh, sorted(set(target) - set(kept))

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def modulation_masks(self, refs: RefBatch, grid: tuple[int, int]) -> torch.Tensor:
        """(B, R, N) weight of each ref on each image token: Gaussian falloff (soft_masks) or its hard box."""
        valid = refs.valid[..., None]
        if self.cfg.soft_masks:
            return gaussian_token_mask(refs.bboxes, grid, self.cfg.soft_sigma).to(refs.clip.dtype) * valid
        return (bbox_token_mask(refs.bboxes, grid) & valid).to(refs.clip.dtype)

    def prepare(self, refs: RefBatch, grid: tuple[int, int], text_len: int) -> Conditioning:
        """Everything that does not depend on the noisy latent, for an (H, W) image-token grid."""
        if refs.num_refs > self.cfg.max_refs:
            message = f"more than the adapter takes (its config's max_refs is {self.cfg.max_refs})"
            raise ValidationError([Problem("refs", refs.num_refs, message)])
        dtype = refs.clip.dtype
        valid = refs.valid
        alpha = self.alpha_predictor(refs.clip, bbox_area(refs.bboxes), refs.depth)  # (B, R)
        alpha = alpha * valid  # padded refs carry no weight anywhere
        instance = self.instance_encoder(refs.bboxes, refs.clip, refs.dino, alpha)  # (B, R, D)

        hard = bbox_token_mask(refs.bboxes, grid) & valid[..., None]  # (B, R, N)
        soft = self.modulation_masks(refs, grid)
        foreground = valid & (alpha >= 0.5)
        b, r, _ = hard.shape
        text = (
            refs.text_spans.to(dtype) * valid[..., None]
            if refs.text_spans is not None
            else soft.new_zeros(b, r, text_len)
        )
        counts = hard.sum(-1, keepdim=True).clamp(min=1)
        priority = None
        if self.cfg.uses_occlusion_priority:
            priority = occlusion_priority(refs.depth, valid, self.cfg.depth_priority, self.cfg.order_priority)  # (B, R)
        box_frame = self.uses_box_positions or self.uses_box_patches
        coords = box_token_coords(refs.bboxes, grid) if box_frame else None  # (B, R, N, 2)
        patches = extent = None
        if self.uses_box_patches:
            if refs.dino_patches is None:
                raise ValueError(
                    f"box patches are on (box_patch_rank={self.cfg.box_patch_rank}) but the refs carry no DINO "
                    "patch tokens (RefBatch.dino_patches)"
                )
            patches, extent = refs.dino_patches, token_extent(refs.bboxes, grid)  # (B, R, P, G), (B, R, 2)
        return Conditioning(
            alpha=alpha,
            valid=valid,
            foreground=foreground,
            layout_tokens=self.layout_head(instance, alpha),
            shared_offsets=self.modulation_head.shared_offset(instance),
            pool_weights=hard.to(dtype) / counts,
            image_regions=build_regions(soft, alpha, priority),
            text_regions=build_regions(text, alpha) if refs.text_spans is not None else None,
            # Background refs do not modulate single blocks: grouping on foreground masks only merges the tokens
            # that differ only in background boxes (same temb), so fewer AdaLN rows, same values and gradients.
            joint_regions=build_regions(
                torch.cat([text, soft], dim=-1) * foreground[..., None], alpha * foreground, priority
            ),
            packing=build_packing(hard, valid, coords, priority),
            grid=grid,
            ref_patches=patches,
            token_extent=extent,
        )
