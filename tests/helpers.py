"""Test helpers: tiny random-init configs of the real diffusers FLUX class (never mocks), random scenes."""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from hypothesis import HealthCheck, settings
from torch.utils._python_dispatch import TorchDispatchMode

from moviepostproduction.compose.assemble import attend_rows, image_qkv
from moviepostproduction.compose.assemble_rows import pack_rows
from moviepostproduction.compose.conditioning import LayoutPacking, RefBatch
from moviepostproduction.compose.modules import PRESETS, ConditioningConfig
from moviepostproduction.sampling import latent_image_ids, text_ids
from moviepostproduction.vary.nanodit import PRESETS as NANODIT_PRESETS


def copy_with_index(model_dir: Path, target: Path, **fields) -> Path:
    """A copy of `model_dir` whose model_index.json has `fields` set."""
    shutil.copytree(model_dir, target)
    index = json.loads((target / "model_index.json").read_text())
    (target / "model_index.json").write_text(json.dumps({**index, **fields}))
    return target


def make_tiny_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    cfg = PRESETS["tiny"]
    torch.manual_seed(seed)
    kwargs = dict(
        patch_size=1,
        in_channels=64,
        num_layers=cfg.num_double_blocks,
        num_single_layers=cfg.num_single_blocks,
        attention_head_dim=16,
        num_attention_heads=cfg.hidden_dim // 16,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    kwargs.update(overrides)
    return FluxTransformer2DModel(**kwargs).eval()


def randomize_zero_inits(module: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every parameter random values so zero-initialised branches actually act (for invariant tests)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)


def flux_inputs(batch: int, grid: tuple[int, int], text_len: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    h, w = grid
    return dict(
        hidden_states=torch.randn(batch, h * w, 64, generator=gen),
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=gen),
        pooled_projections=torch.randn(batch, 16, generator=gen),
        timestep=torch.rand(batch, generator=gen),
        img_ids=latent_image_ids(h, w),
        txt_ids=text_ids(text_len),
        guidance=torch.full((batch,), 3.5),
    )


def random_refs(
    batch: int, refs: int, cfg: ConditioningConfig, seed: int = 0, counts: list[int] | None = None, text_len=None
) -> RefBatch:
    """Random boxes (each at least 1/8 of the image on each side), depths and features; `counts` pads samples."""
    gen = torch.Generator().manual_seed(seed)
    lo = torch.rand(batch, refs, 2, generator=gen) * 0.6
    size = 0.15 + torch.rand(batch, refs, 2, generator=gen) * 0.25
    bboxes = torch.cat([lo, (lo + size).clamp(max=1.0)], dim=-1)
    counts = counts or [refs] * batch
    valid = torch.arange(refs)[None, :] < torch.tensor(counts)[:, None]
    spans = None
    if text_len is not None:
        spans = torch.zeros(batch, refs, text_len, dtype=torch.bool)
        for r in range(refs):
            spans[:, r, 1 + r] = True
    return RefBatch(
        bboxes=bboxes,
        depth=torch.randint(0, 3, (batch, refs), generator=gen),
        valid=valid,
        clip=torch.randn(batch, refs, cfg.clip_dim, generator=gen),
        dino=torch.randn(batch, refs, cfg.dino_dim, generator=gen),
        text_spans=spans,
    )


def refs_at(
    bboxes: list[list[float]], cfg: ConditioningConfig, seed: int = 0, patches: torch.Tensor | None = None
) -> RefBatch:
    """One sample with a fg ref in each of `bboxes`, random features; `patches` (1, R, P, G): its DINO patch tokens."""
    gen = torch.Generator().manual_seed(seed)
    r = len(bboxes)
    return RefBatch(
        bboxes=torch.tensor([bboxes]),
        depth=torch.zeros(1, r, dtype=torch.long),
        valid=torch.ones(1, r, dtype=torch.bool),
        clip=torch.randn(1, r, cfg.clip_dim, generator=gen),
        dino=torch.randn(1, r, cfg.dino_dim, generator=gen),
        dino_patches=patches,
    )


def trained_assemble_part(cfg: ConditioningConfig, refs: RefBatch, part: str, grid=(8, 8), text_len: int = 6):
    """One backward pass of a tiny model through Assemble-Attn: returns the conditioning and the gradient reaching the
    (zero-init) `out` weight of layout block 0's `part` ("position", "patches")."""
    from moviepostproduction.compose.flux import ConditionedFlux
    from moviepostproduction.compose.modules import CompositionAdapter

    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(cfg))
    cond = model.prepare(refs, grid, text_len)
    model(**flux_inputs(1, grid, text_len), conditioning=cond).square().mean().backward()
    return cond, getattr(model.adapter.assemble["0"], part).out.weight.grad


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random tiny FLUX-like AutoencoderKL (8x down, 16 latent channels, FLUX's latent scale and shift)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ).eval()


class HostSyncCounter(TorchDispatchMode):
    """Counts the aten calls that make the host wait for the device on a GPU: a tensor read as a Python number
    (`.item()`, `bool()`, `int()`, `float()`), `nonzero`, `unique`, `masked_select` and boolean-mask indexing. Runs on
    the CPU too, so tests can pin how many a step makes."""

    SYNCING = frozenset(
        {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
        | {f"aten.{op}.default" for op in ("_unique2", "unique_dim", "unique_consecutive")}
    )

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masks = args[1] if name == "aten.index.Tensor" else ()
        if name in self.SYNCING or any(m is not None and m.dtype == torch.bool for m in masks):
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


# Per-group references of the batched Assemble-Attn (`compose.assemble.assemble_residual` equals
# `scatter_mean(out_proj(assemble_attention(...)))` on the covered tokens: the projections are affine).
def assemble_attention(
    attn,
    image: torch.Tensor,
    layout_tokens: torch.Tensor,
    packing: LayoutPacking,
    rope: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Each group's attended image tokens after the block's output projection: (G, L, D).

    attn: the double block's FluxAttention; image (B, N, D): the normalised tokens its attention saw;
    layout_tokens (B, R, D); rope: (cos, sin) each (N, hd) for the image tokens.
    """
    rows = pack_rows(packing, image.shape[0] * image.shape[1])
    attended = torch.cat(attend_rows(attn, image_qkv(attn, image), layout_tokens, packing, rows, rope))  # (slots, D)
    return attn.to_out[1](attn.to_out[0](attended[rows.group_slots]))  # (G, L, D)


def scatter_mean(values: torch.Tensor, packing: LayoutPacking, shape: tuple[int, int, int]) -> torch.Tensor:
    """(G, L, D) group outputs -> (B, N, D), averaged where boxes overlap (weighted by the occlusion priority
    when the packing has one), zero outside every box."""
    b, n, d = shape
    real = packing.key_mask[:, 1:]  # (G, L)
    weighted = packing.weighted(values[real])
    total = values.new_zeros(b * n, d).index_add_(0, packing.token_index[real], weighted)
    cover = torch.where(packing.cover > 0, packing.denominator(), 1.0).reshape(b * n, 1).to(values.dtype)
    return (total / cover).view(b, n, d)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example_scene(caption: str, size: tuple[int, int], refs: list[tuple], **extra):
    """A scene over the example ref images: refs as (image under examples/, bbox, depth, caption); size (w, h)."""
    from moviepostproduction.scene import scene_from_dict

    listed = [{"image": i, "bbox": list(b), "depth": d, "caption": c} for i, b, d, c in refs]
    data = {"caption": caption, "width": size[0], "height": size[1], "refs": listed, **extra}
    return scene_from_dict(data, base_dir=EXAMPLES)


def fuzz(examples: int) -> settings:
    """Hypothesis settings of the fuzz suites: derandomized, so that CI sees the same `examples` every run
    (MPP_FUZZ_RANDOM=1 explores new ones), no deadline, no example database."""
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not os.environ.get("MPP_FUZZ_RANDOM"),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def invoke_cli(args: list[str]):
    """`mpp ARGS` through typer's CliRunner; the logging handler the app's callback adds (bound to this call's
    captured stderr, closed afterwards) is removed, so a later call's warnings do not go to a closed stream."""
    import logging

    from typer.testing import CliRunner

    from moviepostproduction.cli import app

    before = list(logging.root.handlers)
    try:
        return CliRunner().invoke(app, args)
    finally:
        for handler in set(logging.root.handlers) - set(before):
            logging.root.removeHandler(handler)


# The tiny dir's encoders: T5 32 wide, DINO 40 wide with 16 patches; its VAE: 16 latent channels, 8x (32 px out).
TINY_DIR_NANODIT = NANODIT_PRESETS["tiny"].with_(
    in_channels=16, sample_size=4, text_dim=32, dino_dim=40, dino_patches=16
)


def tiny_dir_with_nanodit(folder: Path) -> Path:
    """A tiny random model dir (seed 0) with a NanoDiT of `TINY_DIR_NANODIT` in nanodit/, its zero-initialised
    branches and nulls made to act, so each input visibly matters."""
    from moviepostproduction.toyworld.tiny import write_tiny_model_dir
    from moviepostproduction.vary.nanodit import NanoDiT
    from moviepostproduction.vary.nanodit_io import save_nanodit_dir

    root = write_tiny_model_dir(folder, seed=0)
    torch.manual_seed(0)
    model = NanoDiT(TINY_DIR_NANODIT)
    randomize_zero_inits(model, std=0.2)
    save_nanodit_dir(model, root / "nanodit")
    return root
