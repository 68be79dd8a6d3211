"""Copy a model dir with its adapter's occlusion priority switched on and imposed: the fg ref owns an overlap.

    python scripts/front_priority_model.py build/toy-model build/toy-model-front --fg-logit 0.3

The adapter gets `occlusion_priority: true` (docs/design-notes.md, "Occlusion priority"); both pathways' fg logit is
set to FG_LOGIT (weight exp(10 x FG_LOGIT) against 1 for mg and bg refs), every other tensor is kept. The starting
point of examples/train/toy-front.yaml.
"""

from __future__ import annotations

import argparse
import sys

import torch
from derived_dir import add_source_and_out, parse_source_and_out

from moviepostproduction.checkpoint import staged_copy
from moviepostproduction.modules import CompositionAdapter
from moviepostproduction.modules.config import DEPTHS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_and_out(parser, "a model dir with a trained adapter")
    parser.add_argument("--fg-logit", type=float, default=0.3, help="logit of fg refs in both pathways (mg, bg: 0)")
    args, source, out = parse_source_and_out(parser, argv)
    adapter, _ = CompositionAdapter.from_pretrained(source / "adapter").reconfigured(occlusion_priority=True)
    with torch.no_grad():
        adapter.occlusion.logits[:, DEPTHS.index("fg")] = args.fg_logit
    with staged_copy(source, out, leave_out=("adapter",)) as tmp:
        adapter.save_pretrained(tmp / "adapter")
    print(f"wrote {out}: occlusion priority on, fg logit {args.fg_logit:g} in both pathways")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
