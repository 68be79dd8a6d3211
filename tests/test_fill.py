"""Fill (DESIGN 7, seed 004): FLUX-Fill packing against independent loops, SemanticCrossAttention invariants, parity
with the stock diffusers forward at init, toy-world triptychs, the training task through the shared trainer, and
`mpp fill` keeping every pixel outside the mask bit-exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from PIL import Image
from typer.testing import CliRunner

from moviepostproduction.cli import app
from moviepostproduction.errors import ValidationError, WeightsError
from moviepostproduction.fill.model import (
    FillChannels,
    FillFlux,
    arrange,
    binarize_mask,
    check_fill_transformer,
    context_tokens,
    crop_target,
    expand_to_fill,
    fill_condition,
    masked_image,
    pack_mask,
    split_condition,
    unpack_mask,
)
from moviepostproduction.fill.pipeline import FillPipeline
from moviepostproduction.fill.semantic_attention import (
    SemanticAttentionConfig,
    SemanticCrossAttention,
    SemanticTokens,
    grid_positions,
)
from moviepostproduction.fill.weights import write_fill_model_dir
from moviepostproduction.sampling import latent_image_ids, pack_latents, text_ids, unpack_latents
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import TinySpec, tiny_configs, write_tiny_model_dir
from moviepostproduction.toyworld.toy_model import tiny_random_fill_dir
from moviepostproduction.toyworld.triptych import HOLE_GREY, MASK_MODES, TriptychConfig, collate, make_triptych
from moviepostproduction.training.fill_task import FillTask, FillTaskConfig, export_fill_model_dir
from moviepostproduction.training.trainer import TrainConfig, Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOY = TriptychConfig(world=ToyWorldConfig(size=32, ref_size=16))


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "plain", seed=0)


@pytest.fixture(scope="module")
def fill_dir(tiny_dir, tmp_path_factory) -> Path:
    return write_fill_model_dir(tiny_dir, tmp_path_factory.mktemp("fill") / "fill", seed=0)


def tiny_fill_transformer(seed: int = 0) -> FluxTransformer2DModel:
    spec = TinySpec()
    cfg = tiny_configs(spec).transformer
    channels = FillChannels.from_vae(spec.latent_channels, 2 ** (len(spec.vae_channels) - 1))
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**cfg, "in_channels": channels.total, "out_channels": channels.latent}).eval()


def flux_inputs(transformer, grid=(2, 4), text_len=5, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cfg, (h, w) = transformer.config, grid
    return dict(
        encoder_hidden_states=torch.randn(1, text_len, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.7]),
        img_ids=latent_image_ids(h, w),
        txt_ids=text_ids(text_len),
        guidance=torch.tensor([30.0]),
    )


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


# -------------------------------------------------------------------------------------------------- packing
def test_channels_derive_from_the_vae_384_on_flux():
    flux = FillChannels.from_vae(latent_channels=16, vae_factor=8)
    assert (flux.latent, flux.mask, flux.condition, flux.total) == (64, 256, 320, 384)
    small = FillChannels.from_vae(latent_channels=4, vae_factor=4)
    assert (small.latent, small.mask, small.total) == (16, 64, 96)


def test_pack_mask_equals_explicit_loops():
    f, b, height, width = 8, 2, 32, 48
    mask = torch.rand(b, 1, height, width, generator=torch.Generator().manual_seed(0))  # any values: placement only
    got = pack_mask(mask, f).numpy()
    m = mask.numpy()
    h2, w2 = height // (2 * f), width // (2 * f)
    ref = np.zeros((b, h2 * w2, 4 * f * f), dtype=np.float32)
    for n in range(b):
        for i in range(h2):
            for j in range(w2):
                for fh in range(f):
                    for fw in range(f):
                        for ph in range(2):
                            for pw in range(2):  # channel: folded (fh, fw) major, 2x2 packing (ph, pw) minor
                                c = (fh * f + fw) * 4 + ph * 2 + pw
                                ref[n, i * w2 + j, c] = m[n, 0, (2 * i + ph) * f + fh, (2 * j + pw) * f + fw]
    np.testing.assert_array_equal(got, ref)


def test_pack_latents_equals_explicit_loops():
    lat = torch.randn(1, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    got, x = pack_latents(lat).numpy(), lat.numpy()
    for i in range(2):
        for j in range(3):
            for c in range(3):
                for ph in range(2):
                    for pw in range(2):
                        assert got[0, i * 3 + j, c * 4 + ph * 2 + pw] == x[0, c, 2 * i + ph, 2 * j + pw]


def test_pack_unpack_and_condition_split_round_trip():
    gen = torch.Generator().manual_seed(2)
    mask = (torch.rand(2, 1, 32, 16, generator=gen) > 0.5).float()
    assert torch.equal(unpack_mask(pack_mask(mask, 8), 32, 16, 8), mask)
    lat = torch.randn(2, 16, 4, 2, generator=gen)
    assert torch.equal(unpack_latents(pack_latents(lat), 4, 2), lat)
    cond = fill_condition(lat, mask, 8)
    channels = FillChannels.from_vae(16, 8)
    assert cond.shape == (2, 2, channels.condition)
    packed_lat, packed_mask = split_condition(cond, channels)
    assert torch.equal(packed_lat, pack_latents(lat)) and torch.equal(packed_mask, pack_mask(mask, 8))


def test_binarize_and_masked_image_follow_diffusers():
    mask = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.9, 1.0])
    assert binarize_mask(mask).tolist() == [0, 0, 0, 1, 1, 1]  # white (>= 0.5) = repaint
    image = torch.full((1, 3, 2, 2), 0.8)
    hole = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    out = masked_image(image, hole)
    assert out[0, :, 0, 0].eq(0).all() and out[0, :, 1, 1].eq(0.8).all()  # repainted pixels are 0 = mid grey


def test_diptych_arrangement_context_and_crop():
    gen = torch.Generator().manual_seed(3)
    image, hole = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1, torch.zeros(1, 1, 32, 32)
    hole[..., 8:20, 4:30] = 1
    dip = arrange("diptych", image, hole)
    assert dip.image.shape == (1, 3, 32, 64) and dip.panels == 2
    assert torch.equal(dip.image[..., :32], masked_image(image, hole)) and torch.equal(dip.image[..., 32:], image)
    assert torch.equal(dip.mask[..., :32], hole) and dip.mask[..., 32:].eq(1).all()
    ctx = context_tokens("diptych", (2, 4)).view(2, 4)
    assert ctx[:, :2].all() and not ctx[:, 2:].any()
    assert not context_tokens("single", (2, 2)).any()
    assert torch.equal(crop_target(dip.image, 2), image)
    single = arrange("single", image, hole)
    assert single.image is image and single.panels == 1


def test_a_plain_transformer_config_is_refused_naming_the_expected_channels():
    with pytest.raises(WeightsError, match=r"cfg.json has in_channels=64.*expected .*in_channels=384"):
        check_fill_transformer({"in_channels": 64, "out_channels": None}, FillChannels.from_vae(16, 8), "cfg.json")


# ------------------------------------------------------------------------------------ semantic attention
def positions(n: int) -> torch.Tensor:
    return torch.rand(n, 2, generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("positional", [True, False])
def test_semantic_attention_is_exactly_identity_at_init_with_different_token_counts(positional):
    attn = SemanticCrossAttention(SemanticAttentionConfig(dim=64, context_dim=32, heads=8, positional=positional))
    gen = torch.Generator().manual_seed(0)
    x, s = torch.randn(2, 6, 64, generator=gen), torch.randn(2, 10, 32, generator=gen)
    out = attn(x, s, x_positions=positions(6), context_positions=positions(10))
    assert out.shape == (2, 6, 64) and torch.equal(out, x)


def test_only_the_gate_gets_gradient_at_init_and_one_step_opens_it():
    attn = SemanticCrossAttention(SemanticAttentionConfig(dim=16, context_dim=16, heads=4))
    gen = torch.Generator().manual_seed(1)
    x, s, target = (torch.randn(1, 5, 16, generator=gen) for _ in range(3))
    kw = dict(x_positions=positions(5), context_positions=positions(5))
    loss = (attn(x, s, **kw) - target).pow(2).mean()
    loss.backward()
    assert attn.gate.grad is not None and attn.gate.grad.abs() > 0
    assert attn.q.weight.grad.abs().sum() == 0  # behind a zero gate: the gate must move first
    torch.optim.SGD(attn.parameters(), lr=0.1).step()
    assert attn.gate.item() != 0 and not torch.equal(attn(x, s, **kw), x)


def test_padding_mask_ignores_padded_tokens_and_an_empty_map_is_identity():
    attn = SemanticCrossAttention(SemanticAttentionConfig(dim=16, context_dim=16, heads=2))
    with torch.no_grad():
        attn.gate.fill_(0.7)
    gen = torch.Generator().manual_seed(2)
    x, s = torch.randn(2, 4, 16, generator=gen), torch.randn(2, 3, 16, generator=gen)
    pos_x, pos_s = positions(4), positions(3)
    padded = torch.cat([s, 1e3 * torch.randn(2, 2, 16, generator=gen)], dim=1)
    pos_pad = torch.cat([pos_s, torch.rand(2, 2, generator=gen)])
    mask = torch.tensor([[True, True, True, False, False], [False] * 5])
    got = attn(x, padded, x_positions=pos_x, context_positions=pos_pad, context_mask=mask)
    want = attn(x[:1], s[:1], x_positions=pos_x, context_positions=pos_s)
    torch.testing.assert_close(got[:1], want, rtol=0, atol=1e-6)
    assert torch.equal(got[1], x[1])  # nothing to attend to: no residual, no NaN


def test_position_features_make_the_map_say_where():
    gen = torch.Generator().manual_seed(3)
    x, s = torch.randn(1, 4, 16, generator=gen), torch.randn(1, 6, 16, generator=gen)
    pos_x, pos_s, perm = positions(4), positions(6), torch.tensor([3, 0, 5, 1, 4, 2])
    for positional in (False, True):
        attn = SemanticCrossAttention(SemanticAttentionConfig(dim=16, context_dim=16, heads=2, positional=positional))
        with torch.no_grad():
            attn.gate.fill_(1.0)
        base = attn(x, s, x_positions=pos_x, context_positions=pos_s)
        moved = attn(x, s[:, perm], x_positions=pos_x, context_positions=pos_s)  # same classes, other places
        relabelled = attn(x, s[:, perm], x_positions=pos_x, context_positions=pos_s[perm])  # same map
        torch.testing.assert_close(relabelled, base, rtol=0, atol=1e-6)
        assert torch.allclose(moved, base, atol=1e-6) is (not positional)


def test_grid_positions_are_panel_local_and_config_is_checked():
    pos = grid_positions(2, 4, panels=2).view(2, 4, 2)
    assert torch.equal(pos[:, :2], pos[:, 2:])  # a diptych's context and target share coordinates
    torch.testing.assert_close(pos[0, :2, 1], torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="heads=5"):
        SemanticAttentionConfig(dim=64, heads=5)


# ------------------------------------------------------------------------------------------ FLUX injection
def test_fill_flux_at_init_equals_the_plain_diffusers_forward():
    transformer = tiny_fill_transformer()
    channels = FillChannels.from_vae(16, 8)
    semantic = SemanticCrossAttention(SemanticAttentionConfig(dim=channels.latent, context_dim=channels.latent))
    model = FillFlux(transformer, semantic)
    gen = torch.Generator().manual_seed(4)
    latents, cond = (
        torch.randn(1, 8, channels.latent, generator=gen),
        torch.randn(1, 8, channels.condition, generator=gen),
    )
    sem = SemanticTokens(torch.randn(1, 4, channels.latent, generator=gen), grid_positions(2, 2))
    kw = flux_inputs(transformer)
    with torch.no_grad():
        plain = transformer(hidden_states=torch.cat([latents, cond], 2), return_dict=False, **kw)[0]
        ours = model(latents, cond, **kw, semantic=sem, latent_positions=grid_positions(2, 4, panels=2))
        assert plain.shape == (1, 8, channels.latent)
        assert (ours - plain).abs().max() <= 1e-5
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        with_lora = model(latents, cond, **kw, semantic=sem, latent_positions=grid_positions(2, 4, panels=2))
        assert (with_lora - plain).abs().max() <= 1e-5  # LoRA B is zero at init
        semantic.gate.fill_(0.5)
        opened = model(latents, cond, **kw, semantic=sem, latent_positions=grid_positions(2, 4, panels=2))
    assert (opened - plain).abs().max() > 1e-4  # the semantic map now reaches the velocity


def test_expand_to_fill_ignores_the_condition_and_equals_the_plain_model():
    spec = TinySpec()
    torch.manual_seed(0)
    plain = FluxTransformer2DModel(**tiny_configs(spec).transformer).eval()
    channels = FillChannels.from_vae(spec.latent_channels, 8)
    wide = expand_to_fill(plain, channels)
    assert (wide.config.in_channels, wide.config.out_channels) == (channels.total, channels.latent)
    gen = torch.Generator().manual_seed(5)
    x, kw = torch.randn(1, 8, channels.latent, generator=gen), flux_inputs(plain)
    with torch.no_grad():
        want = plain(hidden_states=x, return_dict=False, **kw)[0]
        for cond in (torch.zeros(1, 8, channels.condition), torch.randn(1, 8, channels.condition, generator=gen)):
            got = wide(hidden_states=torch.cat([x, cond], 2), return_dict=False, **kw)[0]
            assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="in_channels=64"):
        expand_to_fill(wide, channels)


# ------------------------------------------------------------------------------------------------ triptychs
def test_triptychs_are_deterministic_and_each_mode_cuts_a_real_hole():
    a, b = make_triptych(3, 7, TOY), make_triptych(3, 7, TOY)
    assert np.array_equal(a.target, b.target) and np.array_equal(a.mask, b.mask) and a.mode == b.mode
    assert a.image().size == (96, 32)  # [visible | target | semantic]
    for mode in MASK_MODES:
        tri = make_triptych(0, 1, TriptychConfig(world=TOY.world, modes=(mode,)))
        assert tri.mode == mode and tri.mask.any() and not tri.mask.all()
        assert np.array_equal(tri.visible[~tri.mask], tri.target[~tri.mask])
        assert (tri.visible[tri.mask] == HOLE_GREY).all()
    band = make_triptych(2, 1, TriptychConfig(world=TOY.world, modes=("extend",))).mask
    assert band[0].all() or band[-1].all() or band[:, 0].all() or band[:, -1].all()  # set extension: an edge band
    batch = collate([a, make_triptych(4, 7, TOY)])
    assert batch.target.shape == (2, 3, 32, 32) and batch.mask.shape == (2, 1, 32, 32)
    assert batch.target.min() >= -1 and batch.target.max() <= 1 and set(batch.mask.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValidationError, match="modes"):
        TriptychConfig(modes=("lasso",))


# ----------------------------------------------------------------------------------------------- training
TASK_CFG = FillTaskConfig(
    triptych=TOY, scenes=4, batch_size=2, max_text_tokens=8, sample_count=1, sample_steps=1, train_x_embedder=True
)


def test_task_loss_trains_only_lora_semantic_and_x_embedder(tiny_dir):
    task = FillTask.from_model_dir(tiny_dir, TASK_CFG)
    groups = task.param_groups("all")
    trained = {id(p) for g in groups for p in g["params"]}
    out = task.loss(next(task.batches(0, 0)), torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.logs["gate"] == 0.0
    out.loss.backward()
    named = {f"{m}.{n}": p for m, mod in task.modules().items() for n, p in mod.named_parameters()}
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and all(id(named[n]) in trained for n in with_grad)
    assert "semantic.gate" in with_grad and any("lora_B" in n for n in with_grad)
    assert not any(n.startswith(("vae.", "text_encoder.")) for n in with_grad)
    assert {n for n, p in named.items() if p.requires_grad} == {n for n, p in named.items() if id(p) in trained}
    semantic_only = {id(p) for g in task.param_groups("semantic") for p in g["params"]}
    assert semantic_only == {id(p) for p in task.model.semantic.parameters()}
    with pytest.raises(ValidationError, match="stage"):
        task.param_groups("2")


def test_plain_transformer_without_x_embedder_training_is_refused(tiny_dir):
    cfg = FillTaskConfig(triptych=TOY, scenes=2, batch_size=2)
    with pytest.raises(ValidationError, match="train_x_embedder"):
        FillTask.from_model_dir(tiny_dir, cfg)


def test_trainer_steps_then_export_loads_in_the_pipeline(tiny_dir, tmp_path):
    task = FillTask.from_model_dir(tiny_dir, TASK_CFG)
    config = TrainConfig(
        out_dir=str(tmp_path / "run"),
        stage="all",
        max_steps=2,
        checkpoint_every=2,
        log_every=1,
        progress=False,
        tensorboard=False,
    )
    result = Trainer(task, config).run()
    assert result.step == 2 and len(result.losses) == 2 and all(np.isfinite(result.losses))
    assert (tmp_path / "run" / "samples").is_dir()
    assert task.model.semantic.gate.item() != 0  # the gate opened
    out = export_fill_model_dir(task, tiny_dir, tmp_path / "model", steps=2)
    index = json.loads((out / "model_index.json").read_text())
    assert index["label"].startswith("fill model (2 steps, task fill) on ")
    from moviepostproduction.files import default_file_mode

    widened = list((out / "transformer").glob("*.safetensors"))
    assert widened and {oct(f.stat().st_mode & 0o777) for f in widened} == {oct(default_file_mode())}
    pipe = FillPipeline.from_model_dir(out, semantic=True)
    tri = make_triptych(1, 0, TOY, split="heldout")
    assert torch.equal(pipe.model.semantic.gate.detach(), task.model.semantic.gate.detach())
    trained = dict(task.model.transformer.named_parameters())
    loaded = dict(pipe.model.transformer.named_parameters())
    for name in [n for n in trained if "lora_B" in n or n.startswith("x_embedder")]:
        assert torch.equal(loaded[name], trained[name].detach()), name  # LoRA and x_embedder round-trip exactly
    assert pipe.layout == "diptych"
    img = np.asarray(
        pipe(tri.target, tri.mask, semantic=tri.semantic, num_inference_steps=1, max_text_tokens=8).images[0]
    )
    assert np.array_equal(img[~tri.mask], tri.target[~tri.mask])


# --------------------------------------------------------------------------------------------- pipeline/CLI
def test_cli_fill_keeps_every_pixel_outside_the_mask_bit_exactly(fill_dir, tmp_path):
    rng = np.random.default_rng(0)
    plate = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)  # not a multiple of 16: padded, then cropped
    mask = np.zeros((24, 40), dtype=np.uint8)
    mask[5:17, 9:30] = 255
    mask[0, 0] = 100  # grey below 50%: kept; grey above: repainted
    mask[23, 39] = 200
    sem = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    paths = [write_png(tmp_path / n, a) for n, a in (("plate.png", plate), ("mask.png", mask), ("sem.png", sem))]
    out = tmp_path / "out.png"
    args = ["fill", "--image", str(paths[0]), "--mask", str(paths[1]), "--semantic", str(paths[2]), "-o", str(out)]
    result = CliRunner().invoke(app, [*args, "--model", str(fill_dir), "--steps", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    got = np.asarray(Image.open(out))
    repaint = mask >= 128
    assert got.shape == plate.shape and got.dtype == np.uint8
    assert np.array_equal(got[~repaint], plate[~repaint])  # bit-exact paste-back
    assert not np.array_equal(got[repaint], plate[repaint])
    assert f"repainted {int(repaint.sum())} px" in result.output


def test_pipeline_is_seeded_and_takes_refs_with_their_boxes_as_mask(fill_dir, tmp_path):
    pipe = FillPipeline.from_model_dir(fill_dir, refs=True)
    plate = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    shutil.copytree(EXAMPLES / "refs", tmp_path / "refs")
    scene = {
        "caption": "a red circle",
        "width": 48,
        "height": 32,
        "refs": [{"image": "refs/red_circle.png", "bbox": [0.25, 0.25, 0.75, 0.75], "depth": "fg"}],
    }
    (tmp_path / "scene.json").write_text(json.dumps(scene))
    out = pipe(plate, scene=tmp_path / "scene.json", num_inference_steps=2, max_text_tokens=8, output_type="pt")
    assert out.mask.sum() == 16 * 24 and out.mask[8:24, 12:36].all()
    got = (out.images[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.array_equal(got[~out.mask], plate[~out.mask])
    a = pipe(plate, out.mask, prompt="a", num_inference_steps=1, max_text_tokens=8, seed=1, output_type="pt").images
    b = pipe(plate, out.mask, prompt="a", num_inference_steps=1, max_text_tokens=8, seed=1, output_type="pt").images
    c = pipe(plate, out.mask, prompt="a", num_inference_steps=1, max_text_tokens=8, seed=2, output_type="pt").images
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValidationError, match="non-finite"):
        pipe(np.full((16, 16, 3), np.nan), np.ones((16, 16), bool), num_inference_steps=1)


def test_default_fill_model_is_built_once_widened_and_labelled(tmp_path):
    first = tiny_random_fill_dir(tmp_path)
    stamp = (first / "fill" / "config.json").stat().st_mtime_ns
    assert tiny_random_fill_dir(tmp_path) == first and (first / "fill" / "config.json").stat().st_mtime_ns == stamp
    pipe = FillPipeline.from_model_dir(first, semantic=True)
    assert pipe.label.startswith("tiny-random") and pipe.layout == "single"
    assert (pipe.model.transformer.config.in_channels, pipe.model.transformer.config.out_channels) == (384, 64)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("size", "mask: size differs from the image's 40x24"),
        ("missing", "image: file not found"),
        ("black", "mask: marks no pixel to repaint"),
        ("plain", "in_channels=64"),
        ("no-semantic", "fill/config.json"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(case, expected, fill_dir, tiny_dir, tmp_path):
    plate = write_png(tmp_path / "plate.png", np.zeros((24, 40, 3), np.uint8))
    mask = write_png(tmp_path / "mask.png", np.full((24, 40) if case != "size" else (24, 32), 255, np.uint8))
    model = fill_dir
    extra = []
    if case == "missing":
        plate = tmp_path / "nope.png"
    elif case == "black":
        mask = write_png(tmp_path / "mask.png", np.zeros((24, 40), np.uint8))
    elif case == "plain":
        model = tiny_dir
    elif case == "no-semantic":
        model = tmp_path / "bare"
        shutil.copytree(fill_dir, model, ignore=shutil.ignore_patterns("fill"))
        extra = ["--semantic", str(plate)]
    args = ["fill", "--image", str(plate), "--mask", str(mask), "-o", str(tmp_path / "o.png"), "--model", str(model)]
    result = CliRunner().invoke(app, [*args, *extra, "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.png").exists()


def test_a_fill_recipe_sets_the_triptych_world_and_names_a_bad_nested_field(tmp_path):
    """`fill.triptych.world` holds ToyWorldConfig fields (examples/train/toy-fill.yaml trains at 128 px)."""
    from moviepostproduction.training.recipe import Recipe, _fill_config

    config = _fill_config(Recipe.from_file(Path(__file__).parents[1] / "examples" / "train" / "toy-fill.yaml"))
    assert config.triptych.world == ToyWorldConfig(size=128, ref_size=64, max_refs=3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: fill\nmodel: m\ndata: d\nout: o\nstage: all\nfill: {triptych: {world: {sise: 128}}}\n")
    result = CliRunner().invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert "fill.triptych.world.sise: unknown field" in line, line
