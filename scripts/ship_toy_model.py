"""Copy a trained toy-world model dir into the package (the embedded default model of `mpp compose`).

    python scripts/ship_toy_model.py build/toy-model

Every float tensor is stored as fp16 (the loaders cast to the requested dtype), so the whole dir is a few MB;
the copy is checked with the real loaders before it replaces the shipped one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moviepostproduction.files import cast_safetensors_files, staged_copy
from moviepostproduction.model_dir import SHIPPED_MODEL_DIR, ModelDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a trained model dir (mpp train ... export)")
    args = parser.parse_args(argv)
    source, target = Path(args.source), SHIPPED_MODEL_DIR
    ModelDir.at(source).check()
    with staged_copy(source, target, replace=True) as staging:
        cast_safetensors_files(staging, torch.float16)
        ModelDir.at(staging).check()
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"shipped {source} -> {target} ({size / 2**20:.1f} MiB, fp16 tensors)")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
