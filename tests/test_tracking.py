"""Runs you can watch: per-step records in train_steps.jsonl and TensorBoard (read back with TensorBoard's own event
reader), kept in step with log.txt when a run is resumed; plot_curves.py draws them."""

import json

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_nlvr
from tests.conftest import killed_after_step, nlvr_config, read_log, run_script
from utils import TrainConfig, lr_at_step

OPTIONS = ["train.epochs=2", "train.print_freq=1", "train.save_every_steps=3", "train.tensorboard=true"]


def records(out):
    return [json.loads(line) for line in (out / "train_steps.jsonl").read_text().splitlines()]


def scalars(out, tag):
    events = EventAccumulator(str(out / "tensorboard"))  # purges what a resumed run's purge_step marks
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def train(config, out, *extra):
    train_nlvr.main(["--config", str(config), "--output_dir", str(out), "--device", "cpu", *extra,
                     "--options", *OPTIONS])


@pytest.fixture(scope="module")
def watched_run(demo_data, tmp_path_factory):
    """A 2-epoch (8-step) tiny NLVR run recording every step, killed in step 8 and resumed from step 6."""
    directory = tmp_path_factory.mktemp("watched")
    config, out = nlvr_config(directory, demo_data), directory / "out"
    with killed_after_step(7):  # the last checkpoint is step 6's, the records of steps 1-7 are written
        train(config, out)
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6, 7]
    train(config, out, "--resume", "auto")
    return out


def test_every_step_is_recorded_once_with_its_learning_rate(watched_run):
    steps = records(watched_run)
    assert [r["step"] for r in steps] == list(range(1, 9))  # the resumed run continues the records, no repeats
    assert [r["epoch"] for r in steps] == [0, 0, 0, 0, 1, 1, 1, 1]
    schedule = TrainConfig(epochs=2, lr=1e-3, warmup_steps=2)  # tests/conftest.py's nlvr_config
    for r in steps:
        assert r["lr"] == pytest.approx(lr_at_step(r["step"] - 1, 4, schedule), rel=1e-12)  # the step's own LR
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["samples_per_s"] > 0 and r["max_memory_mb"] > 0


def test_tensorboard_holds_the_records_and_the_validation_metrics(watched_run):
    steps = records(watched_run)
    for tag in ("loss", "lr", "grad_norm"):
        logged = scalars(watched_run, f"train/{tag}")
        assert [step for step, _ in logged] == list(range(1, 9)), tag  # purged and rewritten after the resume
        assert [value for _, value in logged] == pytest.approx([r[tag] for r in steps], rel=1e-6), tag
    evaluations = [e for e in read_log(watched_run) if "val_acc" in e]
    assert scalars(watched_run, "eval/val_acc") == [(e["step"], pytest.approx(e["val_acc"])) for e in evaluations]


def test_plot_curves_draws_the_run(watched_run, tmp_path):
    run_script("plot_curves.py", watched_run, "--output", tmp_path / "curves.png")
    with Image.open(tmp_path / "curves.png") as picture:
        assert picture.format == "PNG" and picture.size == (1500, 400)
    result = run_script("plot_curves.py", watched_run, "--metrics", "val_nope", check=False)
    assert result.returncode == 2 and "val_nope: not in log.txt" in result.stderr


def test_records_follow_print_freq_and_need_no_tensorboard(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    train_nlvr.main(["--config", str(config), "--output_dir", str(out), "--device", "cpu", "--options",
                     "train.epochs=1", "train.print_freq=2"])
    assert [r["step"] for r in records(out)] == [2, 4] and not (out / "tensorboard").exists()
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["step"] == 4
