"""Conditioning modules of seed 001 (DESIGN 2)."""

from .adapter import CompositionAdapter
from .alpha_predictor import AlphaPredictor
from .box_position import BoxPositionEncoding
from .config import DEPTHS, PRESETS, ConditioningConfig
from .feedback_bridge import FeedbackBridge
from .instance_encoder import InstanceEncoder
from .layout_head import AssembleAttention, LayoutHead
from .modulation_head import LowRank, ModulationHead
from .occlusion import OcclusionPriority

__all__ = [
    "DEPTHS",
    "PRESETS",
    "AlphaPredictor",
    "AssembleAttention",
    "BoxPositionEncoding",
    "CompositionAdapter",
    "ConditioningConfig",
    "FeedbackBridge",
    "InstanceEncoder",
    "LayoutHead",
    "LowRank",
    "ModulationHead",
    "OcclusionPriority",
]
