"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch

from moviepostproduction.compose.modules import PRESETS, CompositionAdapter, ConditioningConfig

torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture
def tiny_cfg() -> ConditioningConfig:
    return PRESETS["tiny"]


@pytest.fixture
def tiny_adapter(tiny_cfg) -> CompositionAdapter:
    torch.manual_seed(0)
    return CompositionAdapter(tiny_cfg)
