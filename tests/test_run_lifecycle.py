"""The run lifecycle: preemption signals, mid-epoch checkpoints, requeue (--resume auto), the output lock, resume
rules for changed configs, failed and partial checkpoint writes, launchers."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import train_nlvr
import utils
from tests.conftest import killed_after_step, nlvr_config, read_log, run_script
from utils import InputError, Preempted, RunError, TrainConfig, check_resumed_config, lr_at_step

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
STEPS_PER_EPOCH = 4  # the tiny NLVR config: 32 training examples in batches of 8


def train(config, out, *extra, options=()):
    args = ["--config", str(config), "--output_dir", str(out), "--device", "cpu", *extra]
    train_nlvr.main(args + (["--options", *options] if options else []))


def signal_at(monkeypatch, step, name="SIGTERM"):
    """Make this process send itself `name` just before optimiser step `step`."""
    real_step = utils.optimizer_step

    def step_then_signal(state, lr, norm=False):
        if state.step == step:
            os.kill(os.getpid(), getattr(signal, name))
        return real_step(state, lr, norm)

    monkeypatch.setattr(utils, "optimizer_step", step_then_signal)


@pytest.fixture(scope="module")
def unbroken(demo_data, tmp_path_factory):
    """log.txt of an unbroken 2-epoch run (checkpoints every 3 steps, as the interrupted runs below)."""
    directory = tmp_path_factory.mktemp("unbroken")
    config = nlvr_config(directory, demo_data)
    train(config, directory / "out", options=["train.epochs=2", "train.save_every_steps=3"])
    return config, read_log(directory / "out"), torch.load(directory / "out" / "checkpoint_last.pth",
                                                           weights_only=True)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_mid_epoch_checkpoints_that_step_and_resume_auto_continues_exactly(
        unbroken, tmp_path, monkeypatch, name):
    config, whole, whole_last = unbroken
    out = tmp_path / "out"
    signal_at(monkeypatch, 5, name)  # during step 6 of epoch 1, a save point: the run stops there
    with pytest.raises(Preempted, match=rf"stopped by {name} at step 6; .*checkpoint_last.pth holds it"):
        train(config, out, "--resume", "auto", options=["train.epochs=2", "train.save_every_steps=3"])
    last = torch.load(out / "checkpoint_last.pth", weights_only=True)
    assert last["step"] == 6 and last["position"] == {"epoch": 1, "batch": 2}
    assert read_log(out) == whole[:1]
    monkeypatch.undo()
    train(config, out, "--resume", "auto", options=["train.epochs=2", "train.save_every_steps=3"])
    assert read_log(out) == whole
    resumed_last = torch.load(out / "checkpoint_last.pth", weights_only=True)
    for key, value in whole_last["model"].items():
        assert torch.equal(resumed_last["model"][key], value), key


@pytest.mark.parametrize("workers", [0, 2])
def test_a_mid_epoch_checkpoint_of_save_every_steps_resumes_exactly(unbroken, tmp_path, workers):
    """Also from loader workers: their augmentation is seeded per example, not by the worker's history."""
    config, whole, _ = unbroken
    out, options = tmp_path / "out", ["train.epochs=2", "train.save_every_steps=3", f"data.num_workers={workers}"]
    with killed_after_step(7):  # the checkpoint of step 6 is the last
        train(config, out, options=options)
    assert torch.load(out / "checkpoint_last.pth", weights_only=True)["position"] == {"epoch": 1, "batch": 2}
    train(config, out, "--resume", options=options)
    assert read_log(out) == whole


def test_two_processes_stopped_on_one_rank_resume_to_the_log_of_an_unbroken_run(demo_data, tmp_path):
    config = nlvr_config(tmp_path, demo_data)
    options = ("--device", "cpu", "--options", "train.epochs=2", "train.batch_size=4")
    run_script(*TORCHRUN, "train_nlvr.py", "--config", config, "--output_dir", tmp_path / "whole", *options)
    stopped = run_script(*TORCHRUN, "tests/signal_run.py", "--at_step", 5, "--rank", 1, "train_nlvr.py", "--config",
                         config, "--output_dir", tmp_path / "out", "--resume", "auto", *options, check=False)
    assert stopped.returncode != 0 and "preempted: stopped by" in stopped.stderr, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr.split("preempted:")[0][-500:]
    # sent during step 6 (after its loss all-reduce): every rank sees it at step 7's and stops after that step
    assert torch.load(tmp_path / "out" / "checkpoint_last.pth", weights_only=True)["step"] == 7
    run_script(*TORCHRUN, "train_nlvr.py", "--config", config, "--output_dir", tmp_path / "out", "--resume", "auto",
               *options)
    assert read_log(tmp_path / "out") == read_log(tmp_path / "whole")


def test_a_stop_signal_exits_with_status_75_and_a_message(demo_data, tmp_path):
    config = nlvr_config(tmp_path, demo_data)
    result = run_script("tests/signal_run.py", "--at_step", 1, "train_nlvr.py", "--config", config, "--output_dir",
                        tmp_path / "out", "--device", "cpu", check=False)
    assert result.returncode == utils.EXIT_PREEMPTED == 75
    assert "preempted: stopped by SIGTERM at step 3" in result.stderr and "Traceback" not in result.stderr
    assert "--resume auto" in result.stderr


def test_death_between_the_log_line_and_the_checkpoint_rewrites_that_line(unbroken, tmp_path, monkeypatch):
    config, whole, _ = unbroken
    out = tmp_path / "out"
    real_save = utils.save_checkpoint

    def dies_saving_epoch_1(state, path):
        if path.endswith("checkpoint_last.pth") and state["step"] == 8:
            raise KeyboardInterrupt
        real_save(state, path)

    monkeypatch.setattr(utils, "save_checkpoint", dies_saving_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config, out, options=["train.epochs=2", "train.save_every_steps=3"])
    assert [entry["step"] for entry in read_log(out)] == [4, 8]  # the line came first
    monkeypatch.undo()
    train(config, out, "--resume", options=["train.epochs=2", "train.save_every_steps=3"])
    assert read_log(out) == whole


# ------------------------------------------------------------------------------------------------------ the lock

def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(demo_data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-01T10:00:00", "job": None,
              "command": "train_nlvr.py --config other.yaml"}
    (out / "run.lock").write_text(json.dumps(holder))
    result = run_script("train_nlvr.py", "--config", nlvr_config(tmp_path, demo_data), "--output_dir", out,
                        "--device", "cpu", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"is in use by another run (host {holder['host']}, pid {os.getpid()}, started 2026-12-01T10:00:00" \
           in result.stderr and "other.yaml" in result.stderr and "run.lock" in result.stderr
    assert json.loads((out / "run.lock").read_text()) == holder  # the holder's lock is left alone


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(demo_data, tmp_path, capsys):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "x"}))
    train(nlvr_config(tmp_path, demo_data), out, options=["train.epochs=1"])
    assert f"warning: taking over {out / 'run.lock'}, left by pid {gone.pid}" in capsys.readouterr().out
    assert not (out / "run.lock").exists()


def test_a_lock_of_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "run.lock").write_text(json.dumps({"host": "node-that-died", "pid": 1, "job": "4242"}))
    lock = utils.OutputLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    with pytest.raises(InputError, match="in use by another run"):
        utils.OutputLock(str(tmp_path)).acquire()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


# ------------------------------------------------------------------------------------------------ resume rules

def test_a_changed_lr_is_refused_and_when_allowed_the_new_schedule_is_followed(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    with killed_after_step(STEPS_PER_EPOCH + 1):  # in epoch 1
        train(config, out, options=["train.epochs=2"])
    with pytest.raises(InputError, match=r"train.lr: 0.001 -> 0.0001.*add --allow_changes train.lr"):
        train(config, out, "--resume", options=["train.epochs=2", "train.lr=1e-4"])
    assert "lr: 0.001" in (out / "config.yaml").read_text()  # the refused run left the run's config as it was

    train(config, out, "--resume", "--allow_changes", "train.lr", options=["train.epochs=2", "train.lr=1e-4"])
    log = read_log(out)
    new = TrainConfig(epochs=2, lr=1e-4, warmup_steps=2)  # the test config's schedule, with the new peak
    expected = [lr_at_step(s, STEPS_PER_EPOCH, new) for s in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)]
    assert log[1]["train_lr"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    assert "lr: 0.0001" in (out / "config.yaml").read_text()
    assert "lr: 0.001" in (out / f"config_until_step_{STEPS_PER_EPOCH}.yaml").read_text()


def test_allowed_weight_decay_reaches_every_param_group(demo_data, tmp_path, monkeypatch):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    train(config, out, options=["train.epochs=1", "train.no_decay_bias_norm=true"])
    groups = []
    monkeypatch.setattr(train_nlvr, "fit", lambda state, *args: groups.extend(state.optimizer.param_groups))
    train(config, out, "--resume", "--allow_changes", "train.weight_decay", options=[
        "train.epochs=1", "train.no_decay_bias_norm=true", "train.weight_decay=0.5"])
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert all(len(g["params"]) > 0 for g in groups)


def nlvr_cfg():
    return train_nlvr.NLVRConfig(data=train_nlvr.DataConfig("a", "b", "c"))


def saved_with(cfg, changes):
    """The config a checkpoint would hold: `cfg`'s, with {"section.key": value} changes."""
    saved = utils.config_dict(cfg)
    for key, value in changes.items():
        section, name = key.split(".")
        saved[section][name] = value
    return saved


@pytest.mark.parametrize("changes, allowed, message", [
    ({"model.text_encoder": "tiny"}, [], r"was trained with another model; model.text_encoder: 'tiny' -> 'base'"),
    ({"model.image_size": 224}, ["model.image_size"], "was trained with another model"),
    ({"train.batch_size": 32}, [], r"train.batch_size: 32 -> 16. To continue with the new values, add "
                                   r"--allow_changes train.batch_size"),
    ({"train.weight_decay": 0.5, "train.epochs": 3}, ["train.epochs"], r"--allow_changes train.weight_decay;"),
    ({"data.train_file": "other.json"}, [], "data.train_file: 'other.json' -> 'a'"),
    ({"train.no_decay_bias_norm": True}, ["train.no_decay_bias_norm"], "was trained with another model"),
])
def test_resume_rules_refuse_what_they_should(changes, allowed, message):
    cfg = nlvr_cfg()
    with pytest.raises(InputError, match=message):
        check_resumed_config(saved_with(cfg, changes), cfg, allowed, "last.pth")


def test_resume_applies_and_logs_free_and_allowed_changes(capsys):
    cfg = nlvr_cfg()
    saved = saved_with(cfg, {"data.num_workers": 4, "train.lr": 1e-4, "model.pretrained": None})
    cfg.data.num_workers, cfg.train.lr, cfg.model.pretrained = 0, 1e-5, "other.pth"
    check_resumed_config(saved, cfg, ["train.lr"], "last.pth")
    out = capsys.readouterr().out
    assert "resume: data.num_workers: 4 -> 0" in out and "resume: train.lr: 0.0001 -> 1e-05 (--allow_changes)" in out
    assert "resume: model.pretrained: None -> 'other.pth'" in out


def test_a_run_directory_is_not_restarted_from_scratch_by_accident(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    train(config, out, options=["train.epochs=1"])
    with pytest.raises(InputError, match="holds a run .checkpoint_last.pth.; continue it with --resume"):
        train(config, out, options=["train.epochs=1"])
    with pytest.raises(InputError, match="--allow_changes only applies to --resume"):
        train(config, out, "--allow_changes", "train.lr")


# ----------------------------------------------------------------------------------------- checkpoint writes

def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_no_partial_file(demo_data, tmp_path,
                                                                                     monkeypatch):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    real_save = torch.save

    def disk_full_in_epoch_1(obj, f, *args, **kwargs):
        if "position" in obj and obj["step"] == 2 * STEPS_PER_EPOCH:
            f.write(b"partial bytes")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 456")
        return real_save(obj, f, *args, **kwargs)

    train(config, out, options=["train.epochs=1"])
    epoch_0 = (out / "checkpoint_last.pth").read_bytes()
    monkeypatch.setattr(torch, "save", disk_full_in_epoch_1)
    with pytest.raises(RunError) as error:
        train(config, out, "--resume", "--allow_changes", "train.epochs", options=["train.epochs=2"])
    message = str(error.value)
    assert f"cannot write checkpoint {out / 'checkpoint_last.pth'}" in message and "GB free on its disk" in message
    assert "the previous checkpoint_last.pth is kept" in message
    assert (out / "checkpoint_last.pth").read_bytes() == epoch_0
    assert not list(out.glob("*.tmp"))


def test_stale_partial_files_are_removed_at_start(demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint_last.pth.tmp").write_bytes(b"half a checkpoint")
    train(nlvr_config(tmp_path, demo_data), out, "--resume", "auto", options=["train.epochs=1"])
    assert not (out / "checkpoint_last.pth.tmp").exists()
    assert "a checkpoint write that did not finish" in capsys.readouterr().out


def test_a_corrupt_checkpoint_is_named(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    train(config, out, options=["train.epochs=1"])
    data = (out / "checkpoint_last.pth").read_bytes()
    (out / "checkpoint_last.pth").write_bytes(data[:len(data) // 2])
    result = run_script("train_nlvr.py", "--config", config, "--output_dir", out, "--device", "cpu", "--resume",
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{out / 'checkpoint_last.pth'} is not a readable checkpoint (truncated or corrupt" in result.stderr


# -------------------------------------------------------------------------------------------------- launchers

def test_torch_distributed_launch_runs_with_two_processes(demo_data, tmp_path):
    config = nlvr_config(tmp_path, demo_data)
    result = run_script("-m", "torch.distributed.launch", "--nproc_per_node=2", "train_nlvr.py", "--config", config,
                        "--output_dir", tmp_path / "out", "--device", "cpu", "--options", "train.epochs=1",
                        "train.batch_size=4")
    assert "unrecognized arguments" not in result.stderr
    assert [entry["step"] for entry in read_log(tmp_path / "out")] == [STEPS_PER_EPOCH]


def test_local_rank_argument_must_agree_with_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(InputError, match="--local-rank 0 disagrees with LOCAL_RANK=1"):
        utils.init_distributed("cpu", local_rank=0)
    args = utils.parse_args("", ["--config", "c", "--output_dir", "o", "--local_rank=3"])
    assert args.local_rank == 3
    assert utils.parse_args("", ["--config", "c", "--output_dir", "o", "--local-rank", "2"]).local_rank == 2


def test_the_process_group_gets_the_configured_timeout(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.update(k))
    utils.init_distributed("cpu", timeout_s=42)
    assert seen["timeout"].total_seconds() == 42 and seen["world_size"] == 2


def test_an_output_dir_that_is_a_file_is_refused(demo_data, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_script("train_nlvr.py", "--config", nlvr_config(tmp_path, demo_data), "--output_dir",
                        tmp_path / "file", "--device", "cpu", check=False)
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr
