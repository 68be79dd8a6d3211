"""Cost of more references per shot (issue 44): sampling time per image and peak memory at 1, 4, 16 refs, one canvas.

    python benchmarks/dense_refs.py [--refs 1,4,16] [--canvas 320] [--scenes 3] [--steps 28] [--model DIR]
                                    [--device cpu] [--threads 1] [--json benchmarks/results/dense-refs-cpu.json]

Each count samples `--scenes` held-out scenes of the dense toy world (`ToyWorldConfig.dense`, exactly that many
refs, the same scene indices for every count) through `ComposePipeline` (the whole call: text and reference encoding,
conditioning, `--steps` Euler steps, VAE decode), after one untimed warm-up image per count. Reported per count: the
median wall time and process CPU time per image, and the peak memory of one image above the level before it
(CUDA allocator peak, or the process's resident set sampled every 2 ms on CPU; bench/memory.py), and the bytes of
the scene's prepared conditioning (every tensor `ComposePipeline.prepare(scene).conditioning` holds, each storage
once: exact, what the refs add to every step's inputs). Counts run interleaved (1, 4, 16, 1, 4, 16, ...) so that
load on a shared machine spreads over all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of the distinct tensor storages reachable from `obj` (attributes, dataclass fields, lists, dicts)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.device)
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def main(argv: list[str]) -> dict:
    import torch

    from moviepostproduction.bench.memory import PeakMemory
    from moviepostproduction.compose.pipeline import ComposePipeline
    from moviepostproduction.model_dir import ModelDir, default_model_dir
    from moviepostproduction.toyworld.dense_eval import dense_scenes, parse_counts
    from moviepostproduction.toyworld.synthetic import ToyWorldConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", default="1,4,16")
    parser.add_argument("--canvas", type=int, default=320)
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.scenes < 1 or args.canvas % 16:
        parser.error(f"--scenes must be >= 1 and --canvas a multiple of 16 (got {args.scenes}, {args.canvas})")
    counts = parse_counts(args.refs)
    torch.set_num_threads(args.threads)
    md = ModelDir.at(args.model or default_model_dir())
    world_data = md.index["toy_world_data"]
    world, seed = ToyWorldConfig.from_dict(world_data["config"]), int(world_data["seed"])
    pipe = ComposePipeline.from_model_dir(md, device=args.device)
    device = torch.device(args.device)
    memory = PeakMemory(device)
    wall: dict[int, list[float]] = {c: [] for c in counts}
    cpu: dict[int, list[float]] = {c: [] for c in counts}
    peak: dict[int, list[float]] = {c: [] for c in counts}
    conditioning: dict[int, list[float]] = {c: [] for c in counts}
    with tempfile.TemporaryDirectory() as tmp:
        scenes = {c: dense_scenes(world, c, args.canvas, seed, args.scenes + 1, 0, Path(tmp)) for c in counts}

        def sample(scene) -> None:
            pipe(scene, num_inference_steps=args.steps, seed=scene.seed or 0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        for c in counts:  # warm-up: scene args.scenes, never timed
            sample(scenes[c][-1][1])
        for k in range(args.scenes):
            for c in counts:
                scene = scenes[c][k][1]
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                sample(scene)
                wall[c].append(time.perf_counter() - start_wall)
                cpu[c].append(time.process_time() - start_cpu)
                used = memory.measure(lambda scene=scene: sample(scene))  # a second run of the same image
                if used is not None:
                    peak[c].append(used)
                conditioning[c].append(tensor_bytes(pipe.prepare(scene).conditioning) / 2**20)
    rows = [
        {
            "refs": c,
            "wall s per image (median)": statistics.median(wall[c]),
            "cpu s per image (median)": statistics.median(cpu[c]),
            "peak MiB (median)": statistics.median(peak[c]) if peak[c] else None,
            "conditioning MiB (median)": statistics.median(conditioning[c]),
            "wall s": wall[c],
            "cpu s": cpu[c],
            "peak MiB": peak[c],
            "conditioning MiB": conditioning[c],
        }
        for c in counts
    ]
    report = {
        "model": str(md.root),
        "canvas": args.canvas,
        "steps": args.steps,
        "scenes": args.scenes,
        "device": str(device),
        "threads": args.threads,
        "memory": memory.note,
        "load average at end": os.getloadavg(),
        "rows": rows,
    }
    for row in rows:
        mib = row["peak MiB (median)"]
        wall_s, cpu_s = row["wall s per image (median)"], row["cpu s per image (median)"]
        print(
            f"{row['refs']:>2} refs, {args.canvas} px, {args.steps} steps: {wall_s:.2f} s wall, {cpu_s:.2f} s CPU "
            "per image, peak "
            + ("n/a" if mib is None else f"{mib:.0f} MiB")
            + f", conditioning {row['conditioning MiB (median)']:.2f} MiB"
        )
    if args.json:
        from moviepostproduction.files import write_text_atomic

        write_text_atomic(json.dumps(report, indent=2), args.json)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
