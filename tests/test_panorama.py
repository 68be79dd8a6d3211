"""Panoramas (DESIGN 7): token-grid wrap, periodic RoPE, circular VAE padding, latent rolling, the pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from moviepostproduction.compose.flux import ConditionedFlux
from moviepostproduction.compose.modules import PRESETS, CompositionAdapter
from moviepostproduction.panorama.circular_vae import circular_width_padding
from moviepostproduction.panorama.periodic_rope import PeriodicFluxPosEmbed, axis_frequencies, periodic_rope
from moviepostproduction.panorama.wrap import (
    PanoramaConfig,
    PanoramaValueError,
    crop_tokens,
    panorama_grid,
    remap_conditioning,
    roll_offsets,
    token_sources,
    wrap_ids,
    wrap_tokens,
    wrapped_forward,
)
from moviepostproduction.sampling import latent_image_ids, text_ids

from helpers import flux_inputs, make_tiny_flux, random_refs, randomize_zero_inits, tiny_vae

GRID, TEXT = (4, 8), 6


def roll_cols(tokens: torch.Tensor, grid: tuple[int, int], shift: int) -> torch.Tensor:
    """Roll packed tokens (B, h*w, C) by `shift` columns."""
    b, _, c = tokens.shape
    return torch.roll(tokens.reshape(b, *grid, c), shift, dims=2).reshape(b, -1, c)


@pytest.fixture(scope="module")
def conditioned():
    """A tiny ConditionedFlux whose zero-init branches act, plus refs with one box wrapping the seam."""
    transformer = make_tiny_flux()
    adapter = CompositionAdapter(PRESETS["tiny"])
    randomize_zero_inits(adapter)
    model = ConditionedFlux(transformer, adapter).eval()
    refs = random_refs(1, 3, PRESETS["tiny"], text_len=TEXT)
    refs.bboxes[0, 0] = torch.tensor([0.75, 0.25, 0.25, 0.75])  # columns 6, 7, 0, 1
    with torch.no_grad():
        cond = model.prepare(refs, GRID, TEXT)
    return model, cond


def model_fn(model, inputs, *, anchor: int = 0, layout: bool = True, outputs: list | None = None):
    """The model as `wrapped_forward` calls it; `anchor` puts the text tokens at that column id."""
    txt = inputs["txt_ids"].clone()
    txt[:, 2] = anchor

    def fn(x, ids, cond):
        args = (x, inputs["encoder_hidden_states"], inputs["pooled_projections"], inputs["timestep"], ids, txt)
        if isinstance(model, ConditionedFlux):
            out = model(*args, inputs["guidance"], conditioning=cond, layout_active=layout)
        else:
            out = model(*args, guidance=inputs["guidance"], return_dict=False)[0]
        if outputs is not None:
            outputs.append(out)
        return out

    return fn


# ------------------------------------------------------------------------------------------ token-grid wrap
def test_pad_crop_round_trip_and_pads_carry_the_opposite_edge():
    h, w, pad = 3, 5, 2
    tokens = torch.arange(h * w, dtype=torch.float32).reshape(1, h * w, 1)  # value = token index
    padded = wrap_tokens(tokens, (h, w), pad).reshape(h, w + 2 * pad)
    assert padded[0].tolist() == [3, 4, 0, 1, 2, 3, 4, 0, 1]  # left pad = last columns, right pad = first
    assert padded[2].tolist() == [13, 14, 10, 11, 12, 13, 14, 10, 11]
    for shift in (0, 1, 4):
        assert torch.equal(crop_tokens(wrap_tokens(tokens, (h, w), pad, shift), (h, w), pad, shift), tokens)
    cols = wrap_ids((h, w), pad).reshape(h, w + 2 * pad, 3)
    assert cols[1, :, 2].tolist() == [3, 4, 0, 1, 2, 3, 4, 0, 1] and cols[1, :, 1].eq(1).all()
    assert torch.equal(cols[:, pad : pad + w].reshape(-1, 3), latent_image_ids(h, w))  # interior = stock ids
    continuous = wrap_ids((h, w), pad, "continuous").reshape(h, w + 2 * pad, 3)
    assert continuous[0, :, 2].tolist() == [-2, -1, 0, 1, 2, 3, 4, 5, 6]
    assert token_sources((h, w), 0, 2).reshape(h, w)[0].tolist() == [3, 4, 0, 1, 2]  # torch.roll semantics


def test_config_and_size_errors_name_the_field():
    with pytest.raises(PanoramaValueError, match=r"^pad: must be an integer >= 0 \(got -1\)$"):
        PanoramaConfig(pad=-1)
    with pytest.raises(PanoramaValueError, match=r"^roll: must be one of off, fixed, random"):
        PanoramaConfig(roll="sideways")
    with pytest.raises(PanoramaValueError, match=r"^pad: exceeds the 8 token columns"):
        PanoramaConfig(pad=9).check_grid(GRID)
    with pytest.raises(PanoramaValueError, match=r"^height: must be a positive multiple of 16"):
        panorama_grid(72)
    assert panorama_grid(1024) == (64, 128)


def test_roll_offsets_are_deterministic():
    assert roll_offsets(PanoramaConfig(), 3, 8) == [0, 0, 0]
    assert roll_offsets(PanoramaConfig(roll="fixed", roll_step=3), 4, 8) == [0, 3, 6, 1]
    rand = [roll_offsets(PanoramaConfig(roll="random"), 6, 8, torch.Generator().manual_seed(1)) for _ in range(2)]
    assert rand[0] == rand[1] and all(0 <= s < 8 for s in rand[0]) and len(set(rand[0])) > 1


def test_opposite_id_pads_stay_exact_duplicates_of_their_source(conditioned):
    """DiT360 pads copy content *and* ids, so (refs and Assemble-Attn included) they compute what their source does."""
    model, cond = conditioned
    inputs = flux_inputs(1, GRID, TEXT)
    with torch.no_grad():
        direct = model_fn(model, inputs)(inputs["hidden_states"], inputs["img_ids"], cond)
        assert torch.equal(wrapped_forward(model_fn(model, inputs), inputs["hidden_states"], GRID, pad=0,
                                           conditioning=cond), direct)  # fmt: skip
        outputs: list[torch.Tensor] = []
        cropped = wrapped_forward(model_fn(model, inputs, outputs=outputs), inputs["hidden_states"], GRID, pad=2,
                                  conditioning=cond)  # fmt: skip
    full = outputs[0].reshape(1, GRID[0], GRID[1] + 4, -1)
    src = full[:, :, 2:-2]
    assert torch.allclose(full[:, :, :2], src[:, :, -2:], atol=1e-6)  # left pads = last two columns
    assert torch.allclose(full[:, :, -2:], src[:, :, :2], atol=1e-6)
    assert cropped.shape == direct.shape and not torch.allclose(cropped, direct, atol=1e-4)  # extra keys act


def test_remapped_conditioning_treats_pads_and_rolled_tokens_like_their_source(conditioned):
    _, cond = conditioned
    h, w = GRID
    for pad, shift in ((1, 0), (2, 3)):
        new = remap_conditioning(cond, GRID, pad, shift)
        src = token_sources(GRID, pad, shift)
        assert new.grid == (h, w + 2 * pad)
        assert torch.equal(new.image_regions.index, cond.image_regions.index[:, src])
        assert torch.equal(new.joint_regions.index[:, TEXT:], cond.joint_regions.index[:, TEXT:][:, src])
        assert torch.allclose(new.pool_weights.sum(-1), cond.pool_weights.sum(-1))  # pads weigh 0
        assert torch.equal(new.packing.cover[0], cond.packing.cover[0][src])
        for g in range(new.packing.num_groups):  # each box group = every padded token whose source is in it
            real = new.packing.key_mask[g, 1:]
            got = set((new.packing.token_index[g][real] % src.numel()).tolist())
            old = cond.packing.token_index[g][cond.packing.key_mask[g, 1:]] % (h * w)
            assert got == {i for i in range(src.numel()) if int(src[i]) in set(old.tolist())}
    with pytest.raises(ValueError, match="is not the panorama grid"):
        remap_conditioning(cond, (4, 6), 1)


# -------------------------------------------------------------------------------------------- periodic RoPE
def test_periodic_pos_embed_is_flux_pos_embed_without_a_period_and_wraps_with_one():
    ids = torch.cat([text_ids(3), latent_image_ids(4, 8)])
    for got, want in zip(PeriodicFluxPosEmbed(10000, [4, 6, 6])(ids), FluxPosEmbed(10000, [4, 6, 6])(ids), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    freqs = axis_frequencies(56, 10000, period=128)
    turns = freqs * 128 / (2 * torch.pi)
    assert torch.allclose(turns, turns.round(), atol=1e-9) and turns.min() == 1 and turns.max() == 20
    periodic = PeriodicFluxPosEmbed(10000, [16, 56, 56], period=128)
    shifted = latent_image_ids(2, 8) + torch.tensor([0.0, 0.0, 128.0])
    for a, b in zip(periodic(latent_image_ids(2, 8)), periodic(shifted), strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # column c and c + W: the same rotation


def test_periodic_rope_context_swaps_and_restores_pos_embed():
    transformer = make_tiny_flux()
    original = transformer.pos_embed
    with pytest.raises(RuntimeError), periodic_rope(transformer, 8) as pe:
        assert transformer.pos_embed is pe and pe.period == 8 and pe.axes_dim == list(original.axes_dim)
        raise RuntimeError
    assert transformer.pos_embed is original


@pytest.mark.parametrize("kind", ["stock", "conditioned"])
def test_periodic_rope_makes_the_forward_equivariant_to_a_horizontal_roll(kind, conditioned):
    """Rolling the image tokens (and masks) by s columns rolls the output by s when the column RoPE is periodic.

    Text tokens sit at column id 0, so the roll also moves the text anchor to column s (`anchor`); Assemble-Attn's
    layout token is anchored at column 0 too, hence `layout=False` for the conditioned model.
    """
    model, cond = conditioned if kind == "conditioned" else (make_tiny_flux(), None)
    transformer = model.transformer if kind == "conditioned" else model
    inputs = flux_inputs(1, GRID, TEXT, seed=3)
    x, shift = inputs["hidden_states"], 3

    def run(s):
        fn = model_fn(model, inputs, anchor=s, layout=False)
        rolled_cond = remap_conditioning(cond, GRID, 0, s) if cond is not None else None  # masks roll with x
        return roll_cols(wrapped_forward(fn, roll_cols(x, GRID, s), GRID, pad=0, conditioning=rolled_cond), GRID, -s)

    with torch.no_grad():
        with periodic_rope(transformer, GRID[1]):
            base, rolled = run(0), run(shift)
        assert (rolled - base).abs().max() < 1e-5
        assert (run(shift) - run(0)).abs().max() > 1e-3  # the stock RoPE is not periodic: the seam shows


def test_rolling_with_remapped_refs_matches_a_rolled_input(conditioned):
    """`wrapped_forward(shift=s)` rolls tokens and conditioning together: the same as rolling by hand."""
    model, cond = conditioned
    inputs = flux_inputs(1, GRID, TEXT, seed=4)
    with torch.no_grad(), periodic_rope(model.transformer, GRID[1]):
        by_shift = wrapped_forward(model_fn(model, inputs, anchor=2, layout=False), inputs["hidden_states"], GRID,
                                   pad=0, shift=2, conditioning=cond)  # fmt: skip
        plain = wrapped_forward(model_fn(model, inputs, layout=False), inputs["hidden_states"], GRID, pad=0,
                                conditioning=cond)  # fmt: skip
    assert (by_shift - plain).abs().max() < 1e-5


# ------------------------------------------------------------------------------------------- circular VAE
def test_circular_vae_padding_makes_decoder_and_encoder_roll_equivariant_and_is_undone():
    vae = tiny_vae()
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    z = torch.randn(1, 16, 4, 8, generator=torch.Generator().manual_seed(0))
    image = torch.randn(1, 3, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = vae.decode(z).sample
        assert (torch.roll(before, 8, -1) - vae.decode(torch.roll(z, 1, -1)).sample).abs().max() > 0.1
        with circular_width_padding(vae) as handle:
            assert handle.num_convs > 10
            dec = vae.decode(z).sample
            assert (torch.roll(dec, 8, -1) - vae.decode(torch.roll(z, 1, -1)).sample).abs().max() < 1e-5
            enc = vae.encode(image).latent_dist.mean  # the encoder's Downsample2D pads itself: handled too
            assert (torch.roll(enc, 1, -1) - vae.encode(torch.roll(image, 8, -1)).latent_dist.mean).abs().max() < 1e-5
            with pytest.raises(ValueError, match="already has circular width padding"):
                circular_width_padding(vae)
        assert torch.equal(vae.decode(z).sample, before)
    assert all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    assert all(not m._forward_pre_hooks for m in vae.modules())


def test_circular_vae_height_padding_modes():
    vae = tiny_vae()
    z = torch.randn(1, 16, 4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with circular_width_padding(vae):
            zeros = vae.decode(z).sample
        with circular_width_padding(vae, height_mode="replicate"):
            replicate = vae.decode(z).sample
    assert (zeros - replicate).abs().max() > 1e-3  # the poles see different padding
    with pytest.raises(ValueError, match="height_mode"):
        circular_width_padding(vae, height_mode="reflect")
