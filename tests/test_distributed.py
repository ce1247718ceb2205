import json

import pytest
import torch

from tests.conftest import nlvr_config, run_script
from utils import InputError, get_world_size, init_distributed

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def test_two_processes_equal_one_process_with_the_same_global_batch(demo_data, tmp_path):
    config = nlvr_config(tmp_path, demo_data)
    run_script("tests/ddp_grads.py", "--config", config, "--batch_size", 8, "--out", tmp_path / "one.pt")
    run_script(*TORCHRUN, "tests/ddp_grads.py", "--config", config, "--batch_size", 4, "--out", tmp_path / "two.pt")
    one, two = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-6, rtol=1e-5)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_torchrun_training_and_evaluation_count_every_example_once(demo_data, tmp_path):
    odd = json.loads((demo_data / "nlvr_test.json").read_text())[:7]
    (tmp_path / "test7.json").write_text(json.dumps(odd))
    config = nlvr_config(tmp_path, demo_data)
    options = ("--options", "train.epochs=1", f"data.test_file={tmp_path / 'test7.json'}")
    out = tmp_path / "out"
    run_script(*TORCHRUN, "train_nlvr.py", "--config", config, "--output_dir", out, "--device", "cpu", *options)
    logged = json.loads((out / "log.txt").read_text())
    for procs, launcher in (("1", ()), ("2", TORCHRUN)):
        run_script(*launcher, "train_nlvr.py", "--config", config, "--output_dir", out, "--device", "cpu",
                   "--evaluate", *options)
        result = json.loads((out / "evaluate.txt").read_text())
        assert result["test_n"] == 7 and result["val_n"] == 10, procs
        assert result["val_acc"] == logged["val_acc"] and result["test_acc"] == logged["test_acc"], procs


def test_single_process_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized() and get_world_size() == 1


def test_slurm_single_task_is_single_process(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert init_distributed("cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_slurm_without_master_address_is_explained(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    with pytest.raises(InputError, match="MASTER_ADDR and MASTER_PORT"):
        init_distributed("cpu")
