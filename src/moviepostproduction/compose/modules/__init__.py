"""Conditioning modules of seed 001 (DESIGN 2)."""

from moviepostproduction.compose.modules.adapter import CompositionAdapter
from moviepostproduction.compose.modules.alpha_predictor import AlphaPredictor
from moviepostproduction.compose.modules.box_position import BoxPositionEncoding
from moviepostproduction.compose.modules.config import DEPTHS, PRESETS, ConditioningConfig
from moviepostproduction.compose.modules.feedback_bridge import FeedbackBridge
from moviepostproduction.compose.modules.instance_encoder import InstanceEncoder
from moviepostproduction.compose.modules.layout_head import AssembleAttention, LayoutHead
from moviepostproduction.compose.modules.modulation_head import LowRank, ModulationHead

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
]
