"""Trainer: learning, repeatability, masks held at zero, resume, divergence."""

import pytest
import torch
from conftest import train_cfg
from torch import nn

from dpai_lib import build_model, prunable_parameters, prune, seed_everything, train
from dpai_lib.data import TensorData


def _setup(seed=0, sparsity=0.9):
    seed_everything(seed, deterministic=True)
    model = build_model("resnet20", 10)
    masks = prune(model, "random", sparsity, input_shape=(3, 32, 32), seed=seed)
    return model, masks


def _small(data: TensorData, n: int) -> TensorData:
    return TensorData(data.images[:n], data.labels[:n], data.info)


def test_short_run_learns_well_above_chance_and_keeps_pruned_weights_zero(synthetic):
    train_set, test_set = synthetic
    model, masks = _setup()
    result = train(model, masks, train_set, test_set, train_cfg(epochs=2, lr_drops=[]), seed=0, device="cpu",
                   progress=False)
    assert result.status == "completed" and result.epochs_run == 2
    assert result.final_test_acc > 0.5  # chance is 0.1
    assert result.best_test_acc == max(r["test_acc"] for r in result.curves)
    assert [r["epoch"] for r in result.curves] == [1, 2]
    params = prunable_parameters(model)
    for n, m in masks.items():
        assert bool((params[n][~m] == 0).all()), n
    assert masks.kept() == sum(int((params[n] != 0).sum()) for n in masks)


def test_seeded_run_is_repeatable(synthetic):
    train_set, test_set = (_small(d, 512) for d in synthetic)
    states, curves = [], []
    for _ in range(2):
        model, masks = _setup(seed=5)
        res = train(model, masks, train_set, test_set, train_cfg(epochs=1), seed=5, device="cpu", progress=False)
        states.append(model.state_dict())
        curves.append([(r["train_loss"], r["test_acc"]) for r in res.curves])
    assert curves[0] == curves[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resume_after_interruption_matches_an_uninterrupted_run(synthetic, tmp_path):
    train_set, test_set = (_small(d, 384) for d in synthetic)
    cfg = train_cfg(epochs=3, lr_drops=[2])

    model, masks = _setup(seed=1)
    full = train(model, masks, train_set, test_set, cfg, seed=1, device="cpu", progress=False,
                 checkpoint_path=tmp_path / "full.pt")
    reference = model.state_dict()

    def interrupt(epoch, row):
        if epoch == 2:
            raise KeyboardInterrupt

    model, masks = _setup(seed=1)
    with pytest.raises(KeyboardInterrupt):
        train(model, masks, train_set, test_set, cfg, seed=1, device="cpu", progress=False,
              checkpoint_path=tmp_path / "cut.pt", on_epoch_end=interrupt)
    model, masks = _setup(seed=1)  # a fresh process would rebuild everything
    resumed = train(model, masks, train_set, test_set, cfg, seed=1, device="cpu", progress=False,
                    checkpoint_path=tmp_path / "cut.pt")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 3
    assert [r["test_acc"] for r in resumed.curves] == [r["test_acc"] for r in full.curves]
    assert [r["lr"] for r in resumed.curves] == pytest.approx([0.05, 0.05, 0.005])
    state = model.state_dict()
    assert all(torch.equal(reference[k], state[k]) for k in reference)

    other = train_cfg(epochs=3, lr_drops=[2], lr=0.1)
    model, masks = _setup(seed=1)
    with pytest.raises(ValueError, match="another run"):
        train(model, masks, train_set, test_set, other, seed=1, device="cpu", progress=False,
              checkpoint_path=tmp_path / "cut.pt")


class _NaNAfter(nn.Module):
    """A network whose logits become NaN from its fourth training forward on."""

    def __init__(self):
        super().__init__()
        self.net = build_model("resnet20", 10)
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= 4:
                out = out * float("nan")
        return out


def test_non_finite_loss_stops_the_run_with_its_reason(synthetic):
    train_set, test_set = (_small(d, 512) for d in synthetic)
    model = _NaNAfter()
    masks = prune(model, "random", 0.5, input_shape=(3, 32, 32))
    result = train(model, masks, train_set, test_set, train_cfg(epochs=2), seed=0, device="cpu", progress=False)
    assert result.status == "diverged"
    assert "non-finite training loss" in result.stop_reason and "epoch 1, batch 4" in result.stop_reason
    assert result.epochs_run == 0


def test_bad_device_is_a_clear_error(synthetic):
    model, masks = _setup()
    with pytest.raises(ValueError, match="device 'gpu9'|invalid device"):
        train(model, masks, *synthetic, train_cfg(), seed=0, device="gpu9", progress=False)


def test_warmup_cosine_schedule_follows_its_formula_per_iteration():
    import math

    from dpai_lib.trainer import make_optimizer

    cfg = train_cfg(optimizer="adamw", momentum=0.0, schedule="warmup_cosine", lr=0.2, lr_drops=[],
                    warmup_steps=2, epochs=2)
    opt, sched = make_optimizer(nn.Linear(3, 2), cfg, batches_per_epoch=5)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 5e-4
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 10 iterations: warmup 0, 0.1 over 2 steps, then 0.2 * (1 + cos(pi * k / 8)) / 2 for k = 0..8
    expected = [0.0, 0.1] + [0.2 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(9)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[6] == pytest.approx(0.1) and lrs[10] == pytest.approx(0.0, abs=1e-12)


def test_adamw_warmup_cosine_training_keeps_masks_and_bad_combinations_are_refused(synthetic):
    from conftest import run_dict

    from dpai_lib.config import ConfigError, validate_config

    train_set, test_set = (_small(d, 256) for d in synthetic)
    model, masks = _setup()
    cfg = train_cfg(optimizer="adamw", momentum=0.0, schedule="warmup_cosine", lr=1e-3, lr_drops=[],
                    warmup_steps=3, epochs=1)
    result = train(model, masks, train_set, test_set, cfg, seed=0, device="cpu", progress=False)
    assert result.status == "completed"
    params = prunable_parameters(model)
    assert all(bool((params[n][~m] == 0).all()) for n, m in masks.items())
    for bad, match in [({"optimizer": "adamw"}, "momentum and nesterov are SGD's"),
                       ({"schedule": "warmup_cosine", "lr_drops": [1]}, "lr_drops belong to the multistep"),
                       ({"warmup_steps": 5}, "warmup_steps belongs to warmup_cosine"),
                       ({"optimizer": "adam"}, "optimizer")]:
        raw = run_dict()
        raw["train"].update(bad)
        with pytest.raises(ConfigError, match=match):
            validate_config(raw)
