import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils
from data.synthetic import generate
from data.utils import read_annotation
from models.blip2_qformer import Blip2Qformer
from train_demo_lm import TOKENIZERS as LM_TOKENIZERS
from train_demo_lm import build_demo_opt, build_demo_tokenizer, build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small synthetic dataset at 32 px: NLVR with 32 train, 10 val, 10 test examples; captions of 24 train,
    8 val, 8 test images."""
    out = tmp_path_factory.mktemp("demo_data")
    generate(str(out), seed=0, num_train=16, num_val=5, num_test=5, image_size=32, num_caption_train=24,
             num_caption_val=8, num_caption_test=8)
    return out


@pytest.fixture(scope="session")
def opt_dir(demo_data, tmp_path_factory):
    """A randomly initialised tiny OPT with a tokenizer of the demo captions, saved like facebook/opt-*."""
    out = tmp_path_factory.mktemp("opt")
    texts = [entry["caption"] + "\n" for entry in read_annotation(str(demo_data / "coco_karpathy_train.json"))]
    tokenizer = build_demo_tokenizer(texts)
    torch.manual_seed(0)
    build_demo_opt(tokenizer, hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lm_dirs(demo_data, tmp_path_factory):
    """{"t5": dir, "llama": dir}: randomly initialised tiny LMs with tokenizers of the demo captions
    (train_demo_lm's builders), saved like google/flan-t5-* and lmsys/vicuna-*."""
    texts = [entry["caption"] for entry in read_annotation(str(demo_data / "coco_karpathy_train.json"))]
    sizes = argparse.Namespace(hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64, max_positions=128, dropout=0.1)
    dirs = {}
    for kind in ("t5", "llama"):
        tokenizer = LM_TOKENIZERS[kind](texts)
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp(kind)
        build_model(kind, tokenizer, sizes).save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs[kind] = out
    return dirs


@pytest.fixture(scope="session")
def stage1_checkpoint(tmp_path_factory):
    """A random tiny stage-1 model in LAVIS's layout, image encoder included."""
    path = tmp_path_factory.mktemp("stage1") / "stage1.pth"
    torch.manual_seed(1)
    model = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, patch_size=16,
                         qformer="tiny", vocab_size=41, num_query_tokens=4, vit_precision="fp32")
    torch.save({"model": model.state_dict()}, path)
    return path


# The `train:` section of the tiny BLIP-2 test configs: two epochs of batches of 8.
TINY_TRAIN = """train:
  epochs: 2
  batch_size: 8
  lr: 1e-3
  warmup_steps: 2
  print_freq: 100
"""


def nlvr_config(directory, data_dir):
    """A tiny NLVR config over `data_dir`, written to directory/nlvr.yaml."""
    path = Path(directory) / "nlvr.yaml"
    path.write_text(f"""
model:
  arch: blip_nlvr
  vit: tiny
  image_size: 32
  drop_path_rate: 0.1
  text_encoder: tiny
  tokenizer: {data_dir}/tokenizer
data:
  image_root: {data_dir}
  train_file: {data_dir}/nlvr_train.json
  val_file: {data_dir}/nlvr_dev.json
  test_file: {data_dir}/nlvr_test.json
  crop_scale: [0.8, 1.0]
  num_workers: 0
train:
  epochs: 3
  batch_size: 8
  lr: 1e-3
  warmup_steps: 2
  print_freq: 100
eval:
  batch_size: 4
""")
    return path


@contextlib.contextmanager
def killed_after_step(step):
    """The run inside dies in the optimiser step after step `step`, before that step changes anything, as under
    kill -9: KeyboardInterrupt, which the loop's handlers let through, so only what was written before remains."""
    real_step = utils.optimizer_step

    def dies(state, lr, norm=False):
        if state.step == step:
            raise KeyboardInterrupt
        return real_step(state, lr, norm)

    utils.optimizer_step = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        utils.optimizer_step = real_step


def read_log(out):
    """The JSON objects of out/log.txt."""
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def run_script(*args, env=None, check=True, timeout=600):
    """Run `python *args` (or a module) from the repository root; returns the CompletedProcess."""
    result = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
