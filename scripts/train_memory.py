"""Memory per process of compose stage 1 on the tiny FLUX (issue 42 item 6): 1 process, 2 processes with DDP by hand,
2 processes with FSDP2, on CPU (gloo).

    .venv/bin/python scripts/train_memory.py [--steps 2]

Prints, per process: the bytes of the weights it holds (trained / frozen), of the gradients after the step's
reduction, of the AdamW moments, and its peak RSS. Run as `--child` by itself under torchrun.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MAX_REFS, TEXT = 2, 32
RUNS = (("1 process", 1, {}), ("2 x DDP by hand", 2, {}), ("2 x FSDP2", 2, {"ACCELERATE_USE_FSDP": "true"}))


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def child(model_dir: str, cache_dir: str, out: str, steps: int) -> None:
    import torch

    from moviepostproduction.compose.flux import ConditionedFlux
    from moviepostproduction.compose.modules import CompositionAdapter
    from moviepostproduction.encoders import ImageEncoder, Vae, load_transformer
    from moviepostproduction.model_dir import ModelDir
    from moviepostproduction.training.compose_task import ComposeTask, ComposeTaskConfig
    from moviepostproduction.training.feature_shards import ShardedFeatures
    from moviepostproduction.training.trainer import TrainConfig, Trainer

    torch.set_num_threads(1)
    md = ModelDir.at(model_dir)
    model = ConditionedFlux(load_transformer(md), CompositionAdapter.from_pretrained(md.root / "adapter"))
    config = ComposeTaskConfig(batch_size=2, sample_steps=1, num_preview=1, lora_rank=4)
    task = ComposeTask(model, ShardedFeatures(cache_dir, MAX_REFS), Vae.load(md), ImageEncoder.load(md), config=config)
    cfg = TrainConfig(out_dir=out, max_steps=steps, checkpoint_every=steps, progress=False, tensorboard=False)
    trainer = Trainer(task, cfg)
    engine, seen = trainer.engine, {}
    clip, finish = engine.clip, engine.finish

    def clip_measured(params, max_norm):  # after the step's reduction: the gradients a process keeps
        seen["grads"] = local_bytes(p.grad for p in params if p.grad is not None)
        return clip(params, max_norm)

    def finish_measured(params):  # before the weights are gathered back whole for the export
        weights = [p for m in task.modules().values() for p in m.parameters()]
        seen["trained"] = local_bytes(p for p in weights if p.requires_grad)
        seen["frozen"] = local_bytes(p for p in weights if not p.requires_grad)
        moments = trainer.optimizer.state.values()
        seen["moments"] = local_bytes(v for s in moments for k, v in s.items() if k != "step")
        return finish(params)

    engine.clip, engine.finish = clip_measured, finish_measured
    trainer.run()
    seen["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rank = os.environ.get("RANK", "0")
    Path(out, f"memory-{rank}.json").write_text(json.dumps({"engine": engine.name, **seen}))


def world(root: Path) -> tuple[Path, Path]:
    from moviepostproduction.encoders import ImageEncoder, TextEncoder, Vae
    from moviepostproduction.model_dir import ModelDir
    from moviepostproduction.toyworld.shards import write_dataset
    from moviepostproduction.toyworld.synthetic import ToyWorldConfig
    from moviepostproduction.toyworld.tiny import write_tiny_model_dir
    from moviepostproduction.training.cache_encoders import CacheEncoders
    from moviepostproduction.training.feature_cache import write_cache

    md = ModelDir.at(write_tiny_model_dir(root / "model"))
    write_dataset(root / "data", 9, 3, ToyWorldConfig(size=32, ref_size=16, max_refs=MAX_REFS), shard_size=9)
    encoders = CacheEncoders.wrap(TextEncoder.load(md), image_encoder=ImageEncoder.load(md), vae=Vae.load(md))
    sizes = {"max_refs": MAX_REFS, "max_text_tokens": TEXT, "batch_size": 4, "shard_size": 8, "progress": False}
    write_cache(root / "data" / "train", root / "cache", encoders, meta={"model": str(md.root)}, **sizes)
    return md.root, root / "cache"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "CACHE", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model_dir, cache_dir, out, steps = args.child
        child(model_dir, cache_dir, out, int(steps))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, cache_dir = world(Path(tmp))
        print(f"{'run':<18} {'rank':>4} {'engine':>6} {'trained':>10} {'frozen':>10} {'grads':>10} {'moments':>10} "
              f"{'peak RSS':>10}")  # fmt: skip
        for label, n, env in RUNS:
            out = Path(tmp) / label.replace(" ", "-")
            cmd = [sys.executable, __file__, "--child", str(model_dir), str(cache_dir), str(out), str(args.steps)]
            if n > 1:
                cmd[1:1] = ["-m", "torch.distributed.run", f"--nproc_per_node={n}", "--master_port=29517"]
            full_env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "FSDP_VERSION": "2", **env}
            done = subprocess.run(cmd, env=full_env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"{label}: exit {done.returncode}: {done.stderr[-2000:]}")
            for rank in range(n):
                m = json.loads((out / f"memory-{rank}.json").read_text())
                kib = [f"{m[k] / 1024:>8.1f}Ki" for k in ("trained", "frozen", "grads", "moments")]
                print(f"{label:<18} {rank:>4} {m['engine']:>6} {' '.join(kib)} {m['peak_rss'] / 2**20:>8.1f}Mi")


if __name__ == "__main__":
    main()
