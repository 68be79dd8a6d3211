"""Seams of generated panoramas (DESIGN 7): the seam metric, the seam probe, wrap on vs off end to end.

A random-init FLUX cannot show a seam (its content has no spatial coherence: the last test pins that), so the
end-to-end seam tests use the seam probe (`panorama_probe.py`): the real FLUX class with hand-set weights that
generate smooth random content whose only notion of "near" is RoPE's. With periodic RoPE and circular VAE
padding the whole pipeline is exactly equivariant to a horizontal roll of the noise, so the seam is a column
boundary like any other (ratio near 1); without them columns 0 and W-1 are far apart and a seam appears.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel

from moviepostproduction.encoders import Vae
from moviepostproduction.panorama.periodic_rope import axis_frequencies, periodic_rope
from moviepostproduction.panorama.pipeline import PanoramaPipeline
from moviepostproduction.panorama.seams import seam_ratio
from moviepostproduction.panorama.wrap import PanoramaConfig
from moviepostproduction.sampling import latent_image_ids, text_ids

from helpers import tiny_vae
from panorama_probe import ProbeConfig, build_seam_probe

HEIGHT, BATCH = 128, 16  # 128 x 256 pixels, an (8, 16) token grid; 16 panoramas pooled per measurement


@pytest.fixture(scope="module")
def probe() -> FluxTransformer2DModel:
    return build_seam_probe()


@pytest.fixture(scope="module")
def vae() -> Vae:
    """A random tiny FLUX-like VAE (8x down, 16 latent channels)."""
    return Vae(tiny_vae())


def generate(model, vae, config: PanoramaConfig, seed: int, *, batch: int = BATCH, height: int = HEIGHT, **kw):
    """`batch` panoramas from random text embeddings (the probe ignores text content)."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 1, cfg.joint_attention_dim, generator=gen)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen)
    pipe = PanoramaPipeline(model, vae, config=config)
    return pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, height=height, seed=seed, **kw)


def pooled_ratios(out) -> tuple[float, float]:
    """(pixel seam ratio, latent seam ratio at token boundaries), pooled over the batch (images stacked)."""
    pixels = np.concatenate(list(out.images.permute(0, 2, 3, 1).numpy()))  # (B H, W, 3)
    latents = np.concatenate(list(out.latents.permute(0, 2, 3, 1).numpy()))  # (B h, w, C)
    return seam_ratio(pixels), seam_ratio(latents, period=2)


# ------------------------------------------------------------------------------------------------ the metric
def test_seam_ratio_period_compares_the_seam_with_same_phase_boundaries():
    """Blocks of 4 columns alternating 0 / 1: every block boundary (the seam too) steps by 1, the rest by 0."""
    cols = (np.arange(32) // 4) % 2  # 0 0 0 0 1 1 1 1 0 ... 1: col 0 = 0, col 31 = 1
    img = np.tile(cols[None, :, None].astype(np.float64), (3, 1, 3))
    assert seam_ratio(img) == pytest.approx(31 / 7)  # 1 / (7 steps of 1 among 31)
    assert seam_ratio(img, period=4) == pytest.approx(1.0)  # the seam is one of the block boundaries
    cut = img.copy()
    cut[:, -4:] += 2.0  # the last block jumps to 3: the seam steps by 3, one boundary by 3, six by 1
    assert seam_ratio(cut, period=4) == pytest.approx(3 / (9 / 7))
    for bad in (3, 0, 32):
        with pytest.raises(ValueError, match="period must be an integer >= 1 dividing the width 32"):
            seam_ratio(img, period=bad)
    with pytest.raises(ValueError, match="not to the rotated view"):
        seam_ratio(img, period=4, rotated=True)


# ------------------------------------------------------------------------------------------------ the probe
@pytest.mark.parametrize("periodic", [False, True])
def test_probe_velocity_is_x_minus_a_rope_kernel_average(probe, periodic):
    """v = x - S x_bar, S = softmax over image tokens of A_row cos(w dr) + A_col cos(w' dc); text gets no weight."""
    cfg, (h, w) = ProbeConfig(), (4, 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, h * w, 64, generator=gen)
    rows, cols = (g.flatten().double() for g in torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
    w_row = axis_frequencies(8, 10000)[1]  # 0.1
    w_col = axis_frequencies(8, 10000, period=w if periodic else None)[1]  # 0.1, or 2 pi / 8
    logits = cfg.row_strength * torch.cos(w_row * (rows[:, None] - rows)) + cfg.col_strength * torch.cos(
        w_col * (cols[:, None] - cols)
    )  # (N, N)
    x_bar = x.reshape(2, h * w, 16, 4).mean(-1, keepdim=True).expand(-1, -1, -1, 4).reshape(2, h * w, 64)
    expected = x - logits.softmax(-1).float() @ x_bar
    rope = periodic_rope(probe, w) if periodic else contextlib.nullcontext()
    with torch.no_grad(), rope:
        v = probe(
            hidden_states=x,
            encoder_hidden_states=torch.randn(2, 5, 32, generator=gen),
            pooled_projections=torch.randn(2, 16, generator=gen),
            timestep=torch.ones(2),
            img_ids=latent_image_ids(h, w),
            txt_ids=text_ids(5),
            return_dict=False,
        )[0]
    assert (v - expected).abs().max() < 1e-3  # LayerNorm is linear in x up to ~1e-5 relative (see the module)
    assert (x - v).std() < 0.5 * x.std()  # x0 = S x_bar is much smoother than the noise


def test_wrapped_probe_panorama_rolls_with_its_noise(probe, vae):
    """Periodic RoPE + circular VAE: rolling the noise by one token rolls the panorama by 16 px, exactly."""
    config = PanoramaConfig(pad=0, periodic_rope=True)
    noise = torch.randn(2, 16, 16, 32, generator=torch.Generator().manual_seed(3))  # (B, C, 2h, 2w)
    a = generate(probe, vae, config, 0, batch=2, latents=noise, num_inference_steps=1)
    b = generate(probe, vae, config, 0, batch=2, latents=torch.roll(noise, 2, -1), num_inference_steps=1)
    assert (torch.roll(a.latents, 2, -1) - b.latents).abs().max() < 1e-4
    assert (torch.roll(a.images, 16, -1) - b.images).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------- seams end to end
@pytest.mark.parametrize(
    "config, pixels, latents",
    [
        # Measured over seeds 0-11 (pixels / latents): 0.84-1.32 / 0.97-1.06, 3.1-4.9 / 10.4-11.1,
        # 3.2-4.1 / 10.4-11.1, 1.7-2.5 / 0.97-1.06.
        (PanoramaConfig(pad=0, periodic_rope=True), (0.7, 1.5), (0.85, 1.15)),  # wrap: seamless
        (PanoramaConfig(pad=0, circular_vae=False), (2.5, None), (6.0, None)),  # no wrap at all
        (PanoramaConfig(pad=0), (2.5, None), (6.0, None)),  # circular VAE alone: the latent seam shows
        (PanoramaConfig(pad=0, periodic_rope=True, circular_vae=False), (1.4, None), (0.85, 1.15)),  # VAE seam
    ],
    ids=["wrap", "nothing", "circular-vae-only", "periodic-rope-only"],
)
def test_probe_panorama_seam_is_near_1_with_wrap_and_clearly_worse_without(probe, vae, config, pixels, latents):
    px, lat = pooled_ratios(generate(probe, vae, config, 0, num_inference_steps=1))
    for value, (lo, hi) in ((px, pixels), (lat, latents)):
        assert value > lo and (hi is None or value < hi), (px, lat)


def test_a_random_flux_has_no_seam_to_show_either_way(vae):
    """Why the probe: untrained weights give incoherent content, so wrap on or off scores about 1 alike."""
    torch.manual_seed(0)
    random = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()  # fmt: skip
    for config in (PanoramaConfig(pad=0, periodic_rope=True), PanoramaConfig(pad=0)):
        _, lat = pooled_ratios(generate(random, vae, config, 0, num_inference_steps=2))
        assert 0.8 < lat < 1.25, (config, lat)
