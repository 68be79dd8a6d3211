"""OcclusionPriority: which reference an image token covered by several boxes belongs to (design note).

DESIGN 3 averages overlapping boxes: a token inside an fg box and a bg box gets the mean of both refs'
Assemble-Attn outputs and the sum of both refs' modulation offsets, whatever the depth labels say. In a scene the
nearer asset hides the farther one there, so the average draws neither. This module gives each depth label a
learned priority per pathway, and a token covered by boxes i, j, ... weighs ref i by

    w_i / sum_j w_j  (layout: instead of 1 / cover)    and    w_i sum_j m_j / sum_j m_j w_j  (modulation: instead of 1)

with w = exp(LOGIT_SCALE * logit[depth]) (relative to the top label's) and m the token's mask values. The logits
start at zero, so w = 1 and both are exactly DESIGN 3's average / sum until training moves them; a token inside one
box only is never reweighted. Refs of the same label tie; `order_priority` K > 0 breaks the tie by the scene's order
(refs listed front to back): w is multiplied by exp(-K rank), rank = the earlier valid refs of the same label.
"""

from __future__ import annotations

import torch
from torch import nn

from moviepostproduction.compose.modules.config import DEPTHS

PATHWAYS = ("layout", "modulation")
# The weights are exp(LOGIT_SCALE * logits). Adam moves a parameter by about its learning rate per step whatever
# the gradient's size, so at the adapter's LR the six logits would need tens of thousands of steps to reach the
# few units a priority needs; the scale gives them a 10x learning rate without a separate optimiser group.
LOGIT_SCALE = 10.0
# Both uses are scale-free (a ratio of weights), so the weights are taken relative to the highest label's, in fp32,
# and kept >= MIN_WEIGHT: at most 1000:1 between labels, and no weight rounds to 0 when the model runs in fp16.
MIN_WEIGHT = 1e-3


class OcclusionPriority(nn.Module):
    def __init__(self, order_priority: float = 0.0):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(len(PATHWAYS), len(DEPTHS)))  # (pathway, depth)
        self.order_priority = float(order_priority)  # a setting (ConditioningConfig), not a trained weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.logits)

    def forward(self, depth: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """depth (B, R) long index into DEPTHS, valid (B, R) bool -> (layout, modulation) weights, each (B, R) fp32
        in [MIN_WEIGHT, 1] on valid refs (padding: 1, never read: padded refs cover no token)."""
        logits = LOGIT_SCALE * self.logits.float()  # (2, 3)
        logits = (logits - logits.amax(-1, keepdim=True))[:, depth]  # (2, B, R)
        if self.order_priority:
            same = (depth[:, :, None] == depth[:, None, :]) & valid[:, None, :]  # (B, R, R'): R' of R's label
            earlier = torch.ones_like(same).tril(-1)  # R' listed before R
            logits = logits - self.order_priority * (same & earlier).sum(-1).float()  # rank within the label
        weights = logits.exp().clamp(min=MIN_WEIGHT)
        weights = torch.where(valid, weights, torch.ones_like(weights))
        return weights[0], weights[1]
