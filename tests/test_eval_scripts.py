"""End to end: eval_retrieval.py and eval_caption.py reproduce what the trainers logged for the same checkpoint, with
1 and with 2 processes."""

import json
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch
from PIL import Image
from ruamel.yaml import YAML

import eval_caption
import eval_retrieval
from data.caption import RetrievalDataset
from data.transforms import eval_transform
from models.blip2_qformer import create_model, decode_captions, load_checkpoint
from tests.conftest import read_log, run_script
from tests.test_distributed import TORCHRUN
from tests.test_train_blip2_stage1 import stage1_config
from tests.test_train_blip2_stage1 import train as train_stage1
from tests.test_train_blip2_stage2 import stage2_config
from tests.test_train_blip2_stage2 import train as train_stage2
from utils import InputError, load_config

RETRIEVAL_METRICS = ("txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean",
                     "r_mean")


@pytest.fixture(scope="module")
def stage1_run(demo_data, tmp_path_factory):
    """(config, output dir) of a 1-epoch stage-1 training run."""
    directory = tmp_path_factory.mktemp("stage1_run")
    config, out = stage1_config(directory, demo_data), directory / "out"
    train_stage1(config, out, "train.epochs=1")
    return config, out


@pytest.fixture(scope="module")
def stage2_run(demo_data, opt_dir, stage1_checkpoint, tmp_path_factory):
    """(config, output dir) of a 1-epoch stage-2 training run from the stage-1 checkpoint."""
    directory = tmp_path_factory.mktemp("stage2_run")
    config, out = stage2_config(directory, demo_data, opt_dir, stage1_checkpoint), directory / "out"
    train_stage2(config, out, "train.epochs=1")
    return config, out


def eval_args(config, output_dir, checkpoint=None, *options):
    args = ["--config", str(config), "--output_dir", str(output_dir), "--device", "cpu"]
    args += ["--checkpoint", str(checkpoint)] if checkpoint else []
    return args + (["--options", *options] if options else [])


def logged(out):
    """(the log line of the best epoch, the final line) of a training run."""
    log = read_log(out)
    epochs, final = log[:-1], log[-1]
    return next(e for e in epochs if e["epoch"] == final["best_epoch"]), final


def read_json(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def retrieval_one_process(stage1_run, tmp_path_factory):
    """(evaluate.txt, printed output) of eval_retrieval.main on the stage-1 best checkpoint."""
    config, out = stage1_run
    result, printed = tmp_path_factory.mktemp("retrieval_1"), StringIO()
    with redirect_stdout(printed):
        eval_retrieval.main(eval_args(config, result, out / "checkpoint_best.pth"))
    return read_json(result / "evaluate.txt"), printed.getvalue()


def test_retrieval_reproduces_the_logged_metrics(stage1_run, retrieval_one_process):
    _, out = stage1_run
    result, printed = retrieval_one_process
    best, final = logged(out)
    for metric in RETRIEVAL_METRICS:
        assert result[f"val_{metric}"] == best[f"val_{metric}"], metric
        assert result[f"test_{metric}"] == final[f"test_{metric}"], metric
    assert set(result) == {f"{split}_{m}" for split in ("val", "test") for m in RETRIEVAL_METRICS}
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:len(RETRIEVAL_METRICS)] == list(RETRIEVAL_METRICS))
    assert lines[header + 1].startswith("val ") and lines[header + 2].startswith("test ")
    assert len(lines[header + 1].split()) == len(RETRIEVAL_METRICS) + 1


def test_retrieval_with_two_processes_equals_one_process(stage1_run, retrieval_one_process, tmp_path):
    config, out = stage1_run
    run_script(*TORCHRUN, "eval_retrieval.py", *eval_args(config, tmp_path, out / "checkpoint_best.pth"))
    assert read_json(tmp_path / "evaluate.txt") == retrieval_one_process[0]


@pytest.fixture(scope="module")
def caption_one_process(stage2_run, tmp_path_factory):
    """The output directory of eval_caption.main on the stage-2 best checkpoint."""
    config, out = stage2_run
    result = tmp_path_factory.mktemp("caption_1")
    eval_caption.main(eval_args(config, result, out / "checkpoint_best.pth"))
    return result


def test_caption_reproduces_the_logged_metrics_and_captions(stage2_run, caption_one_process):
    _, out = stage2_run
    best_checkpoint = torch.load(out / "checkpoint_best.pth", weights_only=True)["model"]
    assert not any(k.startswith("visual_encoder.") for k in best_checkpoint)  # it comes from model.pretrained
    result = read_json(caption_one_process / "evaluate.txt")
    best, final = logged(out)
    expected = {**{k: v for k, v in best.items() if k.startswith("val_")},
                **{k: v for k, v in final.items() if k.startswith("test_")}}
    assert {"val_CIDEr", "val_agg_metric", "test_Bleu_4", "test_text_only_CIDEr"} <= set(expected)
    assert result == expected
    assert read_json(caption_one_process / "test_captions.json") == read_json(out / "test_captions.json")


def test_caption_with_two_processes_equals_one_process(stage2_run, caption_one_process, tmp_path):
    config, out = stage2_run
    run_script(*TORCHRUN, "eval_caption.py", *eval_args(config, tmp_path, out / "checkpoint_best.pth"))
    assert read_json(tmp_path / "evaluate.txt") == read_json(caption_one_process / "evaluate.txt")
    for name in ("val_captions.json", "test_captions.json"):
        assert read_json(tmp_path / name) == read_json(caption_one_process / name), name


def qformer_caption_config(directory, data_dir):
    """The stage-1 config with an `eval:` section of captioning options (JSON is YAML)."""
    raw = {"model": YAML(typ="safe").load(stage1_config(directory, data_dir).read_text())["model"],
           "data": {"val_file": f"{data_dir}/coco_karpathy_val.json",
                    "test_file": f"{data_dir}/coco_karpathy_test.json", "image_root": str(data_dir), "num_workers": 0},
           "eval": {"batch_size": 4, "num_beams": 2, "max_new_tokens": 8, "min_new_tokens": 1}}
    path = directory / "qformer_caption.yaml"
    path.write_text(json.dumps(raw))
    return path


def test_qformer_decoder_captions_equal_an_independent_computation(demo_data, stage1_run, tmp_path):
    _, out = stage1_run
    checkpoint, config = out / "checkpoint_best.pth", qformer_caption_config(tmp_path, demo_data)
    eval_caption.main(eval_args(config, tmp_path / "eval", checkpoint))

    model, tokenizer = create_model(load_config(str(config), eval_caption.CaptionConfig).model)
    load_checkpoint(model, str(checkpoint))
    model.eval()
    test_file = str(demo_data / "coco_karpathy_test.json")
    dataset = RetrievalDataset(test_file, str(demo_data), eval_transform(32))
    captions = {}
    with torch.no_grad():
        for image_id, path in zip(dataset.image_ids, dataset.image_paths):
            pixels = eval_transform(32)(Image.open(path).convert("RGB"))[None]
            ids = model.generate(pixels, num_beams=2, max_new_tokens=8, min_new_tokens=1)
            captions[image_id] = decode_captions(tokenizer, ids)[0]
    assert read_json(tmp_path / "eval" / "test_captions.json") == [
        {"image_id": image_id, "caption": caption} for image_id, caption in captions.items()]

    result = read_json(tmp_path / "eval" / "evaluate.txt")
    metrics = eval_caption.caption_metrics(captions, eval_caption.ground_truth_from_annotation(test_file))
    assert {k[len("test_"):]: v for k, v in result.items() if k.startswith("test_")} == {
        **metrics, "agg_metric": metrics["CIDEr"] + metrics["Bleu_4"]}
    assert "val_CIDEr" in result and not any(k.startswith("test_text_only") for k in result)


def test_caption_config_without_model_arch_is_refused(demo_data, opt_dir, tmp_path):
    config = stage2_config(tmp_path, demo_data, opt_dir)
    config.write_text(config.read_text().replace("  arch: blip2_opt\n", ""))
    with pytest.raises(InputError, match="model.arch"):
        eval_caption.main(eval_args(config, tmp_path / "out", tmp_path / "any.pth"))


@pytest.mark.parametrize("script, write_config", [(eval_retrieval, stage1_config),
                                                   (eval_caption, qformer_caption_config)])
def test_a_config_without_evaluation_splits_is_refused(script, write_config, demo_data, tmp_path):
    config = write_config(tmp_path, demo_data)
    with pytest.raises(InputError, match="nothing to evaluate"):
        script.main(eval_args(config, tmp_path / "out", tmp_path / "any.pth", "data.val_file=null",
                              "data.test_file=null"))


def test_retrieval_without_weights_is_refused(demo_data, tmp_path):
    with pytest.raises(InputError, match="needs weights"):
        eval_retrieval.main(eval_args(stage1_config(tmp_path, demo_data), tmp_path / "out"))
