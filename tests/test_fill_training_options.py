"""The knobs of the second toy fill stage (examples/train/toy-fill-semantic.yaml): FillTask's loss weighting of the
hole (`hole_weight`), the gate warm start of a fresh SemanticCrossAttention (`semantic_gate_init`) and its locality
bias (`SemanticAttentionConfig.locality`) and where its residual goes (`residual_on`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moviepostproduction.errors import ValidationError
from moviepostproduction.fill.model import FillFlux, context_tokens
from moviepostproduction.fill.semantic_attention import (
    SemanticAttentionConfig,
    SemanticCrossAttention,
    SemanticTokens,
    grid_positions,
)
from moviepostproduction.fill.weights import FillWeightsConfig
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.toyworld.triptych import TriptychConfig
from moviepostproduction.training.fill_task import FillTask, FillTaskConfig
from moviepostproduction.training.recipe import Recipe

from helpers import flux_inputs, make_tiny_flux

TOY = TriptychConfig(world=ToyWorldConfig(size=32, ref_size=16))
BASE = dict(triptych=TOY, scenes=4, batch_size=2, max_text_tokens=8, train_x_embedder=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "plain", seed=0)


@pytest.mark.parametrize("layout", ["diptych", "single"])
def test_token_weights_mark_the_hole_and_drop_the_context_panel(tiny_dir, layout):
    task = FillTask.from_model_dir(tiny_dir, FillTaskConfig(layout=layout, hole_weight=5.0, **BASE))
    f = task.vae.downsample
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., : 2 * f, 2 * f : 4 * f] = 1  # exactly token (0, 1) of the 2 x 2 token grid of one 32 px panel
    panels = 2 if layout == "diptych" else 1
    weight = task.token_weights(mask, (2, 2 * panels))  # (1, N)
    grid = weight.reshape(2, 2 * panels)
    if layout == "diptych":
        assert torch.equal(grid[:, :2], torch.zeros(2, 2))  # the pinned context panel
        assert torch.equal(grid[:, 2:], torch.tensor([[1.0, 5.0], [1.0, 1.0]]))
    else:
        assert torch.equal(grid, torch.tensor([[1.0, 5.0], [1.0, 1.0]]))


def test_hole_weight_one_is_the_plain_mean_over_the_generated_tokens(tiny_dir):
    task = FillTask.from_model_dir(tiny_dir, FillTaskConfig(**BASE))
    mask = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    weight = task.token_weights(mask, (2, 4))
    assert torch.equal(weight, (~context_tokens("diptych", (2, 4))).float().expand(2, -1))
    batch = next(task.batches(0, 0))
    plain = task.loss(batch, torch.Generator().manual_seed(3)).loss
    heavy = FillTask.from_model_dir(tiny_dir, FillTaskConfig(hole_weight=4.0, **BASE))
    heavy.model.load_state_dict(task.model.state_dict())
    assert not torch.equal(heavy.loss(batch, torch.Generator().manual_seed(3)).loss, plain)


def test_a_fresh_gate_starts_where_the_config_says(tiny_dir):
    task = FillTask.from_model_dir(tiny_dir, FillTaskConfig(semantic_gate_init=0.25, **BASE))
    assert float(task.model.semantic.gate.detach()) == 0.25
    assert float(FillTask.from_model_dir(tiny_dir, FillTaskConfig(**BASE)).model.semantic.gate.detach()) == 0.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hole_weight", 0.0, "positive"),
        ("hole_weight", float("nan"), "positive"),
        ("semantic_gate_init", float("inf"), "finite"),
    ],
)
def test_bad_options_are_named(field, value, message):
    with pytest.raises(ValidationError, match=rf"{field}.*{message}"):
        FillTaskConfig(**{field: value})


def test_the_second_stage_recipe_reads():
    recipe = Recipe.from_file(Path(__file__).resolve().parents[1] / "examples/train/toy-fill-semantic.yaml")
    assert recipe.fill["hole_weight"] == 4.0 and recipe.fill["semantic_gate_init"] == 0.1
    assert recipe.fill["semantic_residual_on"] == "condition" and recipe.fill["semantic_locality"] == 0.1
    assert recipe.trainer["init_skip"] == ["semantic"] and recipe.init_from.endswith("step-003000")


# ------------------------------------------------------------------------------------------- locality bias
def local_attention(locality: float) -> SemanticCrossAttention:
    torch.manual_seed(0)
    sem = SemanticCrossAttention(SemanticAttentionConfig(64, 64, 8, True, locality=locality))
    return sem


def test_locality_keeps_the_identity_at_init_and_reads_the_map_where_the_token_is():
    pos = grid_positions(8, 8)
    x, s = torch.randn(1, 64, 64), torch.randn(1, 64, 64)
    sem = local_attention(0.05)
    assert torch.equal(sem(x, s, x_positions=pos, context_positions=pos), x)  # gate 0: exactly the identity
    with torch.no_grad():
        sem.gate.fill_(1.0)
        base = sem(x, s, x_positions=pos, context_positions=pos)
        far, near = s.clone(), s.clone()
        far[:, 63] = torch.randn(64)  # the map token at (7, 7) (a new token: LayerNorm ignores a constant shift)
        near[:, 1] = torch.randn(64)  # the map token at (0, 1), next to query (0, 0)
        moved_far = sem(x, far, x_positions=pos, context_positions=pos)
        moved_near = sem(x, near, x_positions=pos, context_positions=pos)
    assert torch.allclose(moved_far[:, 0], base[:, 0], atol=1e-6)  # 7 cells away: no weight at w = 0.05
    assert (moved_near[:, 0] - base[:, 0]).abs().max() > 1e-2
    plain = local_attention(0.0)
    with torch.no_grad():
        plain.gate.fill_(1.0)
        assert not torch.allclose(plain(x, far, x_positions=pos, context_positions=pos)[:, 0],
                                  plain(x, s, x_positions=pos, context_positions=pos)[:, 0], atol=1e-6)  # fmt: skip


def test_locality_with_a_padding_mask_and_its_config_round_trip():
    pos = grid_positions(2, 2)
    sem = local_attention(0.1)
    with torch.no_grad():
        sem.gate.fill_(1.0)
        x, s = torch.randn(2, 4, 64), torch.randn(2, 4, 64)
        mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
        out = sem(x, s, x_positions=pos, context_positions=pos, context_mask=mask)
        changed = s.clone()
        changed[0, 2:] = torch.randn(2, 64)  # padded tokens
        again = sem(x, changed, x_positions=pos, context_positions=pos, context_mask=mask)
    assert torch.isfinite(out).all() and torch.equal(out, again) and torch.equal(out[1], x[1])
    raw = {"layout": "diptych", "semantic": dataclasses.asdict(sem.cfg)}
    assert FillWeightsConfig.from_dict(raw).semantic.locality == 0.1
    with pytest.raises(ValueError, match="locality"):
        SemanticAttentionConfig(64, 64, 8, locality=-1.0)
    with pytest.raises(ValueError, match="x_positions"):
        sem(x, s)
    with pytest.raises(ValidationError, match="semantic_locality"):
        FillTaskConfig(semantic_locality=-0.1)


# ------------------------------------------------------------------------------------ residual placement
def test_a_condition_residual_changes_only_the_masked_image_latent():
    transformer = make_tiny_flux(in_channels=384, out_channels=64)
    cfg = SemanticAttentionConfig(64, 64, 8, True, locality=0.1, residual_on="condition")
    model = FillFlux(transformer, SemanticCrossAttention(cfg))
    kw = flux_inputs(1, (2, 4), 5)
    latents = kw.pop("hidden_states")
    cond = torch.randn(1, 8, 320, generator=torch.Generator().manual_seed(1))
    tokens = SemanticTokens(torch.randn(1, 4, 64), grid_positions(2, 2))
    seen = []

    def capture(module, args, kwargs):
        seen.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone())

    transformer.register_forward_pre_hook(capture, with_kwargs=True)
    run = dict(**kw, semantic=tokens, latent_positions=grid_positions(2, 4, panels=2))
    with torch.no_grad():
        model(latents, cond, **run)
        model.semantic.gate.fill_(0.5)
        model(latents, cond, **run)
    assert torch.equal(seen[0], torch.cat([latents, cond], 2))  # gate 0: exactly the stock input
    assert torch.equal(seen[1][..., :64], latents)  # the noisy latent is left alone
    assert not torch.allclose(seen[1][..., 64:128], cond[..., :64])  # the masked-image latent carries the map
    assert torch.equal(seen[1][..., 128:], cond[..., 64:])  # the mask channels are left alone
    with pytest.raises(ValueError, match="residual_on"):
        SemanticAttentionConfig(64, 64, residual_on="text")
    with pytest.raises(ValidationError, match="semantic_residual_on"):
        FillTaskConfig(semantic_residual_on="text")


def test_a_warm_started_fill_export_counts_the_steps_of_the_whole_chain(tiny_dir, tmp_path):
    import json

    from moviepostproduction.training.recipe import run_recipe

    def recipe(name: str, steps: int, init_from: str | None) -> Recipe:
        trainer = {"max_steps": steps, "checkpoint_every": steps, "sample_every": steps, "log_every": 1,
                   "progress": False, "tensorboard": False}  # fmt: skip
        if init_from:
            trainer["init_skip"] = ["semantic"]
        text = {"task": "fill", "model": str(tiny_dir), "data": "unused", "out": str(tmp_path / name),
                "stage": "all", "export": str(tmp_path / f"{name}-export"), "init_from": init_from,
                "trainer": trainer, "fill": {"train_x_embedder": True, "scenes": 2, "batch_size": 2,
                "max_text_tokens": 8, "sample_count": 1, "sample_steps": 1,
                "triptych": {"world": {"size": 32, "ref_size": 16}}}}  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(text))
        return Recipe.from_file(tmp_path / f"{name}.json")

    run_recipe(recipe("first", 2, None))
    run_recipe(recipe("second", 1, str(tmp_path / "first" / "checkpoints" / "step-000002")))
    label = json.loads((tmp_path / "second-export" / "model_index.json").read_text())["label"]
    assert label.startswith("fill model (3 steps, task fill)"), label
