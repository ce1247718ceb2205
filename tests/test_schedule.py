import math

import pytest

from utils import InputError, TrainConfig, accumulation_steps, check_schedule, lr_at_step, total_steps


def test_per_step_warmup_then_cosine():
    cfg = TrainConfig(epochs=2, lr=1e-3, min_lr=1e-5, warmup_steps=10, warmup_lr=1e-6, lr_schedule="cosine")
    steps_per_epoch = 55  # 110 steps: 10 warmup + 100 decay
    assert lr_at_step(0, steps_per_epoch, cfg) == pytest.approx(1e-6)
    assert lr_at_step(5, steps_per_epoch, cfg) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at_step(10, steps_per_epoch, cfg) == pytest.approx(1e-3)
    assert lr_at_step(60, steps_per_epoch, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at_step(110, steps_per_epoch, cfg) == pytest.approx(1e-5)
    lrs = [lr_at_step(s, steps_per_epoch, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_per_epoch_cosine_is_blips_formula():
    cfg = TrainConfig(epochs=15, lr=3e-5, min_lr=0.0, lr_schedule="cosine_epoch")
    for epoch in range(15):
        blip = (3e-5 - 0.0) * 0.5 * (1.0 + math.cos(math.pi * epoch / 15)) + 0.0
        for step in (epoch * 7, epoch * 7 + 6):
            assert lr_at_step(step, 7, cfg) == pytest.approx(blip, rel=1e-12)


def test_per_epoch_cosine_with_lavis_warmup():
    cfg = TrainConfig(epochs=10, lr=1e-4, min_lr=1e-5, warmup_steps=50, warmup_lr=1e-6, lr_schedule="cosine_epoch")
    assert lr_at_step(0, 100, cfg) == pytest.approx(1e-6)
    assert lr_at_step(25, 100, cfg) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 25 / 50)
    assert lr_at_step(70, 100, cfg) == pytest.approx(1e-4)  # rest of epoch 0 at the peak
    assert lr_at_step(100, 100, cfg) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 10)))


def test_max_steps_plans_the_cosine_over_the_steps():
    cfg = TrainConfig(epochs=99, max_steps=110, lr=1e-3, min_lr=1e-5, warmup_steps=10, lr_schedule="cosine")
    assert total_steps(cfg, 55) == 110
    assert lr_at_step(60, 55, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # half way through the 100 decay steps
    assert lr_at_step(110, 55, cfg) == pytest.approx(1e-5)
    assert total_steps(TrainConfig(epochs=3), 7) == 21


@pytest.mark.parametrize("cfg, steps_per_epoch, message", [
    (TrainConfig(), 0, "smaller than one optimiser step"),
    (TrainConfig(lr=-1e-4), 5, "train.lr must be positive"),
    (TrainConfig(max_steps=10, lr_schedule="cosine_epoch"), 5, "cosine_epoch is planned in epochs"),
])
def test_schedules_that_cannot_run_are_refused(cfg, steps_per_epoch, message):
    with pytest.raises(InputError, match=message):
        check_schedule(cfg, steps_per_epoch)


def test_accumulation_steps(monkeypatch):
    assert accumulation_steps(TrainConfig(batch_size=16, global_batch_size=None)) == 1
    assert accumulation_steps(TrainConfig(batch_size=16, global_batch_size=256)) == 16
    monkeypatch.setattr("utils.get_world_size", lambda: 4)
    assert accumulation_steps(TrainConfig(batch_size=16, global_batch_size=256)) == 4
    with pytest.raises(InputError, match="not a multiple of train.batch_size x processes = 16 x 4"):
        accumulation_steps(TrainConfig(batch_size=16, global_batch_size=100))
