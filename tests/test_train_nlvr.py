import json

import pytest
import torch

import train_nlvr
from utils import InputError
from tests.conftest import nlvr_config, read_log, run_script


def train(config, out, *options, evaluate=False):
    args = ["--config", str(config), "--output_dir", str(out), "--device", "cpu"]
    train_nlvr.main(args + (["--evaluate"] if evaluate else []) + (["--options", *options] if options else []))


def test_train_then_evaluate(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    train(config, out, "train.epochs=2")
    log = read_log(out)
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert all(isinstance(v, (int, float)) for entry in log for v in entry.values())
    assert set(log[0]) == {"epoch", "step", "train_loss", "train_lr", "val_acc", "test_acc"}
    assert "lr: 1e-3" not in (out / "config.yaml").read_text() and "lr: 0.001" in (out / "config.yaml").read_text()

    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    last = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert last["step"] == 2 * 4 and last["position"] == {"epoch": 2, "batch": 0}  # 32 examples / batch 8
    assert set(last) >= {"model", "optimizer", "scaler", "rng", "config", "best_metric", "meters"}
    best_entry = max(log, key=lambda e: e["val_acc"])  # the first of equals
    assert best["epoch"] == best_entry["epoch"] and best["val_acc"] == best_entry["val_acc"]

    train(config, out, evaluate=True)
    result = json.loads((out / "evaluate.txt").read_text())
    assert result == {"val_acc": best_entry["val_acc"], "val_n": 10, "test_acc": best_entry["test_acc"], "test_n": 10}


def test_resumed_run_equals_the_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    config = nlvr_config(tmp_path, demo_data)
    train(config, tmp_path / "whole")

    real_loss, calls = train_nlvr.nlvr_loss, []

    def dies_in_epoch_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 + 2:  # two iterations (one optimiser step's worth of changes) into epoch 1
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_nlvr, "nlvr_loss", dies_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "broken")
    monkeypatch.setattr(train_nlvr, "nlvr_loss", real_loss)
    assert len(read_log(tmp_path / "broken")) == 1
    train_nlvr.main(["--config", str(config), "--output_dir", str(tmp_path / "broken"), "--device", "cpu", "--resume"])
    assert read_log(tmp_path / "broken") == read_log(tmp_path / "whole")
    whole, resumed = (torch.load(tmp_path / d / "checkpoint_last.pth", weights_only=True) for d in ("whole", "broken"))
    for key, value in whole["model"].items():
        assert torch.equal(resumed["model"][key], value), key


def test_resume_drops_log_lines_of_epochs_without_checkpoint(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    train(config, out, "train.epochs=1")
    with open(out / "log.txt", "a") as f:  # as if the run died between its log line and its checkpoint
        f.write(json.dumps({"epoch": 1, "val_acc": 0.0}) + "\n")
    train_nlvr.main(["--config", str(config), "--output_dir", str(out), "--device", "cpu", "--resume",
                     "--allow_changes", "train.epochs", "--options", "train.epochs=2"])
    assert [entry["epoch"] for entry in read_log(out)] == [0, 1] and read_log(out)[1]["val_acc"] != 0.0


def test_resume_without_a_last_checkpoint_is_refused(demo_data, tmp_path):
    with pytest.raises(InputError, match="checkpoint_last.pth does not exist; run without --resume"):
        train_nlvr.main(["--config", str(nlvr_config(tmp_path, demo_data)), "--output_dir", str(tmp_path / "out"),
                         "--device", "cpu", "--resume"])


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(demo_data, tmp_path, monkeypatch):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    real_loss, calls, epoch_0_checkpoint = train_nlvr.nlvr_loss, [], []

    def diverges_in_epoch_1(*args, **kwargs):
        calls.append(1)
        losses = real_loss(*args, **kwargs)
        if len(calls) <= 4:
            return losses
        epoch_0_checkpoint.append((out / "checkpoint_last.pth").read_bytes())
        return {"loss": losses["loss"] * float("inf")}

    monkeypatch.setattr(train_nlvr, "nlvr_loss", diverges_in_epoch_1)
    with pytest.raises(FloatingPointError) as err:
        train(config, out)
    message = str(err.value)
    assert "non-finite loss at epoch 1, iteration 0 (step 4): loss=inf" in message
    assert "checkpoint_last.pth is left as it was" in message and "train.lr" in message
    assert (out / "checkpoint_last.pth").read_bytes() == epoch_0_checkpoint[0]
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["position"]["epoch"] == 1
    assert len(read_log(out)) == 1


@pytest.mark.parametrize("val_accs, best_epoch", [([0.6, 0.6, 0.5], 0), ([0.5, 0.6, 0.6], 1)])
def test_best_checkpoint_only_on_a_strictly_better_metric(demo_data, tmp_path, monkeypatch, val_accs, best_epoch):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    results = iter(acc for val in val_accs for acc in (val, 0.5))  # val then test, per epoch
    monkeypatch.setattr(train_nlvr, "evaluate", lambda *a, **k: {"acc": next(results), "n": 10})
    train(config, out)
    assert torch.load(out / "checkpoint_best.pth", weights_only=True)["epoch"] == best_epoch


@pytest.mark.parametrize("options, message", [
    (["train.lrr=1e-4"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["data.image_root=/nonexistent"], "images are missing or unreadable under image_root /nonexistent"),
    (["model.pretrained=/nonexistent.pth"], "checkpoint /nonexistent.pth does not exist"),
    (["train.global_batch_size=12"], "train.global_batch_size=12 is not a multiple"),
])
def test_bad_input_ends_with_a_message_not_a_traceback(demo_data, tmp_path, options, message):
    config = nlvr_config(tmp_path, demo_data)
    result = run_script("train_nlvr.py", "--config", config, "--output_dir", tmp_path / "out", "--device", "cpu",
                        "--options", *options, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
