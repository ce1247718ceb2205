"""VQA end to end: stage-2 fine-tuning on the demo's VQAv2-layout splits keeps the best checkpoint by VQA accuracy;
eval_vqa.py reproduces the logged accuracy with 1 and 2 processes, answers each question once, and its scores equal
an independent computation (tests/reference_vqa_eval.py) over the results file it writes."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import eval_vqa
from data.vqa import VQASplitConfig, read_vqa_split
from tests.conftest import TINY_TRAIN, read_log, run_script
from tests.reference_vqa_eval import official_accuracy
from tests.test_distributed import TORCHRUN
from tests.test_train_blip2_stage2 import tiny_stage2_model
from tests.test_train_blip2_stage2 import train as train_stage2


def vqa_split(data_dir, name, indent, annotations=True):
    """The YAML mapping of the demo's VQA split `name` (keys indented by `indent` spaces, the first unindented)."""
    lines = [f"questions: {data_dir}/vqa_{name}_questions.json",
             f"annotations: {data_dir}/vqa_{name}_annotations.json" if annotations else None,
             f"image_root: {data_dir}", f"image_template: images/caption_{name}/synthetic_{{image_id:012d}}.png"]
    return f"\n{' ' * indent}".join(line for line in lines if line)


def vqa_config(directory, data_dir, opt_dir):
    """A tiny stage-2 config fine-tuning on the demo VQA train split, validated on its val split."""
    path = Path(directory) / "vqa.yaml"
    path.write_text(f"""
{tiny_stage2_model(opt_dir)}data:
  train:
    - {vqa_split(data_dir, "train", 6)}
  vqa_val:
    {vqa_split(data_dir, "val", 4)}
  vqa_test:
    {vqa_split(data_dir, "test", 4, annotations=False)}
  num_workers: 0
{TINY_TRAIN}vqa:
  batch_size: 8
  num_beams: 2
  max_new_tokens: 4
""")
    return path


@pytest.fixture(scope="module")
def vqa_run(demo_data, opt_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("vqa_run")
    config, out = vqa_config(directory, demo_data, opt_dir), directory / "out"
    train_stage2(config, out)
    return config, out


def test_fine_tuning_keeps_the_best_checkpoint_by_vqa_accuracy(vqa_run):
    config, out = vqa_run
    log = read_log(out)
    epochs, final = log[:-1], log[-1]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert {"vqa_val_accuracy", "vqa_val_yes/no", "vqa_val_number", "vqa_val_other", "vqa_val_n"} <= set(epochs[0])
    best = max(epochs, key=lambda e: e["vqa_val_accuracy"])
    assert final["best_epoch"] == best["epoch"]
    assert torch.load(out / "checkpoint_best.pth", weights_only=True)["vqa_val_accuracy"] == best["vqa_val_accuracy"]
    assert final["vqa_test_n"] == 24  # test-dev-like: answered, not scored
    results = json.loads((out / "vqa_test_results.json").read_text())
    assert len(results) == 24 and all(isinstance(r["answer"], str) for r in results)


def val_questions(data_dir):
    return read_vqa_split(VQASplitConfig(str(data_dir / "vqa_val_questions.json"),
                                         str(data_dir / "vqa_val_annotations.json"), str(data_dir),
                                         "images/caption_val/synthetic_{image_id:012d}.png"))


def test_eval_vqa_with_one_and_two_processes_reproduces_the_logged_accuracy(vqa_run, demo_data, tmp_path):
    config, out = vqa_run
    log = read_log(out)
    best = next(e for e in log[:-1] if e["epoch"] == log[-1]["best_epoch"])
    results = {}
    for name, launcher in (("one", ()), ("two", TORCHRUN)):
        run_script(*launcher, "eval_vqa.py", "--config", config, "--output_dir", tmp_path / name, "--device", "cpu",
                   "--checkpoint", out / "checkpoint_best.pth")
        results[name] = json.loads((tmp_path / name / "evaluate.txt").read_text())
        for key in ("accuracy", "yes/no", "number", "other", "n"):
            assert results[name][f"vqa_val_{key}"] == pytest.approx(best[f"vqa_val_{key}"], abs=1e-9), (name, key)
    assert results["one"] == results["two"]
    one, two = (json.loads((tmp_path / name / "vqa_val_results.json").read_text()) for name in ("one", "two"))
    assert one == two and [a["question_id"] for a in one] == sorted(q["question_id"] for q in val_questions(demo_data))


def test_scores_of_the_answers_equal_an_independent_count(vqa_run, demo_data, tmp_path, monkeypatch):
    """Answers given by a stand-in for generation (a human answer for two of three questions, else a wrong one):
    evaluate.txt and the results file agree with the official per-question computation written in the test."""
    config, out = vqa_run
    questions = val_questions(demo_data)
    chosen = {q["question_id"]: q["answers"][i % 10] if i % 3 else "purple" for i, q in enumerate(questions)}
    monkeypatch.setattr(eval_vqa, "generate_texts", lambda text_fn, loader, header:  # test: "purple", not scored
                        [chosen.get(qid, "purple") for qid in loader.dataset.question_ids])
    eval_vqa.main(["--config", str(config), "--output_dir", str(tmp_path), "--device", "cpu", "--checkpoint",
                   str(out / "checkpoint_best.pth")])
    result = json.loads((tmp_path / "evaluate.txt").read_text())
    written = {a["question_id"]: a["answer"] for a in json.loads((tmp_path / "vqa_val_results.json").read_text())}
    assert written == chosen
    per_type = defaultdict(list)
    for q in questions:
        per_type[q["answer_type"]].append(official_accuracy(chosen[q["question_id"]], q["answers"]))
    everything = [a for values in per_type.values() for a in values]
    assert 0 < result["vqa_val_accuracy"] < 100
    assert result["vqa_val_accuracy"] == pytest.approx(100 * sum(everything) / len(everything), abs=1e-9)
    for answer_type, values in per_type.items():
        assert result[f"vqa_val_{answer_type}"] == pytest.approx(100 * sum(values) / len(values), abs=1e-9)


def test_a_config_without_vqa_splits_is_refused(demo_data, opt_dir, tmp_path):
    config = vqa_config(tmp_path, demo_data, opt_dir)
    result = run_script("eval_vqa.py", "--config", config, "--output_dir", tmp_path / "out", "--device", "cpu",
                        "--options", "data.vqa_val=null", "data.vqa_test=null", "model.pretrained=x.pth",
                        check=False)
    assert result.returncode == 2 and "nothing to evaluate; set data.vqa_val" in result.stderr
    assert eval_vqa.VQAConfig.__dataclass_fields__["vqa"].default_factory().num_beams == 5  # BLIP-2's default
