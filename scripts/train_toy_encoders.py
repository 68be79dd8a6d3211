"""Train the toy world's VAE and image / text encoders once and write the toy model dir (docs/toy-model.md).

    python scripts/train_toy_encoders.py --out build/toy-encoders [--seed 0] [--vae-steps 600] [--decoder-steps 0]
        [--encoder-steps 800] [--encoder-decay-steps 0] [--recolour-prob 0] [--train-scenes 2000]
        [--threads 2] [--overwrite]

Writes OUT (the FLUX-layout model dir; transformer/ and adapter/ random-init) and OUT-report/ (metrics.json,
metrics.md, vae_reconstructions.png, compose_smoke/, trainer runs). A finished run re-run resumes from its
trainer checkpoints in OUT-report/runs.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

import torch

from moviepostproduction.toyworld.toy_build import ToyEncodersConfig, train_toy_encoders
from moviepostproduction.toyworld.toy_encoders import EncoderTrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="model dir to write (absent or empty)")
    parser.add_argument("--report", default=None, help="metrics / PNG folder (default OUT-report)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--decoder-steps", type=int, default=0, help="then the decoder alone (frozen encoder)")
    parser.add_argument("--encoder-steps", type=int, default=800)
    parser.add_argument("--encoder-decay-steps", type=int, default=0, help="LR cooldown over the last n steps")
    parser.add_argument("--recolour-prob", type=float, default=0.0, help="share of channel-reordered sprite views")
    parser.add_argument("--train-scenes", type=int, default=2000)
    parser.add_argument("--heldout-scenes", type=int, default=200)
    parser.add_argument("--probe-scenes", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    cfg = ToyEncodersConfig(
        out=args.out,
        report=args.report,
        seed=args.seed,
        vae_steps=args.vae_steps,
        decoder_steps=args.decoder_steps,
        encoder_steps=args.encoder_steps,
        encoder_decay_steps=args.encoder_decay_steps,
        encoders=EncoderTrainConfig(recolour_prob=args.recolour_prob),
        train_scenes=args.train_scenes,
        heldout_scenes=args.heldout_scenes,
        probe_scenes=min(args.probe_scenes, args.train_scenes),
        stats_scenes=min(64, args.train_scenes),
        overwrite=args.overwrite,
    )
    command = shlex.join(["python", "scripts/train_toy_encoders.py", *(argv if argv is not None else sys.argv[1:])])
    train_toy_encoders(cfg, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
