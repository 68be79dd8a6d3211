"""The shared trainer: exact resume, stages, warm start, non-finite stop, outputs (DESIGN 5)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from moviepostproduction.errors import ValidationError, WeightsError
from moviepostproduction.training.checkpoints import CheckpointStore
from moviepostproduction.training.task import LossOutput, TrainTask
from moviepostproduction.training.trainer import TrainConfig, Trainer, TrainingDiverged

X = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
Y = X @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


class LinearTask:
    """A small regression with every kind of randomness the real tasks have: data order, noise, dropout."""

    name = "linear"

    def __init__(self, nan_at: int | None = None, batch: int = 3):
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 1))
        self.frozen = nn.Linear(4, 4)
        self.calls, self.nan_at, self.batch = 0, nan_at, batch

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "frozen": self.frozen}

    def param_groups(self, stage: str) -> list[dict]:
        self.frozen.requires_grad_(False)
        layers = [self.net[0]] if stage == "first" else [self.net[0], self.net[2]]
        self.net.requires_grad_(False)
        for layer in layers:
            layer.requires_grad_(True)
        return [{"params": [p for layer in layers for p in layer.parameters()], "lr": 0.1}]

    def batches(self, epoch: int, seed: int):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed * 100 + epoch))
        for i in range(0, len(X), self.batch):
            yield X[perm[i : i + self.batch]], Y[perm[i : i + self.batch]]

    def loss(self, batch, generator: torch.Generator) -> LossOutput:
        self.calls += 1
        x, y = batch
        pred = self.net(self.frozen(x) * 0 + x + 0.01 * torch.randn(x.shape, generator=generator))
        loss = ((pred - y) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return LossOutput(loss, {"mse": float(loss.detach())})

    def samples(self, generator: torch.Generator) -> Image.Image:
        self.sampled_with = self.net[0].weight.detach().clone()
        return Image.new("RGB", (8, 8), (int(self.calls) % 255, 0, 0))


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path), stage="all", max_steps=8, checkpoint_every=4, log_every=2, progress=False)
    return TrainConfig(**{**base, **kw})


def test_linear_task_satisfies_the_protocol():
    assert isinstance(LinearTask(), TrainTask)


def test_killed_and_resumed_run_matches_an_uninterrupted_one_step_for_step(tmp_path):
    full = Trainer(LinearTask(), config(tmp_path / "full", max_steps=10)).run()
    first = Trainer(LinearTask(), config(tmp_path / "cut", max_steps=6)).run()  # "killed" after step 6's checkpoint
    task = LinearTask()
    resumed = Trainer(task, config(tmp_path / "cut", max_steps=10)).run()
    assert first.losses == full.losses[:6]
    assert resumed.losses == full.losses  # bit-exact, step for step, including the 4 steps after the resume
    assert task.calls == 4  # only the remaining steps ran
    end = CheckpointStore.load(full.checkpoint).trainable
    for key, value in CheckpointStore.load(resumed.checkpoint).trainable.items():
        assert torch.equal(value, end[key])
    assert full.losses[-1] < full.losses[0] / 2  # it learns


def test_grad_accumulation_and_epochs_keep_position(tmp_path):
    a = Trainer(LinearTask(batch=3), config(tmp_path / "a", max_steps=5, grad_accum=2)).run()
    Trainer(LinearTask(batch=3), config(tmp_path / "b", max_steps=3, grad_accum=2)).run()
    b = Trainer(LinearTask(batch=3), config(tmp_path / "b", max_steps=5, grad_accum=2)).run()
    assert a.losses == b.losses  # 5 steps x 2 micro-batches cross the 4-batch epoch boundary, resumed mid-epoch
    state = json.loads((a.checkpoint / "state.json").read_text())
    assert (state["epoch"], state["index"]) == (2, 2)  # 10 micro-batches = 2 epochs of 4 + 2


def test_stage_freezes_everything_outside_its_groups(tmp_path):
    task = LinearTask()
    before = {k: v.clone() for k, v in task.net.state_dict().items()}
    frozen = {k: v.clone() for k, v in task.frozen.state_dict().items()}
    result = Trainer(task, config(tmp_path, stage="first", max_steps=3)).run()
    after = task.net.state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])
    assert torch.equal(after["2.weight"], before["2.weight"])
    assert all(torch.equal(v, frozen[k]) for k, v in task.frozen.state_dict().items())
    assert set(CheckpointStore.load(result.checkpoint).trainable) == {"net.0.weight", "net.0.bias"}


def test_resuming_another_stage_is_refused(tmp_path):
    Trainer(LinearTask(), config(tmp_path, stage="first", max_steps=2)).run()
    with pytest.raises(ValidationError, match="stage"):
        Trainer(LinearTask(), config(tmp_path, stage="all", max_steps=4)).run()


def test_warm_start_loads_matching_keys_and_reports_the_rest(tmp_path):
    first = Trainer(LinearTask(), config(tmp_path / "s1", stage="first", max_steps=2)).run()
    state = CheckpointStore.load(first.checkpoint).trainable
    state["net.0.bias"] = torch.zeros(3)  # wrong shape
    state["gone.weight"] = torch.zeros(1)
    from moviepostproduction.files import save_safetensors

    save_safetensors(state, tmp_path / "warm.safetensors")
    task = LinearTask()
    result = Trainer(task, config(tmp_path / "s2", max_steps=1, init_from=str(tmp_path / "warm.safetensors"))).run()
    report = result.warm_start
    assert "net.0.weight" in report.loaded
    assert report.unexpected == ["gone.weight"]
    assert report.mismatched == ["net.0.bias: checkpoint (3,) vs model (8,)"]
    assert {"net.2.weight", "net.2.bias"} <= set(report.missing)  # trained here, absent there: left at init
    assert json.loads((tmp_path / "s2" / "warm_start.json").read_text())["unexpected"] == ["gone.weight"]
    with pytest.raises(WeightsError, match="missing"):
        Trainer(LinearTask(), config(tmp_path / "s3", init_from=str(tmp_path / "absent.safetensors"))).run()


def test_warm_start_from_a_model_dir_reads_the_trained_modules_folders_only(tmp_path):
    from moviepostproduction.files import save_safetensors

    trained = {k: torch.randn(v.shape) for k, v in LinearTask().net.state_dict().items()}
    model = tmp_path / "model"
    (model / "net").mkdir(parents=True)
    (model / "frozen").mkdir()
    (model / "model_index.json").write_text("{}")
    save_safetensors({k: trained[k] for k in ("0.weight", "0.bias")}, model / "net" / "part-00001-of-00002.safetensors")
    save_safetensors({k: trained[k] for k in ("2.weight", "2.bias")}, model / "net" / "part-00002-of-00002.safetensors")
    save_safetensors({"weight": torch.zeros(4, 4), "bias": torch.zeros(4)}, model / "frozen" / "model.safetensors")
    task = LinearTask()
    frozen = task.frozen.weight.detach().clone()
    report = Trainer(task, config(tmp_path / "s", init_from=str(model))).warm_start(model)
    assert sorted(report.loaded) == sorted(f"net.{k}" for k in trained) and report.missing == []
    assert all(torch.equal(task.net.state_dict()[k], v) for k, v in trained.items())  # both shards
    assert torch.equal(task.frozen.weight, frozen)  # not trained: its folder is not read
    (model / "net" / "part-00001-of-00002.safetensors").unlink()
    (model / "net" / "part-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"model: a model dir with no \.safetensors in net/"):
        Trainer(LinearTask(), config(tmp_path / "s2", init_from=str(model))).warm_start(model)
    with pytest.raises(WeightsError, match=r"missing .*trainable\.safetensors"):
        Trainer(LinearTask(), config(tmp_path / "s3")).warm_start(tmp_path)  # neither a checkpoint nor a model dir


def test_init_skip_leaves_the_named_keys_at_init(tmp_path):
    first = Trainer(LinearTask(), config(tmp_path / "s1", stage="first", max_steps=2)).run()
    trained = CheckpointStore.load(first.checkpoint).trainable
    task = LinearTask()
    init_bias = task.net[0].bias.detach().clone()
    trainer = Trainer(task, config(tmp_path / "s2", init_from=str(first.checkpoint), init_skip=["net.0.bias"]))
    report = trainer.warm_start(first.checkpoint)
    assert "net.0.weight" in report.loaded and "net.0.bias" in report.missing
    assert torch.equal(task.net[0].weight, trained["net.0.weight"])
    assert torch.equal(task.net[0].bias, init_bias) and not torch.equal(init_bias, trained["net.0.bias"])
    with pytest.raises(ValidationError, match=r"init_skip.*key prefixes"):
        config(tmp_path / "s3", init_skip=[""])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"non-finite loss nan at step 6 .*step-000004"):
        Trainer(LinearTask(nan_at=6), config(tmp_path, max_steps=8)).run()
    store = CheckpointStore(tmp_path / "checkpoints")
    assert [p.name for p in store.complete()] == ["step-000004"]
    assert CheckpointStore.load(store.latest()).state["step"] == 4


def test_outputs_samples_curves_tensorboard_and_pruning(tmp_path):
    result = Trainer(LinearTask(), config(tmp_path, max_steps=8, sample_every=4, checkpoint_every=2)).run()
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-000004.png", "step-000008.png"]
    assert Image.open(tmp_path / "curves.png").size == (640, 360)
    assert json.loads((tmp_path / "losses.json").read_text()) == result.losses
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert [p.name for p in CheckpointStore(tmp_path / "checkpoints").complete()] == ["step-000006", "step-000008"]
    assert [e["step"] for e in result.logs] == [2, 4, 6, 8] and all("mse" in e for e in result.logs)


def test_bad_config_is_one_line_per_field(tmp_path):
    with pytest.raises(ValidationError) as err:
        config(tmp_path, mixed_precision="fp8", grad_accum=0)
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and "mixed_precision" in lines[0] and "grad_accum" in lines[1]


def test_schedule_warms_up_holds_and_cools_down_to_zero(tmp_path):
    trainer = Trainer(LinearTask(), config(tmp_path, max_steps=10, warmup_steps=2, decay_steps=4))
    factors = [trainer.lr_factor(step) for step in range(1, 11)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    result = Trainer(LinearTask(), config(tmp_path / "run", max_steps=10, warmup_steps=2, decay_steps=4)).run()
    assert [e["lr"] for e in result.logs] == pytest.approx([0.1, 0.1, 0.1, 0.075, 0.025])  # logged every 2 steps


def test_lr_scale_multiplies_the_stage_rates_over_the_whole_schedule(tmp_path):
    kw = dict(max_steps=10, warmup_steps=2, decay_steps=4)
    full = Trainer(LinearTask(), config(tmp_path / "full", **kw)).run()
    scaled = Trainer(LinearTask(), config(tmp_path / "scaled", lr_scale=0.25, **kw)).run()
    assert [e["lr"] for e in scaled.logs] == pytest.approx([0.25 * e["lr"] for e in full.logs])
    assert scaled.losses[0] == full.losses[0] and scaled.losses[-1] != full.losses[-1]  # same batches, smaller steps


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), "0.1", True])
def test_lr_scale_must_be_a_positive_number(tmp_path, value):
    with pytest.raises(ValidationError, match=r"^lr_scale: must be a positive number \(1: the stage's LRs\) \(got "):
        config(tmp_path, lr_scale=value)


def test_schedule_lengths_must_fit_in_the_run(tmp_path):
    with pytest.raises(ValidationError, match=r"^decay_steps: must be an integer in \[0, max_steps=8\] \(got 20\)$"):
        config(tmp_path, decay_steps=20)


def test_ema_follows_its_warm_up_formula():
    from moviepostproduction.training.ema import EmaWeights, ema_decay_at

    assert [ema_decay_at(0.5, s) for s in (1, 9, 100)] == [0.1, 0.5, 0.5]
    weights = [torch.full((2,), float(v)) for v in (1.0, 3.0, -2.0)]
    ema = EmaWeights({"w": torch.zeros(2)}, decay=0.95)
    expected = torch.zeros(2)
    for step, w in enumerate(weights, start=1):
        ema.update({"w": w}, step)
        d = min(0.95, step / (step + 9))
        expected = d * expected + (1 - d) * w
    torch.testing.assert_close(ema.shadow["w"], expected, rtol=0, atol=1e-6)
    live = {"w": torch.tensor([7.0, 8.0])}
    with ema.applied(live):
        assert torch.equal(live["w"], ema.shadow["w"])
    assert torch.equal(live["w"], torch.tensor([7.0, 8.0]))


def test_ema_resumes_exactly_and_is_what_a_run_ends_with(tmp_path):
    full_task = LinearTask()
    full = Trainer(full_task, config(tmp_path / "full", max_steps=10, ema_decay=0.9)).run()
    Trainer(LinearTask(), config(tmp_path / "cut", max_steps=6, ema_decay=0.9)).run()
    resumed = Trainer(LinearTask(), config(tmp_path / "cut", max_steps=10, ema_decay=0.9)).run()
    a, b = CheckpointStore.load(full.checkpoint), CheckpointStore.load(resumed.checkpoint)
    assert resumed.losses == full.losses
    assert set(a.ema) == set(a.trainable) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    for key, value in b.ema.items():
        assert torch.equal(value, a.ema[key])  # the average continues bit-exactly after the resume
    assert not torch.equal(a.ema["net.0.weight"], a.trainable["net.0.weight"])  # the raw weights are kept too
    assert torch.equal(full_task.net[0].weight, a.ema["net.0.weight"])  # the run hands on the average
    assert torch.equal(full_task.sampled_with, a.ema["net.0.weight"])  # and samples with it
    plain = Trainer(LinearTask(), config(tmp_path / "plain", max_steps=2)).run()
    assert CheckpointStore.load(plain.checkpoint).ema is None and not (plain.checkpoint / "ema.safetensors").exists()


def test_ema_decay_must_be_below_one(tmp_path):
    with pytest.raises(ValidationError, match=r"^ema_decay: must be a number in \[0, 1\) \(0: no EMA\) \(got 1.0\)$"):
        config(tmp_path, ema_decay=1.0)


def test_ema_switched_on_at_a_resume_starts_from_the_checkpoint_weights(tmp_path):
    Trainer(LinearTask(), config(tmp_path, max_steps=4)).run()
    raw = CheckpointStore.load(CheckpointStore(tmp_path / "checkpoints").latest()).trainable
    trainer = Trainer(LinearTask(), config(tmp_path, max_steps=4, ema_decay=0.9))
    trainer.run()  # nothing left to train: the average is the checkpoint's weights
    assert all(torch.equal(trainer.ema.shadow[k], v) for k, v in raw.items())
