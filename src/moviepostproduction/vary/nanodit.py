"""NanoDiT: the small velocity model behind `mpp vary` (seed 003, DESIGN 7 "vary").

A DiT (Peebles & Xie 2023) whose blocks cross-attend to one concatenated context
[text tokens (T), projected DINO CLS token (1), projected DINO patch tokens (P)] under a key mask that
combines text padding with classifier-free-guidance dropout. adaLN-Zero is driven by the projected DINO CLS
plus the timestep embedding. A dropped part is replaced by a learned null embedding: dropped text becomes one
null token (the rest masked), a dropped image replaces the CLS (in adaLN and in the context) *and* the patches.
The model is a pure velocity predictor: schedules and guidance live in `sampling.py` and the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from moviepostproduction.errors import Problem, ValidationError
from moviepostproduction.vary.layers import DiTBlock, FinalLayer, TimestepEmbedder, sincos_2d

__all__ = ["PRESETS", "NanoDiT", "NanoDiTConfig", "NanoDiTValueError", "VaryConditioning"]


class NanoDiTValueError(ValidationError, ValueError):
    """A bad NanoDiT config or input: an `MppError` for the CLI and a `ValueError` for library callers."""


@dataclass(frozen=True)
class NanoDiTConfig:
    """Sizes of a NanoDiT. Defaults are the seed's model (768 wide, T5-XXL text, DINOv3-L 14x14 patches)."""

    in_channels: int = 16  # latent channels (3 for a pixel-space model); the output has the same
    sample_size: int = 32  # default latent side for the pipeline; forward accepts any multiple of patch_size
    patch_size: int = 2
    hidden_size: int = 768  # D
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    text_dim: int = 4096  # Dt: text-encoder width
    dino_dim: int = 1024  # G: DINO CLS / patch width
    dino_patches: int = 196  # P: DINO patch tokens (fixed: the learned null patches have this length)
    qk_norm: bool = True

    def __post_init__(self) -> None:
        problems = [
            Problem(f.name, getattr(self, f.name), "must be an integer >= 1")
            for f in fields(self)
            if f.type == "int" and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 1)
        ]
        if not problems:
            if self.hidden_size % self.num_heads:
                problems.append(
                    Problem("hidden_size", self.hidden_size, f"not divisible by num_heads {self.num_heads}")
                )
            if self.hidden_size % 4:
                problems.append(Problem("hidden_size", self.hidden_size, "must be a multiple of 4 (2-D sin-cos)"))
            if self.sample_size % self.patch_size:
                problems.append(Problem("sample_size", self.sample_size, f"not a multiple of patch {self.patch_size}"))
        if not self.mlp_ratio > 0:
            problems.append(Problem("mlp_ratio", self.mlp_ratio, "must be > 0"))
        if problems:
            raise NanoDiTValueError(problems, source="NanoDiTConfig")

    def with_(self, **changes: object) -> NanoDiTConfig:
        return replace(self, **changes)


_BASE = NanoDiTConfig()
PRESETS: dict[str, NanoDiTConfig] = {
    "base": _BASE,
    # DiT-S widths; real encoders (T5-XXL, DINOv3-L at 224 px).
    "small": _BASE.with_(hidden_size=384, num_heads=6),
    # The toy world: 64 x 64 images -> 8 x 8 x 16 latents, one token per latent pixel (64 tokens); encoder
    # widths match the tiny encoder configs in tiny.py (T5 32, DINO 40 with 32 px / 8 px patches = 16).
    "toy": _BASE.with_(
        sample_size=8, patch_size=1, hidden_size=256, depth=6, num_heads=4, text_dim=32, dino_dim=40, dino_patches=16
    ),
    # The shipped toy NanoDiT: the toy preset narrowed so that it trains on a 2-core CPU in minutes.
    "toy-cpu": _BASE.with_(
        sample_size=8, patch_size=1, hidden_size=128, depth=4, num_heads=4, text_dim=32, dino_dim=40, dino_patches=16
    ),
    # Unit tests: a few thousand parameters.
    "tiny": _BASE.with_(
        in_channels=4,
        sample_size=8,
        hidden_size=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        text_dim=16,
        dino_dim=24,
        dino_patches=4,
    ),
}


@dataclass
class VaryConditioning:
    """Precomputed encoder features for NanoDiT; the encoders stay outside the model."""

    text: torch.Tensor  # (B, T, Dt) text-encoder hidden states
    text_mask: torch.Tensor  # (B, T) bool, True on real tokens
    cls: torch.Tensor  # (B, G) DINO CLS of the reference image
    patches: torch.Tensor  # (B, P, G) DINO patch tokens of the reference image

    @property
    def batch_size(self) -> int:
        return self.text.shape[0]

    def repeat(self, n: int) -> VaryConditioning:
        """n copies along the batch: (n * B, ...), copy-major (all of copy 0, then copy 1, ...)."""
        return VaryConditioning(*(torch.cat([v] * n) for v in (self.text, self.text_mask, self.cls, self.patches)))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> VaryConditioning:
        """Move everything; cast the features (never the bool mask) to `dtype`."""
        return VaryConditioning(
            self.text.to(device=device, dtype=dtype),
            self.text_mask.to(device=device),
            self.cls.to(device=device, dtype=dtype),
            self.patches.to(device=device, dtype=dtype),
        )


class NanoDiT(nn.Module):
    def __init__(self, config: NanoDiTConfig):
        super().__init__()
        self.config = config
        d, p, c = config.hidden_size, config.patch_size, config.in_channels
        self.x_embedder = nn.Linear(p * p * c, d)  # patchify as a linear map on (p p c) vectors, as a stride-p conv
        self.t_embedder = TimestepEmbedder(d)
        self.text_proj = nn.Linear(config.text_dim, d)
        self.cls_proj = nn.Linear(config.dino_dim, d)  # shared by adaLN and the CLS context token (seed 003)
        # Everything named `patch_*` is new relative to the pre-patch checkpoint (warm start allow-list).
        self.patch_proj = nn.Linear(config.dino_dim, d)
        self.text_null = nn.Parameter(torch.empty(config.text_dim))  # one null token replaces dropped text
        self.cls_null = nn.Parameter(torch.empty(config.dino_dim))
        self.patch_null = nn.Parameter(torch.empty(config.dino_patches, config.dino_dim))
        self.blocks = nn.ModuleList(
            DiTBlock(d, config.num_heads, config.mlp_ratio, config.qk_norm) for _ in range(config.depth)
        )
        self.final_layer = FinalLayer(d, p, c)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self, generator: torch.Generator | None = None) -> None:
        """Every parameter's init, in one place (DiT `initialize_weights`, plus the null embeddings)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02, generator=generator)
        # Null embeddings start at zero (seed 003) and are learned from the dropped samples.
        for null in (self.text_null, self.cls_null, self.patch_null):
            nn.init.zeros_(null)
        # adaLN-Zero: every gate is 0, so each block is the identity at init ...
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        # ... and the output layer is 0, so the initial velocity is exactly 0 (DiT section 3.2).
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.x_embedder.weight.device

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        *,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        cls: torch.Tensor,
        patches: torch.Tensor,
        drop_text: torch.Tensor | None = None,
        drop_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity v = noise - x0 at x_t.

        x (B, C, H, W), t (B,) in [0, 1], text (B, T, Dt), text_mask (B, T) bool or None (all real),
        cls (B, G), patches (B, P, G), drop_text / drop_image (B,) bool or None (keep) -> v (B, C, H, W).
        """
        self._check_inputs(x, t, text, text_mask, cls, patches, drop_text, drop_image)
        b, _, height, width = x.shape
        p, dtype = self.config.patch_size, self.dtype
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=x.device)
        text, text_mask, cls, patches = self._apply_dropout(
            text.to(dtype), text_mask, cls.to(dtype), patches.to(dtype), drop_text, drop_image
        )

        tokens = rearrange(x.to(dtype), "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)
        pos = sincos_2d(height // p, width // p, self.config.hidden_size, device=x.device).to(dtype)  # (N, D)
        h = self.x_embedder(tokens) + pos  # (B, N, D)

        cls_token = self.cls_proj(cls)  # (B, D)
        c = cls_token + self.t_embedder(t)  # (B, D) adaLN input
        context = torch.cat(
            [self.text_proj(text), cls_token.unsqueeze(1), self.patch_proj(patches)], dim=1
        )  # (B, T + 1 + P, D)
        image_keys = torch.ones(b, 1 + patches.shape[1], dtype=torch.bool, device=x.device)  # CLS + patches
        key_mask = torch.cat([text_mask, image_keys], dim=1)  # (B, T + 1 + P); never all False (CLS)

        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, context, key_mask, use_reentrant=False)
            else:
                h = block(h, c, context, key_mask)  # (B, N, D)
        out = self.final_layer(h, c)  # (B, N, p * p * C)
        return rearrange(out, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=height // p, p1=p, p2=p)

    def _apply_dropout(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        cls: torch.Tensor,
        patches: torch.Tensor,
        drop_text: torch.Tensor | None,
        drop_image: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace dropped parts by the null embeddings; dropped values cannot reach the output."""
        if drop_text is not None:
            null_mask = torch.zeros_like(text_mask)
            null_mask[:, 0] = True  # the null token sits at position 0, every other text key is masked
            text = torch.where(drop_text[:, None, None], self.text_null, text)  # (B, T, Dt)
            text_mask = torch.where(drop_text[:, None], null_mask, text_mask)  # (B, T)
        if drop_image is not None:  # CLS and patches always go together (seed 003)
            cls = torch.where(drop_image[:, None], self.cls_null, cls)  # (B, G)
            patches = torch.where(drop_image[:, None, None], self.patch_null, patches)  # (B, P, G)
        return text, text_mask, cls, patches

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        cls: torch.Tensor,
        patches: torch.Tensor,
        drop_text: torch.Tensor | None,
        drop_image: torch.Tensor | None,
    ) -> None:
        """Shapes and dtypes, all problems at once, each naming the argument and the shape it got."""
        cfg, problems = self.config, []
        p = cfg.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % p or x.shape[3] % p:
            expected_x = f"expected (B, {cfg.in_channels}, H, W) with H and W multiples of {p}"
            problems.append(Problem("x", tuple(x.shape), expected_x))
        b = x.shape[0]
        expected = {
            "t": (t, (b,)),
            "cls": (cls, (b, cfg.dino_dim)),
            "patches": (patches, (b, cfg.dino_patches, cfg.dino_dim)),
        }
        if text.ndim != 3 or text.shape[0] != b or text.shape[1] < 1 or text.shape[2] != cfg.text_dim:
            problems.append(Problem("text", tuple(text.shape), f"expected ({b}, T >= 1, {cfg.text_dim})"))
        elif text_mask is not None:
            expected["text_mask"] = (text_mask, tuple(text.shape[:2]))
        for name, value in (("drop_text", drop_text), ("drop_image", drop_image)):
            if value is not None:
                expected[name] = (value, (b,))
        for name, (value, shape) in expected.items():
            if tuple(value.shape) != shape:
                problems.append(Problem(name, tuple(value.shape), f"expected shape {shape}"))
        for name, value in (("text_mask", text_mask), ("drop_text", drop_text), ("drop_image", drop_image)):
            if value is not None and value.dtype != torch.bool:
                problems.append(Problem(name, value.dtype, "must be a bool tensor"))
        if problems:
            raise NanoDiTValueError(problems, source="NanoDiT.forward")
