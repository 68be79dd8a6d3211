"""Occlusion priority: which reference an image token covered by several boxes belongs to (design note).

DESIGN 3 averages overlapping boxes: a token inside an fg box and a bg box gets the mean of both refs'
Assemble-Attn outputs and the sum of both refs' modulation offsets, whatever the depth labels say. In a scene the
nearer asset hides the farther one there, so the average draws neither. A fixed, configured priority
(`ConditioningConfig.depth_priority`, `order_priority`) weighs ref i of a token covered by boxes i, j, ... by

    w_i / sum_j w_j  (layout: instead of 1 / cover)    and    w_i sum_j m_j / sum_j m_j w_j  (modulation: instead of 1)

with w = exp(depth_priority[depth] - K rank) relative to the top label's, m the token's mask values, K the
`order_priority` and rank the number of earlier valid refs of the same label (scene files list refs front to back).
A token inside one box only is never reweighted. Learning these weights was tried and failed (experiments/README.md);
the shipped toy model uses fg e^3 against mg and bg, and K = 3.
"""

from __future__ import annotations

import torch

from moviepostproduction.compose.modules.config import DEPTHS

# Both uses are scale-free (a ratio of weights), so the weights are taken relative to the highest label's, in fp32,
# and kept >= MIN_WEIGHT: at most 1000:1 between refs, and no weight rounds to 0 when the model runs in fp16.
MIN_WEIGHT = 1e-3


def occlusion_priority(
    depth: torch.Tensor, valid: torch.Tensor, depth_priority: tuple[float, ...], order_priority: float = 0.0
) -> torch.Tensor:
    """depth (B, R) long index into DEPTHS, valid (B, R) bool -> (B, R) fp32 weights in [MIN_WEIGHT, 1] on valid refs
    (padding: 1, never read: padded refs cover no token). The same weights serve both pathways."""
    logits = torch.tensor(depth_priority, dtype=torch.float32, device=depth.device)  # (len(DEPTHS),)
    if logits.shape != (len(DEPTHS),):
        raise ValueError(f"depth_priority={depth_priority!r} must hold one number per depth label {DEPTHS}")
    logits = (logits - logits.amax())[depth]  # (B, R)
    if order_priority:
        same = (depth[:, :, None] == depth[:, None, :]) & valid[:, None, :]  # (B, R, R'): R' of R's label
        earlier = torch.ones_like(same).tril(-1)  # R' listed before R
        logits = logits - order_priority * (same & earlier).sum(-1).float()  # rank within the label
    weights = logits.exp().clamp(min=MIN_WEIGHT)
    return torch.where(valid, weights, torch.ones_like(weights))
