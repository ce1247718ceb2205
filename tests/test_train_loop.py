"""utils.train_steps and fit on a toy regression: accumulation, clipping, AMP, the non-finite loss stop, step
planning, mid-epoch eval/save points and the data position."""

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch
from torch.utils.data import TensorDataset

from data.loader import train_loader
from utils import Autocast, Run, StopSignals, TrainConfig, fit, train_state, train_steps

DEVICE = torch.device("cpu")


@dataclass
class ToyModelConfig:
    pretrained: Optional[str] = None


@dataclass
class ToyConfig:
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def toy_run(tmp_path, **train):
    cfg = ToyConfig(train=TrainConfig(**{"epochs": 1, "batch_size": 8, "lr": 0.1, "print_freq": 100, **train}))
    args = argparse.Namespace(output_dir=str(tmp_path), resume=None, allow_changes=[])
    return Run(args, cfg, DEVICE, Autocast(DEVICE, cfg.train.amp))


def toy_problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return model, TensorDataset(torch.randn(16, 4), torch.randn(16, 1))


def mse(model, batch):
    x, y = batch
    return {"loss": torch.nn.functional.mse_loss(model(x).float(), y), "abs": (model(x) - y).abs().mean()}


def one_epoch(state, dataset, loss_fn=mse, sgd=False):
    if sgd:
        state.optimizer = torch.optim.SGD(state.model.parameters(), lr=state.cfg.train.lr)
    loader = train_loader(dataset, state.cfg.train.batch_size, state.cfg.train.seed)
    state.batches_per_epoch = len(loader)
    state.steps_per_epoch = state.total_steps = len(loader) // state.accum_steps
    with StopSignals() as signals:
        for _ in train_steps(state, loader, loss_fn, signals):
            pass
    return state


def test_accumulation_equals_the_large_batch(tmp_path):
    model, data = toy_problem()
    big = one_epoch(train_state(toy_run(tmp_path, batch_size=8), model), data)
    model, data = toy_problem()
    accumulated = one_epoch(train_state(toy_run(tmp_path, batch_size=4, global_batch_size=8), model), data)
    assert big.step == accumulated.step == 2 and accumulated.epoch_batches == 4
    for p, q in zip(big.model.parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(p, q)
    assert set(accumulated.meters.global_averages()) == {"loss", "abs", "lr"}


def test_grad_clipping_bounds_the_update(tmp_path):
    model, data = toy_problem()
    start = [p.detach().clone() for p in model.parameters()]
    state = one_epoch(train_state(toy_run(tmp_path, batch_size=16, grad_clip=1e-3), model), data, sgd=True)
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(state.model.parameters(), start)])
    assert update.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x max norm


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_weights(tmp_path, amp):
    model, data = toy_problem()
    state = one_epoch(train_state(toy_run(tmp_path, amp=amp), model), data)
    assert all(p.dtype == torch.float32 for p in state.model.parameters())
    assert state.meters.global_averages()["loss"] > 0


def test_non_finite_loss_stops_before_the_step(tmp_path):
    model, data = toy_problem()
    start = [p.detach().clone() for p in model.parameters()]
    state = train_state(toy_run(tmp_path), model)
    state.epoch = 3
    nan_loss = lambda m, batch: {"loss": m(batch[0]).sum() * float("nan")}
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 3, iteration 0 .step 0.: loss=nan"):
        one_epoch(state, data, nan_loss)
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p, s)


def test_max_steps_and_mid_epoch_evaluation_and_checkpoints(tmp_path):
    """16 examples in batches of 2: 8 steps an epoch; max_steps 12 stops mid-epoch 1; eval every 5 steps."""
    model, data = toy_problem()
    run = toy_run(tmp_path, batch_size=2, max_steps=12, eval_every_steps=5, save_every_steps=3, epochs=99,
                  lr_schedule="cosine", min_lr=0.01)
    state = train_state(run, model)
    saved_steps, evaluated = [], []
    real_save = torch.save

    def recording_save(obj, f, *args, **kwargs):
        if "position" in obj:
            saved_steps.append((obj["step"], obj["position"]["epoch"], obj["position"]["batch"]))
        return real_save(obj, f, *args, **kwargs)

    def validate(at):
        evaluated.append(at)
        return {"val_score": -float(len(evaluated))}  # never improves after the first: one best checkpoint

    torch.save = recording_save
    try:
        fit(state, train_loader(data, 2, 0, num_workers=0), mse, validate, "val_score")
    finally:
        torch.save = real_save
    assert state.step == 12 and (state.epoch, state.epoch_batches) == (1, 4)
    assert evaluated == ["step 5", "epoch 0", "step 10", "epoch 1"]  # the last: the run's end, mid-epoch 1
    # every 3 steps, at the epoch's end (step 8: position epoch 1, batch 0) and at the end of the run
    assert saved_steps == [(3, 0, 3), (6, 0, 6), (8, 1, 0), (9, 1, 1), (12, 1, 4)]
    log = [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()]
    assert [(e["epoch"], e["step"]) for e in log] == [(0, 5), (0, 8), (1, 10), (1, 12)]
    assert "train_loss" in log[1] and "train_loss" in log[3] and "train_loss" not in log[0]
    assert torch.load(tmp_path / "checkpoint_best.pth", weights_only=True)["step"] == 5
    # the cosine runs over max_steps (12), not over 99 epochs: the last step (11) is near min_lr
    last_lr = 0.01 + (0.1 - 0.01) * 0.5 * (1 + math.cos(math.pi * 11 / 12))
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(last_lr, rel=1e-12)
