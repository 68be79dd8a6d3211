"""FSDP2 on the shared trainer (issue 42 item 6): compose stage 1 (transformer LoRA + adapter trained, FLUX frozen) on a
tiny FLUX, 2 CPU processes (gloo) under FSDP train exactly as one process with twice the gradient accumulation, each
process taking its own random branches (auxiliary and region losses, drawn per micro-batch); a resume under FSDP
continues exactly; checkpoints are whole tensors in the same files as one process writes; the run ends with plain
modules holding whole weights (what the export reads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distributed_launch import launch
from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
from moviepostproduction.files import load_safetensors
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.toyworld.shards import write_dataset
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.training.cache_encoders import CacheEncoders
from moviepostproduction.training.feature_cache import write_cache

MAX_REFS, TEXT = 2, 32

SCRIPT = """
import sys
from pathlib import Path

import torch

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.encoders import ImageEncoder, Vae, load_transformer
from moviepostproduction.files import save_safetensors
from moviepostproduction.model_dir import ModelDir
from moviepostproduction.training.compose_task import ComposeTask, ComposeTaskConfig
from moviepostproduction.training.feature_shards import ShardedFeatures
from moviepostproduction.training.trainer import TrainConfig, Trainer

torch.set_num_threads(1)
model_dir, cache_dir, out, accum, steps = sys.argv[1:6]  # and the cache's max_refs
md = ModelDir.at(model_dir)
torch.manual_seed(0)
adapter = CompositionAdapter.from_pretrained(md.root / "adapter")
gen = torch.Generator().manual_seed(1)
with torch.no_grad():  # zero-initialised branches made to act, so every trained weight gets a gradient
    for p in adapter.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.05)
model = ConditionedFlux(load_transformer(md), adapter)
cache = ShardedFeatures(cache_dir, int(sys.argv[6]))
config = ComposeTaskConfig(batch_size=2, aux_prob=0.5, region_prob=0.5, aux_samples=1, sample_steps=1, num_preview=1,
                           lora_rank=4)
task = ComposeTask(model, cache, Vae.load(md), ImageEncoder.load(md), config=config)
cfg = TrainConfig(out_dir=out, max_steps=int(steps), grad_accum=int(accum), checkpoint_every=1, keep_checkpoints=1,
                  ema_decay=0.9, max_grad_norm=0.05, progress=False, tensorboard=False)
trainer = Trainer(task, cfg)
if trainer.accelerator.num_processes > 1:  # FSDP: frozen FLUX and trained LoRA / adapter weights are half per process
    from torch.distributed.tensor import DTensor

    frozen = model.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert trainer.engine.name == "fsdp" and all(isinstance(p, DTensor) for p in [frozen, *trainer.params])
    assert frozen.to_local().shape[0] == frozen.shape[0] // 2
trainer.run()
# What an export reads after the run: plain diffusers / adapter modules holding whole weights.
assert type(model.transformer).__name__ == "FluxTransformer2DModel", type(model.transformer)
assert type(model.transformer.transformer_blocks[0]).__name__ == "FluxTransformerBlock"
assert all(type(p) is torch.nn.Parameter for p in model.parameters())
assert all(p is q for p, q in zip(trainer.params, (p for p in model.parameters() if p.requires_grad)))
if trainer.accelerator.is_main_process:
    trained = {"adapter." + k: v for k, v in adapter.state_dict().items()}
    save_safetensors({k: v.contiguous() for k, v in trained.items()}, Path(out) / "final.safetensors")
"""

FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}  # what `accelerate launch` sets from fsdp.yaml


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny FLUX model dir and the feature cache of 9 toy scenes (8 for training: 4 batches of 2 per epoch)."""
    root = tmp_path_factory.mktemp("fsdp")
    md = ModelDir.at(write_tiny_model_dir(root / "model"))
    write_dataset(root / "data", 9, 3, ToyWorldConfig(size=32, ref_size=16, max_refs=MAX_REFS), shard_size=9)
    encoders = CacheEncoders.wrap(TextEncoder.load(md), image_encoder=ImageEncoder.load(md), vae=Vae.load(md))
    sizes = {"max_refs": MAX_REFS, "max_text_tokens": TEXT, "batch_size": 4, "shard_size": 8, "progress": False}
    write_cache(root / "data" / "train", root / "cache", encoders, meta={"model": str(md.root)}, **sizes)
    script = root / "train.py"
    script.write_text(SCRIPT)
    return root, md.root, script


def _checkpoint(out: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_safetensors(out / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors")


@pytest.mark.timeout(240)
def test_fsdp_two_processes_equal_one_with_double_accumulation_and_resume_exactly(world) -> None:
    root, model_dir, script = world

    def train(out: str, accum: int, steps: int, **how) -> None:
        launch(
            script, [str(model_dir), str(root / "cache"), str(root / out), str(accum), str(steps), str(MAX_REFS)], **how
        )

    train("one", accum=2, steps=4)  # 4 steps x 2 micro-batches
    train("two", accum=1, steps=2, processes=2, env=FSDP)
    train("two", accum=1, steps=4, processes=2, env=FSDP)  # resumed at step 2
    for name in ("trainable", "optimizer", "ema"):  # whole tensors, the same keys as one process writes
        one, two = _checkpoint(root / "one", 4, name), _checkpoint(root / "two", 4, name)
        assert one.keys() == two.keys() and any(".lora_A." in k for k in one) and any("adapter." in k for k in one)
        for key in one:
            # fp32 sums of the same gradients in another order (gloo's reduce-scatter, the norm from shards): the
            # weights agree to float rounding, a few ulps of values ~1 after 4 AdamW steps.
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
    final = [load_safetensors(root / run / "final.safetensors") for run in ("one", "two")]
    for key in final[0]:  # the modules a run hands on (EMA applied), gathered whole on rank 0
        torch.testing.assert_close(final[1][key], final[0][key], rtol=1e-5, atol=1e-6)
    losses = [json.loads((root / run / "losses.json").read_text()) for run in ("one", "two")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    states = [json.loads((root / run / "checkpoints/step-000004/state.json").read_text()) for run in ("one", "two")]
    last = [state["logs"][-1] for state in states]  # step 4 (the resumed run also logged its end at step 2)
    assert last[0]["step"] == last[1]["step"] == 4 and last[0].keys() == last[1].keys()  # the same loss parts drawn
    assert last[1] == pytest.approx(last[0], rel=1e-5)  # the parts, the lr and the global gradient norm


def test_fsdp_version_1_is_a_one_line_refusal_naming_the_field() -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    from moviepostproduction.errors import ValidationError
    from moviepostproduction.training.engines import FsdpEngine

    with pytest.raises(ValidationError) as err:
        FsdpEngine(None, FullyShardedDataParallelPlugin(fsdp_version=1))
    assert str(err.value) == "fsdp_version: the trainer runs FSDP2 only: set fsdp_version: 2 (got 1)"
