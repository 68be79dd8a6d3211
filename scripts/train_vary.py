"""Train NanoDiT for `mpp vary` on the toy world and export it into a model dir (docs/vary.md).

The command (after scripts/train_toy_encoders.py has written build/toy-encoders):

    python scripts/train_vary.py --model build/toy-encoders --out runs/vary --scenes 4096 --steps 6000 \\
        --batch-size 32 --lr 3e-4 --preset toy --seed 0 --export build/toy-encoders

Caches the encoder features of `--scenes` train scenes and 32 held-out ones (OUT/cache/, once), trains through
the shared Trainer (OUT/checkpoints/, samples/, curves.png, TensorBoard logs/; a re-run resumes), validates on
the held-out scenes (reconstruction, feature swap, text only: OUT/validation.json) and, with --export, writes
EXPORT/nanodit/ (config.json, model.safetensors, info.json), which `mpp vary --model EXPORT` reads. Warm start
from a pre-patch checkpoint: --init-from CKPT --stage warm (seed 003: half the learning rate at first).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch

from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.training.trainer import TrainConfig, Trainer
from moviepostproduction.training.vary_task import STAGES, VaryTaskConfig, build_vary_task, validate_vary
from moviepostproduction.vary.nanodit_io import FOLDER, save_nanodit_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model dir with the frozen encoders and VAE")
    parser.add_argument("--out", required=True, help="run folder (cache/, checkpoints/, samples/, logs/)")
    parser.add_argument("--scenes", type=int, default=4096, help="toy-world training scenes")
    parser.add_argument("--size", type=int, default=64, help="scene side in pixels (NanoDiT toy: 64)")
    parser.add_argument("--text-tokens", type=int, default=80, help="T5 tokens per caption (toy captions: <= 75)")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps")
    parser.add_argument("--decay-steps", type=int, default=0, help="linear LR cooldown to 0 over the last steps")
    parser.add_argument("--ref-prob", type=float, default=0.5, help="samples conditioned on the sprite's reference")
    parser.add_argument("--preset", default="toy", help="NanoDiT preset (sizes from the encoders)")
    parser.add_argument("--stage", default="full", choices=list(STAGES))
    parser.add_argument("--init-from", default=None, help="warm start: checkpoint folder or .safetensors")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--validate", type=int, default=32, help="held-out scenes for validation")
    parser.add_argument("--export", default=None, help="model dir to write nanodit/ into")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    task = build_vary_task(
        args.model,
        n=args.scenes,
        seed=args.seed,
        world=ToyWorldConfig(size=args.size),
        max_text_tokens=args.text_tokens,
        preview_n=max(args.validate, 4),
        cache_dir=out / "cache",
        base=args.preset,
        config=VaryTaskConfig(batch_size=args.batch_size, lr=args.lr, ref_prob=args.ref_prob),
        init_seed=args.seed,
    )
    trainer = TrainConfig(
        out_dir=str(out),
        stage=args.stage,
        max_steps=args.steps,
        warmup_steps=args.warmup_steps,
        decay_steps=args.decay_steps,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        log_every=20,
        init_from=args.init_from,
    )
    result = Trainer(task, trainer).run()
    report = validate_vary(task.model, task.preview, task.vae, n=args.validate, seed=args.seed)
    command = shlex.join(["python", "scripts/train_vary.py", *(argv if argv is not None else sys.argv[1:])])
    info = {
        "label": f"NanoDiT {args.preset}, {result.step} steps on {args.scenes} toy scenes",
        "command": command,
        "final_loss": result.losses[-1] if result.losses else None,
        "validation": report,
    }
    (out / "validation.json").write_text(json.dumps(info, indent=2) + "\n")
    logging.info("validation: %s", json.dumps(report))
    if args.export:
        logging.info("exported %s", save_nanodit_dir(task.model, Path(args.export) / FOLDER, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
