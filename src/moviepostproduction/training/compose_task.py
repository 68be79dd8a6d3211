"""`ComposeTask`: trains `ConditionedFlux` (adapter, and for the toy world the backbone too) on cached features.

One micro-batch: noise the cached clean latents at logit-normal times, predict the velocity with the scene's
refs, and add the stage's auxiliary losses (DESIGN 5) on a random subset of micro-batches, drawn from the
step generator so resume stays exact: identity and bbox alignment decode the predicted x0 through the frozen
VAE and read it with the frozen DINO; region preservation re-runs the model with a random subset of refs
dropped. Refs are dropped as a whole for `drop_refs` of the samples, so the model also generates without refs;
the caption is replaced by the empty one for `drop_caption` of them (spans cleared, refs kept), which is what true
CFG with the negative prompt "" runs as its other branch.

A bucketed cache (resolution buckets) holds samples of several token grids: every batch comes from one bucket, and
the grid each step, loss and preview uses is its batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from moviepostproduction.compose.conditioning import RefBatch
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.layout import bbox_token_mask
from moviepostproduction.sampling import (
    denoise,
    get_timesteps,
    latent_image_ids,
    noise_latents,
    text_ids,
    unpack_latents,
)
from moviepostproduction.training.feature_cache import FeatureCache
from moviepostproduction.training.feature_shards import ShardedFeatures
from moviepostproduction.training.losses import (
    bbox_alignment_loss,
    crop_boxes,
    flow_loss,
    identity_loss,
    predicted_x0,
    region_preservation_loss,
    sample_times,
)
from moviepostproduction.training.stages import get_stage
from moviepostproduction.training.task import LossOutput

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass
class ComposeTaskConfig:
    batch_size: int = 16
    batch_tokens: int | None = None  # a batch of token grid (h, w) holds max(1, batch_tokens // (h w)) samples instead
    drop_refs: float = 0.1  # samples trained with no refs at all
    drop_caption: float = 0.0  # samples trained with the empty caption instead of theirs (true CFG, negative "")
    aux_prob: float = 0.25  # micro-batches that also get identity / bbox losses (they decode x0)
    aux_samples: int = 4  # samples of such a micro-batch that are decoded
    region_prob: float = 0.25  # micro-batches that also get the region-preservation loss
    lora_rank: int = 16  # stages with backbone="lora"
    sample_steps: int = 12
    num_preview: int = 4  # scenes in the sample grid
    inference_steps: int = 28  # where the layout window ends in t (grounding_ratio of these steps)


class ComposeTask:
    name = "compose"

    def __init__(
        self,
        model: ConditionedFlux,
        cache: FeatureCache | ShardedFeatures,  # in memory (small sets) or the sharded cache of a run
        vae: nn.Module | None = None,
        image_encoder: nn.Module | None = None,
        config: ComposeTaskConfig | None = None,
        preview: FeatureCache | ShardedFeatures | None = None,
        empty_caption: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.model, self.cache, self.vae, self.image_encoder = model, cache, vae, image_encoder
        self.config = config or ComposeTaskConfig()
        if self.config.drop_caption > 0 and empty_caption is None:
            raise ValueError("drop_caption > 0 needs the empty caption's (T5 (1, T, d), pooled (1, d)) embeddings")
        self.empty_caption = empty_caption
        if model.adapter.uses_box_patches and not cache.has_patches:
            raise ValueError(
                "the adapter lays DINO patch tokens into boxes (box_patch_rank > 0) but the feature cache holds none "
                "(built for an adapter without box patches): delete the run's cache/ to rebuild it"
            )
        self.preview = preview or cache
        self.weights: dict[str, float] = {}
        self.guidance = bool(model.transformer.config.guidance_embeds)
        self.layout_t: float | None = None  # a value here replaces `layout_start` at every grid (tests)

    def layout_start(self, grid: tuple[int, int]) -> float:
        """Where the layout window ends in t for a batch of token `grid`: the time of step ceil(grounding_ratio *
        (steps - 1)) of the inference schedule, whose shift follows the image's token count."""
        if self.layout_t is not None:
            return self.layout_t
        h, w = grid
        ratio = self.model.adapter.cfg.grounding_ratio
        steps = get_timesteps(self.config.inference_steps, image_seq_len=h * w)
        return 0.0 if ratio >= 1 else float(steps[math.ceil(ratio * (len(steps) - 1))])

    # ---------------------------------------------------------------------------------------- protocol
    def modules(self) -> dict[str, nn.Module]:
        """The trained backbone and adapter, and the frozen VAE and image encoder the decoded losses and sample grids
        run (the trainer moves every one to its device; only trained parameters go into checkpoints)."""
        frozen = {"vae": self.vae, "image_encoder": self.image_encoder}
        return {
            "transformer": self.model.transformer,
            "adapter": self.model.adapter,
            **{name: module for name, module in frozen.items() if module is not None},
        }

    def param_groups(self, stage: str) -> list[dict]:
        spec = get_stage(stage)
        self.weights = dict(spec.losses)
        if self.vae is None or self.image_encoder is None:  # decoded losses need the frozen VAE and DINO
            self.weights = {k: v for k, v in self.weights.items() if k == "region"}
        self.model.requires_grad_(False)
        tr = self.model.transformer
        if spec.backbone == "lora":
            if not getattr(tr, "peft_config", None):
                from peft import LoraConfig

                tr.add_adapter(
                    LoraConfig(
                        r=self.config.lora_rank,
                        lora_alpha=self.config.lora_rank,
                        target_modules=list(LORA_TARGETS),
                        init_lora_weights=True,
                    )
                )
            for name, p in tr.named_parameters():
                p.requires_grad_("lora_" in name)
        elif spec.backbone == "full":
            tr.requires_grad_(True)
        for part in spec.adapter_parts:
            getattr(self.model.adapter, part).requires_grad_(True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:  # a LoRA added to (or loaded into) a bf16 backbone comes in bf16: trained weights are fp32
            p.data = p.data.float()
        return [{"params": params, "lr": spec.lr}]

    def batches(self, epoch: int, seed: int):
        """Batches of sample indices in a random order of (seed, epoch), each of one token grid, `batch_size` samples
        (or `batch_size_of` the grid with `batch_tokens`). Of a bucketed cache: the order is walked and each sample
        joins its bucket's open batch, which is yielded when full, so the buckets interleave at random and a bucket's
        last `len % size` samples of the epoch are left out (as the remainder of the whole order is for a cache of
        one grid, whose batches this rule leaves as they were)."""
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        order = torch.randperm(len(self.cache), generator=g)
        grids = self.cache.sample_grids()  # (N, 2)
        if bool((grids == grids[:1]).all()):
            bs = self.batch_size_of(tuple(grids[0].tolist())) if len(grids) else self.config.batch_size  # empty: none
            for i in range(0, len(order) - bs + 1, bs):
                yield order[i : i + bs]
            return
        keys = (grids[:, 0] * (int(grids[:, 1].max()) + 1) + grids[:, 1]).tolist()  # one int per grid
        sizes = {key: self.batch_size_of(tuple(grid)) for key, grid in zip(keys, grids.tolist(), strict=True)}
        open_batches: dict[int, list[int]] = {}
        for i in order.tolist():
            batch = open_batches.setdefault(keys[i], [])
            batch.append(i)
            if len(batch) == sizes[keys[i]]:
                yield torch.tensor(batch)
                open_batches[keys[i]] = []

    def batch_size_of(self, grid: tuple[int, int]) -> int:
        """Samples in a batch of token `grid`: `batch_size`, or with `batch_tokens` as many as fit that many image
        tokens (at least 1), so that small buckets train on as many tokens a step as large ones."""
        tokens = self.config.batch_tokens
        return self.config.batch_size if tokens is None else max(1, tokens // (grid[0] * grid[1]))

    # -------------------------------------------------------------------------------------------- model
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def refs(self, batch: dict[str, torch.Tensor], valid: torch.Tensor) -> RefBatch:
        return RefBatch(
            bboxes=batch["bboxes"],
            depth=batch["depth"],
            valid=valid,
            clip=batch["clip"],
            dino=batch["dino"],
            text_spans=batch["spans"],
            dino_patches=batch.get("dino_patches"),
        )

    def forward(self, batch, x_t, t, cond, layout_active: bool) -> torch.Tensor:
        """The model on a cached batch with a prepared conditioning: velocity (B, N, C)."""
        h, w = cond.grid
        dev = x_t.device
        return self.model(
            x_t,
            batch["t5"],
            batch["pooled"],
            t,
            latent_image_ids(h, w, device=dev),
            text_ids(batch["t5"].shape[1], device=dev),
            torch.ones_like(t) if self.guidance else None,
            conditioning=cond,
            layout_active=layout_active,
        )

    def velocity(self, batch, grid, x_t, t, valid, layout_active: bool) -> tuple[torch.Tensor, object]:
        cond = self.model.prepare(self.refs(batch, valid), grid, batch["t5"].shape[1])
        return self.forward(batch, x_t, t, cond, layout_active), cond

    def loss(self, index: torch.Tensor, generator: torch.Generator) -> LossOutput:
        cfg, dev = self.config, self.device
        batch = {k: v.to(dev) for k, v in self.cache.select(index).items()}
        grid = self.cache.grid_of(index)
        x0 = batch["latents"]
        b = x0.shape[0]
        noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(dev)
        t = sample_times(b, generator, generator.device).to(dev)
        keep = torch.rand(b, generator=generator, device=generator.device).to(dev) >= cfg.drop_refs
        valid = batch["valid"] & keep[:, None]
        if cfg.drop_caption > 0:  # drawn only then, so recipes without it keep their exact random stream
            batch = self.without_caption(
                batch, torch.rand(b, generator=generator, device=generator.device) < cfg.drop_caption
            )
        layout_active, layout_t = True, self.layout_start(grid)
        if layout_t > 0:  # the layout pathway only sees the times where inference runs it
            layout_active = bool(torch.rand((), generator=generator, device=generator.device) < 0.5)
            u = t * (1 - layout_t)
            t = layout_t + u if layout_active else t * layout_t
        x_t = noise_latents(x0, noise, t)
        v, cond = self.velocity(batch, grid, x_t, t, valid, layout_active)
        flow = flow_loss(v, x0, noise)
        total, logs = flow, {"flow": float(flow.detach())}
        draws = torch.rand(2, generator=generator, device=generator.device).tolist()
        if ("identity" in self.weights or "bbox" in self.weights) and draws[0] < cfg.aux_prob:
            aux = self.decoded_losses(batch, grid, x_t, v, t, cond, valid)
            for name, value in aux.items():
                total = total + self.weights[name] * value
                logs[name] = float(value.detach())
        if "region" in self.weights and draws[1] < cfg.region_prob and bool(valid.any()):
            dropped = valid & (torch.rand(valid.shape, generator=generator, device=generator.device).to(dev) < 0.5)
            with torch.no_grad():
                v_drop, _ = self.velocity(batch, grid, x_t, t, valid & ~dropped, layout_active)
            region = region_preservation_loss(v, v_drop, ~self.inside_boxes(batch, dropped, grid))
            total = total + self.weights["region"] * region
            logs["region"] = float(region.detach())
        return LossOutput(total, logs)

    def without_caption(self, batch: dict[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch with the samples where `drop` (B,) is set given the empty caption and no caption spans."""
        t5, pooled = self.empty_caption
        drop = drop.to(batch["t5"].device)
        return {
            **batch,
            "t5": torch.where(drop[:, None, None], t5.to(batch["t5"]), batch["t5"]),  # (B, T, d_t5)
            "pooled": torch.where(drop[:, None], pooled.to(batch["pooled"]), batch["pooled"]),  # (B, d_clip)
            "spans": batch["spans"] & ~drop[:, None, None],  # (B, R, T)
        }

    def inside_boxes(self, batch: dict[str, torch.Tensor], refs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, N) bool: tokens of the batch's token `grid` inside the box of any ref selected by `refs` (B, R)."""
        return (bbox_token_mask(batch["bboxes"], grid) & refs[..., None]).any(1)

    def decoded_losses(self, batch, grid, x_t, v, t, cond, valid) -> dict[str, torch.Tensor]:
        k = min(self.config.aux_samples, x_t.shape[0])
        h, w = grid
        x0_hat = predicted_x0(x_t[:k], v[:k], t[:k])
        pixels = self.vae.decode(unpack_latents(x0_hat, 2 * h, 2 * w)).clamp(-1, 1)  # (k, 3, H, W)
        alpha = cond.alpha[:k].detach()
        bboxes, ref_dino = batch["bboxes"][:k], batch["dino"][:k]
        out = {}
        if "identity" in self.weights:
            fg = (valid[:k] & cond.foreground[:k]).float()
            if bool(fg.any()):
                crops = crop_boxes(pixels, bboxes, max(self.image_encoder.dino_pre.output_hw))
                crop_dino = self.image_encoder.encode_pixels(crops).dino_cls.view(k, -1, ref_dino.shape[-1])
                out["identity"] = identity_loss(crop_dino, ref_dino, fg * alpha)
        if "bbox" in self.weights:
            weights = valid[:k].float() * (1 - alpha)
            if bool(weights.any()):
                patches = self.image_encoder.encode_pixels(pixels).dino_patches  # (k, P, G)
                side = math.isqrt(patches.shape[1])
                out["bbox"] = bbox_alignment_loss(patches, (side, side), ref_dino, bboxes, weights)
        return out

    # ------------------------------------------------------------------------------------------ samples
    @torch.no_grad()
    def generate(
        self, cache: FeatureCache | ShardedFeatures, index: torch.Tensor, generator: torch.Generator, steps: int
    ):
        """Sample latents for cached scenes -> pixels (B, 3, H, W) in [-1, 1] (layout for `grounding_ratio`)."""
        dev = self.device
        batch = {k: v.to(dev) for k, v in cache.select(index).items()}
        h, w = cache.grid_of(index)
        x = torch.randn(batch["latents"].shape, generator=generator, device=generator.device).to(dev)
        timesteps = get_timesteps(steps, image_seq_len=h * w)
        layout_steps = math.ceil(self.model.adapter.cfg.grounding_ratio * (len(timesteps) - 1))
        cond = self.model.prepare(self.refs(batch, batch["valid"]), (h, w), batch["t5"].shape[1])
        calls = {"n": 0}

        def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return self.forward(batch, x_t, t, cond, layout_active=calls["n"] <= layout_steps)

        out = denoise(velocity, x, timesteps)
        return self.vae.decode(unpack_latents(out, 2 * h, 2 * w)).clamp(-1, 1)

    def samples(self, generator: torch.Generator) -> Image.Image | None:
        if self.vae is None:
            return None
        from moviepostproduction.visualize import draw_layout, image_grid

        n = min(self.config.num_preview, len(self.preview))
        groups: dict[tuple[int, int], list[int]] = {}  # the first n scenes by token grid, generated a grid at a time
        for i, grid in enumerate(self.preview.sample_grids()[:n].tolist()):
            groups.setdefault(tuple(grid), []).append(i)
        tiles: list[Image.Image | None] = [None] * (2 * n)
        self.model.eval()
        for (h, w), members in groups.items():
            index = torch.tensor(members)
            pixels = self.generate(self.preview, index, generator, self.config.sample_steps)
            shown = self.preview.select(index)  # the cache's fields, padded (an in-memory or a sharded cache alike)
            target = self.vae.decode(unpack_latents(shown["latents"].to(self.device), 2 * h, 2 * w)).clamp(-1, 1)
            for j, i in enumerate(members):
                valid = shown["valid"][j]
                boxes = shown["bboxes"][j][valid].tolist()
                depths = [("fg", "mg", "bg")[d] for d in shown["depth"][j][valid].tolist()]
                for k, px in enumerate((target[j], pixels[j])):
                    img = Image.fromarray(((px + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy())
                    tiles[2 * i + k] = draw_layout(img, boxes, depths)
        self.model.train()
        return image_grid(tiles, columns=2)  # tiles of other buckets are resized to the first one's size
