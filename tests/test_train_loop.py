"""utils.train_one_epoch on a toy regression: accumulation, clipping, AMP, the non-finite loss stop."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils import TrainConfig, build_scheduler, grad_scaler, train_one_epoch

DEVICE = torch.device("cpu")


def toy_problem(batch_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    return model, DataLoader(data, batch_size=batch_size)


def mse(model, batch):
    x, y = batch
    return {"loss": torch.nn.functional.mse_loss(model(x).float(), y), "abs": (model(x) - y).abs().mean()}


def run(batch_size, accum_steps, **train):
    model, loader = toy_problem(batch_size)
    cfg = TrainConfig(epochs=1, batch_size=batch_size, lr=0.1, print_freq=100, **train)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(loader) // accum_steps)
    stats = train_one_epoch(model, loader, mse, optimizer, scheduler, grad_scaler(DEVICE, cfg.amp), 0, cfg, DEVICE,
                            accum_steps)
    return model, stats


def test_accumulation_equals_the_large_batch():
    big, _ = run(batch_size=8, accum_steps=1)
    accumulated, stats = run(batch_size=4, accum_steps=2)
    for p, q in zip(big.parameters(), accumulated.parameters()):
        torch.testing.assert_close(p, q)
    assert set(stats) == {"loss", "abs", "lr"}


def test_grad_clipping_bounds_the_update():
    model, loader = toy_problem(16)
    start = [p.detach().clone() for p in model.parameters()]
    clipped, _ = run(batch_size=16, accum_steps=1, grad_clip=1e-3)
    update = torch.cat([(p.detach() - s).flatten() for p, s in zip(clipped.parameters(), start)])
    assert update.norm().item() == pytest.approx(0.1 * 1e-3, rel=1e-3)  # lr x max norm


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_weights(amp):
    model, stats = run(batch_size=8, accum_steps=1, amp=amp)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert stats["loss"] > 0


def test_non_finite_loss_stops_before_the_step():
    model, loader = toy_problem(8)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    nan_loss = lambda m, batch: {"loss": m(batch[0]).sum() * float("nan")}
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 3, iteration 0: loss=nan"):
        train_one_epoch(model, loader, nan_loss, optimizer, build_scheduler(optimizer, cfg, 2),
                        grad_scaler(DEVICE, "off"), 3, cfg, DEVICE)
    for p, s in zip(model.parameters(), start):
        assert torch.equal(p, s)
