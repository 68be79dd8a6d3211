"""Assemble-Attn where FLUX really runs: whole forwards on either plan, bounded memory on large boxes, diffusers'
attention backends, quantized (torchao int8, bitsandbytes nf4) and accelerate-offloaded output projections."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moviepostproduction.bench.setup import bench_refs
from moviepostproduction.compose import assemble_shared
from moviepostproduction.compose.assemble import assemble_residual, image_qkv
from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.sampling import latent_image_ids

from helpers import flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits

GRID, TEXT = (8, 8), 6


def build(cfg, path: str = "auto", refs: int | None = None) -> ConditionedFlux:
    torch.manual_seed(0)
    cfg = cfg if refs is None else cfg.with_(max_refs=refs)
    model = ConditionedFlux(make_tiny_flux(), CompositionAdapter(cfg), assemble_path=path)
    randomize_zero_inits(model.adapter, std=0.1)
    return model.eval()


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes held by tensors created inside the mode (by storage: views count once), and the
    largest single one."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.seen: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.seen:
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                self.seen.add(key)
                self.live += nbytes
                self.largest = max(self.largest, nbytes)
                weakref.finalize(storage, self._free, key, nbytes)
        self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("path", ["shared", "buckets"])
def test_whole_forward_equals_on_either_plan(tiny_cfg, path):
    """Two samples (one padded), 5 random refs: the forced plan gives the velocity of the other, to fp32 rounding."""
    model = build(tiny_cfg, path)
    other = build(tiny_cfg, "buckets" if path == "shared" else "shared")
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 5, tiny_cfg, seed=3, counts=[5, 3], text_len=TEXT)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        assert (cond.rows.shared is not None) == (path == "shared")
        out = model(**inputs, conditioning=cond)
        want = other(**inputs, conditioning=other.prepare(refs, GRID, TEXT))
        plain = model(**inputs)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out - plain).abs().max() > 1e-3  # the branch acts


def test_large_boxes_at_4096_tokens_keep_masks_and_working_memory_bounded(tiny_cfg, monkeypatch):
    """50 refs of 25-100 % of the frame each at 4096 tokens: the plan is the shared one, its mask is the (M, G)
    membership, and the branch holds at most one query chunk of scores (made small here) beside its inputs, where
    the size buckets' (slots x slots) masks of the past were hundreds of MB."""
    cfg = tiny_cfg.with_(max_refs=50)
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(), CompositionAdapter(cfg)).eval()
    randomize_zero_inits(model.adapter, std=0.1)
    grid, n = (64, 64), 4096
    refs = bench_refs(50, cfg, 0.5, TEXT, seed=50, boxes="large")
    monkeypatch.setattr(assemble_shared, "CHUNK_BYTES", 2**20)
    attn, out_proj = model.transformer.transformer_blocks[0].attn, model.adapter.assemble["0"]
    image = torch.randn(1, n, cfg.hidden_dim)
    rope = model.transformer.pos_embed(latent_image_ids(*grid))
    with torch.no_grad():
        cond = model.prepare(refs, grid, TEXT)
        rows = cond.rows
        assert rows.shared is not None and rows.buckets == ()
        m, g = rows.covered.numel(), cond.packing.num_groups
        assert rows.mask_bytes == m * g * 4 <= 2**20  # 0.8 MiB
        sum_squares = int((cond.packing.key_mask.sum(1) ** 2).sum())
        assert sum_squares > 10 * m * m  # per-group attention would cost 10x one attention over the covered tokens
        qkv = image_qkv(attn, image)
        with LiveBytes() as memory:
            out = assemble_residual(attn, out_proj, qkv, cond.layout_tokens, cond.packing, rows, rope)
    assert out.shape == (m, cfg.hidden_dim)
    inputs = 3 * m * cfg.hidden_dim * 4  # covered q, k, v (the same again, in fp32 and rotated, are held too)
    assert memory.largest <= 2**20 * 1.1 and memory.peak <= 2 * 2**20 + 6 * inputs + 4 * rows.mask_bytes


@pytest.mark.parametrize("backend", ["_native_math", "_native_flash"])
def test_bucket_calls_go_through_the_attention_backend_the_block_uses(tiny_cfg, backend):
    """`set_attention_backend` reaches Assemble-Attn; a backend without masks (flash) gets rows cut to their length."""
    from diffusers.models import attention_dispatch

    model = build(tiny_cfg, "buckets", refs=9)
    model.assemble_calls = 1  # one padded call
    inputs = flux_inputs(1, GRID, TEXT)
    refs = random_refs(1, 9, tiny_cfg.with_(max_refs=9), seed=9)
    registry = attention_dispatch._AttentionBackendRegistry
    active = registry._active_backend  # set_attention_backend also sets diffusers' process-wide backend
    seen = []
    original = attention_dispatch.dispatch_attention_fn

    def spy(*args, backend=None, **kwargs):
        seen.append((backend, kwargs.get("attn_mask") is not None))
        return original(*args, backend=backend, **kwargs)

    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
        padded = [b for b in cond.rows.buckets if b.padded]
        assert padded  # 9 groups of several lengths in one call: some rows are shorter than the bucket's
        want = model(**inputs, conditioning=cond)
        try:
            model.transformer.set_attention_backend(backend)
            attention_dispatch.dispatch_attention_fn = spy
            got = model(**inputs, conditioning=cond)
        finally:
            attention_dispatch.dispatch_attention_fn = original
            registry.set_active_backend(active)
    assert seen and all(str(b.value if hasattr(b, "value") else b) == backend for b, _ in seen)
    assert any(masked for _, masked in seen) == (backend == "_native_math")
    if backend == "_native_flash":  # one call per row of a padded bucket, each without padding
        per_block = len(cond.rows.buckets) - len(padded) + sum(b.source.shape[0] for b in padded)
        assert len(seen) == len(model.adapter.assemble) * per_block
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _quantize_torchao(model: ConditionedFlux) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model.transformer, Int8WeightOnlyConfig())
    quantize_(model.adapter.assemble, Int8WeightOnlyConfig())


def _nf4(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def _quantize_bnb(model: ConditionedFlux) -> None:
    for block in model.transformer.transformer_blocks:
        block.attn.to_out[0] = _nf4(block.attn.to_out[0])
    for part in model.adapter.assemble.values():
        part.out = _nf4(part.out)


def _offload(model: ConditionedFlux) -> None:
    from accelerate import cpu_offload

    cpu_offload(model.transformer, execution_device=torch.device("cpu"))
    cpu_offload(model.adapter.assemble, execution_device=torch.device("cpu"))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("prepare", [_quantize_torchao, _quantize_bnb, _offload], ids=["int8", "nf4", "offload"])
def test_quantized_or_offloaded_projections_run_their_own_modules(tiny_cfg, prepare):
    """Sampling fuses to_out and AssembleAttention.out only for plain dense weights on the compute device; quantized
    and offloaded ones are called as modules, giving what the two-step path gives under autograd."""
    model = build(tiny_cfg, "buckets")
    inputs = flux_inputs(1, GRID, TEXT)
    refs = random_refs(1, 3, tiny_cfg, seed=1, text_len=TEXT)
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
    prepare(model)
    weight = model.transformer.transformer_blocks[0].attn.to_out[0].weight
    assert type(weight) not in (torch.Tensor, nn.Parameter) or weight.device.type == "meta"  # not plain and dense
    with torch.no_grad():
        sampled = model(**inputs, conditioning=cond)
    with torch.enable_grad():
        two_step = model(**inputs, conditioning=cond).detach()
    assert not hasattr(model.adapter.assemble["0"], "_fused_out")
    torch.testing.assert_close(sampled, two_step, rtol=1e-5, atol=1e-5)
