import json
from pathlib import Path

import pytest
import torch

import train_blip2_stage1
from tests.conftest import TINY_TRAIN, read_log, run_script
from utils import InputError


def stage1_config(directory, data_dir, train_files=None):
    """A tiny stage-1 config over the synthetic caption splits, written to directory/stage1.yaml."""
    train_files = train_files or [f"{data_dir}/coco_karpathy_train.json"]
    sources = "\n".join(f"    - ann_file: {f}\n      image_root: {data_dir}" for f in train_files)
    path = Path(directory) / "stage1.yaml"
    path.write_text(f"""
model:
  arch: blip2_qformer
  vision: eva_tiny
  image_size: 32
  patch_size: 16
  vit_precision: fp32
  qformer: tiny
  bert: null
  tokenizer: {data_dir}/tokenizer
  num_query_tokens: 4
  embed_dim: 32
  max_txt_len: 32
data:
  train:
{sources}
  val_file: {data_dir}/coco_karpathy_val.json
  test_file: {data_dir}/coco_karpathy_test.json
  image_root: {data_dir}
  hflip: false
  num_workers: 0
{TINY_TRAIN}eval:
  batch_size: 4
  k_test: 5
  max_txt_len: 32
""")
    return path


def train(config, out, *options, evaluate=False, resume=False):
    args = ["--config", str(config), "--output_dir", str(out), "--device", "cpu"]
    args += (["--evaluate"] if evaluate else []) + (["--resume"] if resume else [])
    train_blip2_stage1.main(args + (["--options", *options] if options else []))


def test_train_keeps_the_best_by_val_retrieval_and_evaluate_reproduces_it(demo_data, tmp_path):
    config, out = stage1_config(tmp_path, demo_data), tmp_path / "out"
    train(config, out)
    log = read_log(out)
    epochs, final = log[:-1], log[-1]
    assert [entry["epoch"] for entry in epochs] == [0, 1]
    assert {"train_loss", "train_loss_itc", "train_loss_itm", "train_loss_itg", "val_txt_r1", "val_img_r10",
            "val_r_mean"} <= set(epochs[0])
    for entry in epochs:
        total = entry["train_loss_itc"] + entry["train_loss_itm"] + entry["train_loss_itg"]
        assert entry["train_loss"] == pytest.approx(total, rel=1e-5)
    best_entry = max(epochs, key=lambda e: e["val_r_mean"])  # the first of equals
    assert final["best_epoch"] == best_entry["epoch"] and "test_r_mean" in final

    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == best_entry["epoch"]
    assert {"visual_encoder.blocks.0.attn.q_bias", "ln_vision.weight", "query_tokens", "temp",
            "Qformer.cls.predictions.bias", "itm_head.weight"} <= set(best["model"])

    train(config, out, evaluate=True)
    result = json.loads((out / "evaluate.txt").read_text())
    for key, value in best_entry.items():
        if key.startswith("val_"):
            assert result[key] == pytest.approx(value, abs=1e-6), key
    for key, value in final.items():
        if key.startswith("test_"):
            assert result[key] == pytest.approx(value, abs=1e-6), key


def test_resumed_run_equals_the_uninterrupted_run(demo_data, tmp_path, monkeypatch):
    config = stage1_config(tmp_path, demo_data)
    train(config, tmp_path / "whole")
    real_loss, calls = train_blip2_stage1.stage1_loss, []

    def dies_in_epoch_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6 + 2:  # 48 train captions / batch 8 = 6 iterations per epoch
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_blip2_stage1, "stage1_loss", dies_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "broken")
    monkeypatch.setattr(train_blip2_stage1, "stage1_loss", real_loss)
    train(config, tmp_path / "broken", resume=True)
    assert read_log(tmp_path / "broken") == read_log(tmp_path / "whole")


def test_missing_training_images_are_reported_with_the_file(demo_data, tmp_path):
    entries = json.loads((demo_data / "coco_karpathy_train.json").read_text())
    entries[3]["image"] = "images/nowhere.png"
    broken = tmp_path / "vg_like.json"
    broken.write_text(json.dumps([{"image": e["image"], "caption": e["caption"]} for e in entries]))
    config = stage1_config(tmp_path, demo_data, [f"{demo_data}/coco_karpathy_train.json", str(broken)])
    result = run_script("train_blip2_stage1.py", "--config", config, "--output_dir", tmp_path / "out", "--device",
                        "cpu", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert str(broken) in result.stderr and "nowhere.png" in result.stderr and "skip_missing_images" in result.stderr


def test_evaluate_without_weights_is_refused(demo_data, tmp_path):
    with pytest.raises(InputError, match="--checkpoint"):
        train(stage1_config(tmp_path, demo_data), tmp_path / "out", evaluate=True)
