"""Copy a model dir with the occlusion priority and layout window set in its adapter config: sampling settings only.

    python scripts/front_priority_model.py build/toy-model build/toy-model-front --fg-priority 3 \
        [--grounding-ratio 0.6] [--order-priority 3]

Where boxes overlap, a fg ref weighs e^FG_PRIORITY against 1 for mg and bg refs (`ConditioningConfig.depth_priority`,
compose/modules/occlusion.py), and within one depth label each ref listed earlier weighs e^K times the next
(`--order-priority K`; scene files list refs front to back). --grounding-ratio sets the fraction of the sampling
steps that run Assemble-Attn. No weight changes: the adapter's tensors are copied as they are, and the model index's
label says what was set. The shipped toy model is the dense export (examples/train/toy-mixed5.yaml) through this
script, as the 149000-step model before it was (scripts/train_toy_model.sh).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from moviepostproduction.compose.modules import CompositionAdapter
from moviepostproduction.errors import MppError
from moviepostproduction.files import staged_copy, write_json_atomic
from moviepostproduction.model_dir import ModelDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a model dir with a trained adapter")
    parser.add_argument("out", help="the new model dir (must not exist)")
    parser.add_argument("--fg-priority", type=float, default=3.0, help="log-weight of fg refs (mg, bg: 0)")
    parser.add_argument("--grounding-ratio", type=float, default=None, help="layout window (default: the source's)")
    parser.add_argument("--order-priority", type=float, default=0.0, help="tie-break within a label by order (0: off)")
    args = parser.parse_args(argv)
    if args.grounding_ratio is not None and not 0 < args.grounding_ratio <= 1:
        parser.error(f"--grounding-ratio: must be in (0, 1] (got {args.grounding_ratio:g})")
    try:
        md, out = ModelDir.source_of(args.source, args.out)
        cfg = CompositionAdapter.from_pretrained(md.root / "adapter").cfg  # the weights must match it
        changes = {"depth_priority": (args.fg_priority, 0.0, 0.0), "order_priority": args.order_priority}
        if args.grounding_ratio is not None:
            changes["grounding_ratio"] = args.grounding_ratio
        cfg = cfg.with_(**changes)
    except (MppError, ValueError) as exc:
        parser.error(str(exc))
    with staged_copy(md.root, out) as tmp:
        write_json_atomic(dataclasses.asdict(cfg), tmp / "adapter" / CompositionAdapter.CONFIG_NAME)
        index = md.index
        if "label" in index:
            index["label"] += f"; fg occlusion priority e^{args.fg_priority:.3g}"
            if args.order_priority:
                index["label"] += f", order within a label e^{args.order_priority:.3g}"
            write_json_atomic(index, tmp / "model_index.json")
    print(f"wrote {out}: fg priority {args.fg_priority:g}, order priority {cfg.order_priority:g}, "
          f"layout window {cfg.grounding_ratio:g}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
