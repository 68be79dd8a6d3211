"""Training stages (DESIGN 5): which modules learn, at which learning rate, with which losses.

Stages 1-3 are the paper's, for a pretrained FLUX backbone. `toy` is ours: the toy-world backbone starts
from random weights, so it learns together with every adapter module (the embedded default model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moviepostproduction.errors import Problem, ValidationError

LAYOUT_PARTS = ("alpha_predictor", "instance_encoder", "layout_head", "assemble")


@dataclass(frozen=True)
class Stage:
    name: str
    adapter_parts: tuple[str, ...]  # CompositionAdapter children that train
    lr: float
    backbone: str = "frozen"  # frozen | lora | full
    losses: dict[str, float] = field(default_factory=dict)  # loss name -> weight (flow is always 1)


STAGES: dict[str, Stage] = {
    "1": Stage("1", LAYOUT_PARTS, 1e-4, backbone="lora", losses={"bbox": 1.0, "region": 0.01}),
    "2": Stage(
        "2",
        (*LAYOUT_PARTS, "modulation_head"),
        5e-6,
        backbone="lora",
        losses={"identity": 10.0, "bbox": 1.0, "region": 0.01},
    ),
    "3": Stage("3", ("feedback_bridge",), 1e-5, losses={"identity": 10.0, "region": 0.01}),
    "toy": Stage(
        "toy",
        (*LAYOUT_PARTS, "modulation_head", "feedback_bridge"),
        3e-4,
        backbone="full",
        losses={"identity": 10.0, "bbox": 1.0, "region": 0.01},
    ),
}


def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValidationError([Problem("stage", name, f"expected one of {', '.join(STAGES)}")])
    return STAGES[name]
