"""Half precision with refs (issue 41 item 3): at FLUX.1-dev's 16 Fourier frequencies the box features reach
2^15 pi, past fp16's range; they are computed in fp32 whatever the model dtype, so a conditioned forward in fp16 and
bf16 is finite and close to fp32."""

from __future__ import annotations

import pytest
import torch

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import CompositionAdapter

from helpers import flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits

GRID, TEXT = (8, 8), 6
# relative L2 error of the velocity against fp32; fp16 keeps 10 mantissa bits, bf16 7
BOUNDS = {torch.float16: 0.02, torch.bfloat16: 0.08}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_with_refs_is_finite_and_close_to_fp32(tiny_cfg, dtype):
    cfg = tiny_cfg.with_(fourier_freqs=16)  # FLUX.1-dev's: the top frequency is 2^15 pi
    torch.manual_seed(0)
    model = ConditionedFlux(make_tiny_flux(0), CompositionAdapter(cfg)).eval()
    randomize_zero_inits(model.adapter, std=0.1)  # every branch acts
    inputs = flux_inputs(2, GRID, TEXT)
    refs = random_refs(2, 4, cfg, counts=[4, 3], text_len=TEXT)
    with torch.no_grad():
        reference = model(**inputs, conditioning=model.prepare(refs, GRID, TEXT))
        half = model.to(dtype)
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        got = half(**cast, conditioning=half.prepare(refs.to(dtype=dtype), GRID, TEXT)).float()
    assert torch.isfinite(got).all()
    error = ((got - reference).norm() / reference.norm()).item()
    assert error < BOUNDS[dtype], f"{dtype}: relative error {error:.4f}"
