"""FillTask's loss weighting of the hole (`hole_weight`) and the gate warm start of a fresh SemanticCrossAttention
(`semantic_gate_init`), the two knobs of the second toy fill stage (examples/train/toy-fill-semantic.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moviepostproduction.errors import ValidationError
from moviepostproduction.fill.model import context_tokens
from moviepostproduction.toyworld.synthetic import ToyWorldConfig
from moviepostproduction.toyworld.tiny import write_tiny_model_dir
from moviepostproduction.toyworld.triptych import TriptychConfig
from moviepostproduction.training.fill_task import FillTask, FillTaskConfig
from moviepostproduction.training.recipe import Recipe

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
    assert recipe.fill["hole_weight"] == 4.0 and recipe.fill["semantic_gate_init"] == 0.25
    assert recipe.trainer["init_skip"] == ["semantic"] and recipe.init_from.endswith("step-003000")
