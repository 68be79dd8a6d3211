"""Train new tiny tokenizers and freeze them as the package's files (moviepostproduction/assets/tiny-tokenizers).

    python scripts/build_tiny_tokenizers.py [--out DIR]

Token ids differ from run to run (see `tiny.train_tiny_tokenizers`), and every trained toy text encoder is tied to
the ids it was trained with: replacing the frozen files invalidates the shipped toy model. Default --out is a new
folder, not the package's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moviepostproduction.toyworld.tiny import train_tiny_tokenizers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/tiny-tokenizers", help="folder to write clip/ and t5/ into")
    args = parser.parse_args(argv)
    out = Path(args.out)
    clip, t5 = train_tiny_tokenizers()
    clip.save_pretrained(out / "clip")
    t5.save_pretrained(out / "t5")
    print(f"wrote {out / 'clip'} and {out / 't5'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
