import json
from pathlib import Path

import pytest
import torch

from transformers import Blip2ForConditionalGeneration

import eval_caption
import train_blip2_stage2
from models.blip2_lm import create_model, load_checkpoint, merge_lora
from tests.conftest import TINY_TRAIN, read_log, run_script
from utils import InputError, load_config


def tiny_stage2_model(opt_dir, pretrained=None):
    """The `model:` section of the tiny stage-2 test configs: the demo's tiny ViT and a tiny Q-Former before the OPT
    of `opt_dir`."""
    return f"""model:
  arch: blip2_opt
  vision: eva_tiny
  image_size: 32
  patch_size: 16
  vit_precision: fp32
  qformer: tiny
  num_query_tokens: 4
  lm: {opt_dir}
  lm_precision: fp32
  max_txt_len: 48
  pretrained: {pretrained or 'null'}
"""


def stage2_config(directory, data_dir, opt_dir, pretrained=None):
    """A tiny stage-2 config over the synthetic caption splits, written to directory/stage2[_from_stage1].yaml."""
    path = Path(directory) / ("stage2_from_stage1.yaml" if pretrained else "stage2.yaml")
    path.write_text(f"""
{tiny_stage2_model(opt_dir, pretrained)}data:
  train:
    - ann_file: {data_dir}/coco_karpathy_train.json
      image_root: {data_dir}
  val_file: {data_dir}/coco_karpathy_val.json
  test_file: {data_dir}/coco_karpathy_test.json
  test_gt_file: {data_dir}/coco_karpathy_test_gt.json
  image_root: {data_dir}
  hflip: false
  num_workers: 0
{TINY_TRAIN}eval:
  batch_size: 4
  num_beams: 2
  max_new_tokens: 8
  min_new_tokens: 1
""")
    return path


def train(config, out, *options, evaluate=False, resume=False, checkpoint=None):
    args = ["--config", str(config), "--output_dir", str(out), "--device", "cpu"]
    args += (["--evaluate"] if evaluate else []) + (["--resume"] if resume else [])
    args += ["--checkpoint", str(checkpoint)] if checkpoint else []
    train_blip2_stage2.main(args + (["--options", *options] if options else []))


def test_train_from_stage1_keeps_the_best_by_cider_bleu4_and_evaluate_reproduces_it(demo_data, opt_dir,
                                                                                      stage1_checkpoint, tmp_path):
    config, out = stage2_config(tmp_path, demo_data, opt_dir, stage1_checkpoint), tmp_path / "out"
    train(config, out)
    log = read_log(out)
    epochs, final = log[:-1], log[-1]
    assert [entry["epoch"] for entry in epochs] == [0, 1]
    assert {"train_loss", "val_Bleu_4", "val_METEOR", "val_ROUGE_L", "val_CIDEr", "val_agg_metric"} <= set(epochs[0])
    for entry in epochs:
        assert entry["val_agg_metric"] == pytest.approx(entry["val_CIDEr"] + entry["val_Bleu_4"])
    best_entry = max(epochs, key=lambda e: e["val_agg_metric"])  # the first of equals
    assert final["best_epoch"] == best_entry["epoch"]
    assert {"test_CIDEr", "test_text_only_CIDEr"} <= set(final)

    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == best_entry["epoch"]
    # The frozen OPT and the frozen image encoder (it comes with the stage-1 file) are not in the checkpoints.
    assert {k.split(".")[0] for k in best["model"]} == {"ln_vision", "Qformer", "query_tokens", "opt_proj"}
    results = json.loads((out / "test_captions.json").read_text())
    assert len(results) == 8 and all(isinstance(r["caption"], str) for r in results)

    train(config, out, evaluate=True)  # the image encoder is rebuilt from model.pretrained
    result = json.loads((out / "evaluate.txt").read_text())
    for key, value in best_entry.items():
        if key.startswith("val_"):
            assert result[key] == pytest.approx(value, abs=1e-6), key
    for key, value in final.items():
        if key.startswith("test_") and "text_only" not in key:
            assert result[key] == pytest.approx(value, abs=1e-6), key


def instruction_mixture(data_dir):
    """--options data.train of caption templates (LAVIS's) and the demo's VQA training split."""
    return (f"data.train=[{{ann_file: {data_dir}/coco_karpathy_train.json, image_root: {data_dir}, "
            f"instructions: lavis}}, {{questions: {data_dir}/vqa_train_questions.json, annotations: "
            f"{data_dir}/vqa_train_annotations.json, image_root: {data_dir}, image_template: "
            f"'images/caption_train/synthetic_{{image_id:012d}}.png'}}]")


@pytest.mark.parametrize("arch, lm, extra", [
    ("blip2_t5", "t5", ["data.prefix_lm=true"]),
    ("blip2_llm", "llama", ["model.lora={r: 4, alpha: 8, dropout: 0.0}"]),
    ("blip2_t5_instruct", "t5", ["model.prompt='a short image caption:'"]),
    ("blip2_llm_instruct", "llama", ["model.prompt='a short image caption:'"]),
])
def test_every_language_model_trains_and_evaluate_reproduces_the_log(demo_data, lm_dirs, tmp_path, arch, lm, extra):
    config, out = stage2_config(tmp_path, demo_data, lm_dirs[lm]), tmp_path / "out"
    options = [f"model.arch={arch}", "train.epochs=1", "eval.text_only_baseline=false", "model.max_txt_len=32",
               f"model.tokenizer={demo_data}/tokenizer", *extra]
    if arch.endswith("_instruct"):
        options.append(instruction_mixture(demo_data))
    train(config, out, *options)
    epoch, final = read_log(out)
    assert epoch["train_loss"] > 0 and final["best_epoch"] == 0 and "test_CIDEr" in final
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)["model"]
    prefixes = {k.split(".")[0] for k in best}
    # the random image encoder comes from no file: it is saved; the frozen LM is not, its LoRA adapters are
    assert prefixes == {"visual_encoder", "ln_vision", "Qformer", "query_tokens",
                        {"t5": "t5_proj", "llama": "llm_proj"}[lm], *(["llm_model"] if "lora" in extra[0] else [])}
    lm_keys = [k for k in best if k.startswith("llm_model.")]
    assert all("lora_" in k for k in lm_keys) and (len(lm_keys) > 0) == ("lora" in extra[0])  # adapters only
    assert ("Qformer.bert.embeddings.word_embeddings.weight" in best) == arch.endswith("_instruct")
    train(config, out, *options, evaluate=True)
    result = json.loads((out / "evaluate.txt").read_text())
    for key, value in epoch.items():
        if key.startswith("val_"):
            assert result[key] == pytest.approx(value, abs=1e-6), key
    if lm_keys:  # LoRA: the export merges the adapters into the LM's weights
        check_export(out, tmp_path / "hf")


def check_export(out, directory):
    """convert_checkpoint.py export of a run's best checkpoint loads in transformers with our merged weights."""
    run_script("convert_checkpoint.py", "export", out / "config.yaml", out / "checkpoint_best.pth", directory)
    cfg = load_config(str(out / "config.yaml"), train_blip2_stage2.Stage2Config)
    ours, _ = create_model(cfg.model)
    load_checkpoint(ours, str(out / "checkpoint_best.pth"))
    merged = merge_lora(ours).language_model.state_dict()
    exported = Blip2ForConditionalGeneration.from_pretrained(directory)
    theirs = exported.language_model.state_dict()
    assert not any("lora" in k for k in theirs) and set(merged) <= set(theirs)
    for key, value in merged.items():  # the export adds a vocabulary row for transformers' image token
        assert torch.equal(theirs[key][:len(value)], value), key
    assert torch.equal(exported.language_projection.weight, ours.llm_proj.weight)


def test_resumed_run_equals_the_uninterrupted_run(demo_data, opt_dir, tmp_path, monkeypatch):
    config = stage2_config(tmp_path, demo_data, opt_dir)
    options = ("eval.text_only_baseline=false",)
    train(config, tmp_path / "whole", *options)
    real_loss, calls = train_blip2_stage2.stage2_loss, []

    def dies_in_epoch_1(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6 + 2:  # 48 train captions / batch 8 = 6 iterations per epoch
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_blip2_stage2, "stage2_loss", dies_in_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "broken", *options)
    monkeypatch.setattr(train_blip2_stage2, "stage2_loss", real_loss)
    train(config, tmp_path / "broken", *options, resume=True)
    assert read_log(tmp_path / "broken") == read_log(tmp_path / "whole")


def test_evaluating_a_checkpoint_without_its_image_encoder_source_is_refused(demo_data, opt_dir, stage1_checkpoint,
                                                                            tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = stage2_config(tmp_path, demo_data, opt_dir)
    model, _ = create_model(load_config(
        str(stage2_config(tmp_path, demo_data, opt_dir, stage1_checkpoint)), train_blip2_stage2.Stage2Config).model)
    torch.save({"model": model.state_dict(), "config": {"model": {"pretrained": str(stage1_checkpoint)}}},
               out / "stage2.pth")
    with pytest.raises(InputError, match=f"no image-encoder weights.*{stage1_checkpoint}"):
        train(config, out, evaluate=True, checkpoint=out / "stage2.pth")


def test_evaluate_captions_with_the_model_in_eval_mode(demo_data, opt_dir, stage1_checkpoint, tmp_path, monkeypatch):
    modes = []

    def recording_caption_function(model, *args):
        def caption_fn(images):
            modes.append(model.training)
            return ["a caption"] * len(images)
        return caption_fn

    monkeypatch.setattr(eval_caption, "caption_function", recording_caption_function)
    config = stage2_config(tmp_path, demo_data, opt_dir, stage1_checkpoint)
    model, _ = create_model(load_config(str(config), train_blip2_stage2.Stage2Config).model)
    torch.save({"model": model.state_dict()}, tmp_path / "stage2.pth")  # a stage-2 checkpoint: nothing left at init
    train(config, tmp_path / "out", "eval.text_only_baseline=false", evaluate=True, checkpoint=tmp_path / "stage2.pth")
    assert modes and not any(modes)  # dropout off
