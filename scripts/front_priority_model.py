"""Copy a model dir with its adapter's occlusion priority switched on and imposed: the fg ref owns an overlap.

    python scripts/front_priority_model.py build/toy-model build/toy-model-front --fg-logit 0.3 \
        [--grounding-ratio 0.6] [--order-priority 3]

The adapter gets `occlusion_priority: true` (docs/design-notes.md, "Occlusion priority"); both pathways' fg logit is
set to FG_LOGIT (weight exp(10 x FG_LOGIT) against 1 for mg and bg refs), every other tensor is kept, and the model
index's label says so. --grounding-ratio also sets the adapter's layout window (the fraction of the sampling steps
that run Assemble-Attn); --order-priority K breaks ties within a depth label by the scene's order (refs listed front
to back: each earlier ref weighs e^K times the next where their boxes overlap). The shipped toy model is the
149000-step model through this script with --order-priority 3 (docs/toy-model.md); the starting point of
examples/train/toy-front.yaml and toy-front-frozen.yaml.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from derived_dir import add_source_and_out, parse_source_and_out

from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.compose.modules.config import DEPTHS
from moviepostproduction.files import staged_copy, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_source_and_out(parser, "a model dir with a trained adapter")
    parser.add_argument("--fg-logit", type=float, default=0.3, help="logit of fg refs in both pathways (mg, bg: 0)")
    parser.add_argument("--grounding-ratio", type=float, default=None, help="layout window (default: the source's)")
    parser.add_argument("--order-priority", type=float, default=0.0, help="tie-break within a label by order (0: off)")
    args, source, out = parse_source_and_out(parser, argv)
    if args.grounding_ratio is not None and not 0 < args.grounding_ratio <= 1:
        parser.error(f"--grounding-ratio: must be in (0, 1] (got {args.grounding_ratio:g})")
    if not math.isfinite(args.order_priority) or args.order_priority < 0:
        parser.error(f"--order-priority: must be a finite number >= 0 (got {args.order_priority:g})")
    changes = {"occlusion_priority": True, "order_priority": args.order_priority}
    if args.grounding_ratio is not None:
        changes["grounding_ratio"] = args.grounding_ratio
    adapter, _ = CompositionAdapter.from_pretrained(source / "adapter").reconfigured(**changes)
    with torch.no_grad():
        adapter.occlusion.logits[:, DEPTHS.index("fg")] = args.fg_logit
    with staged_copy(source, out, leave_out=("adapter",)) as tmp:
        adapter.save_pretrained(tmp / "adapter")
        index_path = tmp / "model_index.json"
        index = json.loads(index_path.read_text())
        if "label" in index:
            index["label"] += f"; fg occlusion priority e^{10 * args.fg_logit:g}"
            if args.order_priority:
                index["label"] += f", order within a label e^{args.order_priority:g}"
            write_json_atomic(index, index_path)
    window, order = adapter.cfg.grounding_ratio, adapter.cfg.order_priority
    print(
        f"wrote {out}: occlusion priority on, fg logit {args.fg_logit:g} in both pathways, layout window {window:g}, "
        f"order priority {order:g}"
    )
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
