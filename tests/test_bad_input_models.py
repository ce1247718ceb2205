"""Bad checkpoints and model paths, as a user meets them through the scripts: each ends with one `error:` line (exit
status 2, no traceback) naming the file and what to give instead; a pickle holding code is refused without running
it."""

import os
import pickle
import time
import zipfile

import pytest
import torch

from models.blip2_qformer import Blip2Qformer
from models.blip_nlvr import BlipNLVR
from tests.conftest import nlvr_config, run_script
from tests.test_train_blip2_stage1 import stage1_config
from tests.test_train_blip2_stage2 import stage2_config


def fails_cleanly(*args, code=2):
    """stderr of a script run that must end with exit status `code`, one error line and no traceback."""
    result = run_script(*args, "--device", "cpu", check=False)
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")
    return result.stderr


class RunsCode:
    """Unpickling it would create the file `path` (os.system, as an exploit would run anything)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.parametrize("container", ["raw pickle", "torch zip"])
def test_a_checkpoint_holding_code_is_refused_and_the_code_never_runs(demo_data, tmp_path, container):
    marker, checkpoint = tmp_path / "exploited", tmp_path / "model.pth"
    if container == "raw pickle":
        checkpoint.write_bytes(pickle.dumps({"model": RunsCode(marker)}))
    else:
        torch.save({"model": RunsCode(marker)}, checkpoint)
        assert zipfile.is_zipfile(checkpoint)
    stderr = fails_cleanly("train_nlvr.py", "--config", nlvr_config(tmp_path, demo_data), "--output_dir",
                           tmp_path / "out", "--evaluate", "--checkpoint", checkpoint)
    assert f"{checkpoint} holds objects other than tensors" in stderr and "was not loaded" in stderr
    assert "unless you trust its source" in stderr and "weights_only=False" in stderr
    assert not marker.exists()


def test_a_stage1_checkpoint_is_not_evaluated_as_a_stage2_model(demo_data, opt_dir, stage1_checkpoint, tmp_path):
    stderr = fails_cleanly("eval_caption.py", "--config", stage2_config(tmp_path, demo_data, opt_dir,
                                                                       stage1_checkpoint),
                           "--output_dir", tmp_path / "out", "--checkpoint", stage1_checkpoint)
    assert f"{stage1_checkpoint} leaves 2 tensors of this model at their initialisation (opt_proj)" in stderr
    assert "a checkpoint to train from, not to evaluate" in stderr


def test_a_blip_pretrained_checkpoint_is_not_evaluated_as_nlvr(demo_data, tmp_path):
    model = BlipNLVR(vit="tiny", image_size=32, text_size="tiny", vocab_size=len(open(
        demo_data / "tokenizer" / "vocab.txt").read().splitlines()) + 2)
    state = {k.replace(".crossattention.self0.", ".crossattention.self."): v for k, v in model.state_dict().items()
             if ".self1." not in k and ".dense1." not in k and not k.startswith("cls_head.")}
    torch.save({"model": {k.replace(".dense0.", ".dense."): v for k, v in state.items()}}, tmp_path / "base.pth")
    stderr = fails_cleanly("train_nlvr.py", "--config", nlvr_config(tmp_path, demo_data), "--output_dir",
                           tmp_path / "out", "--evaluate", "--checkpoint", tmp_path / "base.pth")
    assert "leaves 4 tensors of this model at their initialisation (cls_head.0, cls_head.2)" in stderr


def test_another_model_family_is_named(demo_data, stage1_checkpoint, tmp_path):
    stderr = fails_cleanly("train_nlvr.py", "--config", nlvr_config(tmp_path, demo_data), "--output_dir",
                           tmp_path / "out", "--options", f"model.pretrained={stage1_checkpoint}")
    assert f"{stage1_checkpoint} is a BLIP-2 stage-1 (Q-Former) checkpoint; train_nlvr.py loads BLIP's" in stderr
    nlvr = BlipNLVR(vit="tiny", image_size=32, text_size="tiny", vocab_size=40)
    torch.save({"model": nlvr.state_dict()}, tmp_path / "nlvr.pth")
    stderr = fails_cleanly("train_blip2_stage1.py", "--config", stage1_config(tmp_path, demo_data), "--output_dir",
                           tmp_path / "out1", "--options", f"model.pretrained={tmp_path / 'nlvr.pth'}")
    assert f"{tmp_path / 'nlvr.pth'} is a BLIP NLVR checkpoint (model_base_nlvr.pth); a stage-1 model loads" in stderr


def test_vision_weights_that_do_not_fit_name_their_file(demo_data, tmp_path):
    stage1 = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, patch_size=16,
                          qformer="tiny", vocab_size=41, num_query_tokens=4, vit_precision="fp32")
    torch.save(stage1.visual_encoder.state_dict(), tmp_path / "eva.pth")
    stderr = fails_cleanly("train_blip2_stage1.py", "--config", stage1_config(tmp_path, demo_data), "--output_dir",
                           tmp_path / "out", "--options", "model.vision=clip_vit_L",
                           f"model.vit_pretrained={tmp_path / 'eva.pth'}")
    assert f"the vision weights of {tmp_path / 'eva.pth'} (an EVA ViT-g image encoder (eva_vit_g.pth)) do not fit " \
           "this ClipViT" in stderr


@pytest.mark.parametrize("key, value, message", [
    ("model.lm", "/nonexistent/lm", "model.lm /nonexistent/lm: directory /nonexistent/lm does not exist"),
    ("model.lm", "demo_data/llama_demo", "the demo writes it: run `python -m data.synthetic --output_dir demo_data`"),
])
def test_a_language_model_path_that_does_not_exist_fails_at_once(demo_data, opt_dir, tmp_path, key, value, message):
    start = time.monotonic()
    stderr = fails_cleanly("train_blip2_stage2.py", "--config", stage2_config(tmp_path, demo_data, opt_dir),
                           "--output_dir", tmp_path / "out", "--options", f"{key}={value}", "model.arch=blip2_llm")
    assert message in stderr and "hf download" not in stderr
    assert time.monotonic() - start < 20  # no hub retries (the script's own start-up included)


def test_a_bert_path_that_does_not_exist_fails_at_once(demo_data, tmp_path):
    stderr = fails_cleanly("train_blip2_stage1.py", "--config", stage1_config(tmp_path, demo_data), "--output_dir",
                           tmp_path / "out", "--options", "model.bert=/nonexistent/bert")
    assert "model.bert /nonexistent/bert: directory /nonexistent/bert does not exist" in stderr


def test_resume_onto_a_checkpoint_of_other_shapes_names_the_file(demo_data, tmp_path):
    config, out = nlvr_config(tmp_path, demo_data), tmp_path / "out"
    run_script("train_nlvr.py", "--config", config, "--output_dir", out, "--device", "cpu", "--options",
               "train.epochs=1")
    ckpt = torch.load(out / "checkpoint_last.pth", weights_only=True)
    key = next(k for k in ckpt["model"] if k.endswith("cls_head.2.weight"))
    ckpt["model"][key] = torch.zeros(3, ckpt["model"][key].shape[1])  # a model trained by other code
    torch.save(ckpt, out / "checkpoint_last.pth")
    stderr = fails_cleanly("train_nlvr.py", "--config", config, "--output_dir", out, "--resume", "--options",
                           "train.epochs=1")
    assert f"--resume: {out / 'checkpoint_last.pth'} does not fit this model (1 problems: cls_head.2.weight is " \
           "[3, 128], the model's [2, 128])" in stderr
