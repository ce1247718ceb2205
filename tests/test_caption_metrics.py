"""eval_caption: pycocoevalcap's BLEU and CIDEr against a from-scratch reference (with Java and without), the
ground-truth readers, caption generation over a sharded loader, and the checks on ids."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import eval_caption
import utils
from data.caption import RetrievalDataset
from data.loader import ShardSampler, eval_loader
from data.transforms import eval_transform
from eval_caption import (agg_metric, approximate_ptb, caption_metrics, evaluate_captions, generate_captions,
                          ground_truth_from_annotation, ground_truth_from_coco)
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
from tests.conftest import run_script
from tests.reference_caption_metrics import bleu, cider_d
from utils import InputError

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
WITHOUT_JAVA = {*BLEU, "ROUGE_L", "CIDEr"}
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's tokeniser and METEOR run Java")
# Lower-case words that PTBTokenizer leaves as they are (no punctuation, nothing it splits or respells such as
# "cannot" or "colour"), so that tokenisation is the identity and the reference sees what pycocoevalcap scores.
VOCAB = "a man dog red ball on the grass with two small big runs sits near white".split()
# Each of two processes (torchrun, gloo) evaluates a caption_fn that names each image by its mean pixel, on the
# Python path (METEOR's JVM would take seconds), and writes what it got to {out}.{rank}.json.
TWO_PROCESSES = """
import json, shutil, sys
shutil.which = lambda *args, **kwargs: None
from data.caption import RetrievalDataset
from data.loader import eval_loader
from data.transforms import eval_transform
from eval_caption import evaluate_captions, ground_truth_from_annotation
from utils import cleanup_distributed, get_rank, init_distributed

data, ann_file, out = sys.argv[1:]
init_distributed("cpu")
dataset = RetrievalDataset(ann_file, data, eval_transform(32))
metrics, results = evaluate_captions(lambda images: [f"mean {image.mean():.6f}" for image in images],
                                     eval_loader(dataset, 2, num_workers=0), ground_truth_from_annotation(ann_file),
                                     results_path=out + ".results.json")
with open(f"{out}.{get_rank()}.json", "w") as f:
    json.dump({"metrics": metrics, "results": results}, f)
cleanup_distributed()
"""


def random_captions(seed, num_images=30, refs_per_image=5):
    """(results {id: caption}, ground truth {id: [captions]}), ids both integers and strings, the results in
    another order. A hypothesis (3 to 12 words) is a copy of a reference, a reference with one word replaced, or
    random words."""
    rng = random.Random(seed)

    def sentence():
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(3, 12)))

    ids = [i if i % 2 else f"image_{i}" for i in range(num_images)]
    ground_truth = {i: [sentence() for _ in range(refs_per_image)] for i in ids}
    results = {}
    for i in reversed(ids):
        words, draw = rng.choice(ground_truth[i]).split(), rng.random()
        if draw < 0.6:
            if draw < 0.3:
                words[rng.randrange(len(words))] = rng.choice(VOCAB)
            results[i] = " ".join(words)
        else:
            results[i] = sentence()
    return results, ground_truth


def assert_matches_reference(metrics, results, ground_truth):
    hyps, refs = [results[i] for i in ground_truth], list(ground_truth.values())
    expected = {**dict(zip(BLEU, bleu(hyps, refs))), "CIDEr": cider_d(hyps, refs)}
    assert 0.05 < expected["Bleu_4"] < 0.95 and 0.1 < expected["CIDEr"]  # a case where mistakes would show
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-6), (name, metrics, expected)


def without_java(monkeypatch):
    """Make Java look absent, and any attempt to start a process fail."""
    monkeypatch.setattr(shutil, "which", lambda cmd, *args, **kwargs: None)

    def no_process(*args, **kwargs):
        raise AssertionError(f"started a process without Java: {args}")

    monkeypatch.setattr(subprocess, "Popen", no_process)


def val_dataset(demo_data):
    return RetrievalDataset(str(demo_data / "coco_karpathy_val.json"), str(demo_data), eval_transform(32))


def captioner(dataset, caption_of):
    """A caption_fn that recognises each image of `dataset` (by its pixels) and captions image i `caption_of(i)`."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])

    def caption_fn(batch):
        assert batch.device.type == "cpu"
        found = [[i for i in range(len(images)) if torch.equal(images[i], image)] for image in batch]
        assert all(len(matches) == 1 for matches in found)
        return [caption_of(matches[0]) for matches in found]

    return caption_fn


# ------------------------------------------------------------------------------------------- metrics vs reference

@needs_java
def test_metrics_match_reference_with_java(capsys):
    results, ground_truth = random_captions(seed=0)
    metrics = caption_metrics(results, ground_truth)
    assert_matches_reference(metrics, results, ground_truth)
    assert set(metrics) - {"SPICE"} == WITHOUT_JAVA | {"METEOR"}
    assert 0 < metrics["METEOR"] < 1 and 0 < metrics["ROUGE_L"] < 1
    assert all(isinstance(value, float) for value in metrics.values())
    assert "SPICE" in metrics or "SPICE skipped" in capsys.readouterr().out


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_reference_without_java(seed, monkeypatch, capsys):
    without_java(monkeypatch)
    results, ground_truth = random_captions(seed)
    metrics = caption_metrics(results, ground_truth)
    assert set(metrics) == WITHOUT_JAVA
    assert_matches_reference(metrics, results, ground_truth)
    assert 0 < metrics["ROUGE_L"] < 1
    assert [line for line in capsys.readouterr().out.splitlines() if "java" in line.lower()] == [
        "caption metrics: no java on PATH, so tokenising with a Python approximation of PTBTokenizer and leaving "
        "out METEOR and SPICE; install a Java runtime for the full COCO caption metrics"]


def test_zero_precision_scores_as_in_pycocoevalcap(monkeypatch):
    # No 4-gram of the hypotheses is in the references: BLEU-4 is 0 by definition, small but positive in
    # pycocoevalcap (its epsilons), whose numbers are the ones papers report.
    without_java(monkeypatch)
    results, ground_truth = {1: "a b c x e", 2: "f g x i"}, {1: ["a b c d e"], 2: ["f g h i"]}
    metrics = caption_metrics(results, ground_truth)
    expected = bleu(list(results.values()), list(ground_truth.values()))
    assert expected[2] > 0.4 and expected[3] == 0.0
    assert metrics["Bleu_3"] == pytest.approx(expected[2], abs=1e-6) and 1e-6 < metrics["Bleu_4"] < 1e-3


@needs_java
def test_python_tokenisation_matches_ptb_tokenizer(demo_data):
    captions = [c for split in ("val", "test") for entry in json.loads(
        (demo_data / f"coco_karpathy_{split}.json").read_text()) for c in entry["caption"]]
    captions += ["A man's dog, (black-and-white) doesn't run... \"Quickly\"!", "a cat [on] a {mat}: it's 1,000 $5 & co",
                 "Two people; one is 3.5 m - tall -- yes?", "Hello 'world' `tick` here.", "what is this?!",
                 "They're here, we've gone, I'll go, he'd say, I'm ok.", "A dog/cat on a man-made road at 5:30 p.m."]
    tokens = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [approximate_ptb(c) for c in captions] == [tokens[i][0] for i in range(len(captions))]


@needs_java
def test_line_breaks_inside_captions_do_not_shift_the_java_tokeniser(monkeypatch):
    class NoMeteor:  # METEOR's JVM takes seconds to start and is not what this test is about
        def compute_score(self, refs, hyps):
            return 0.0, []

    monkeypatch.setattr(eval_caption, "Meteor", NoMeteor)
    ground_truth = {1: ["a dog\rruns on grass", "two dogs"], 2: ["a red\u2028ball", "a ball"], 3: ["the last one"]}
    results = {1: "a dog\nruns", 2: "a red\x85ball", 3: "the last one"}
    plain = caption_metrics({k: " ".join(v.split()) for k, v in results.items()},
                            {k: [" ".join(c.split()) for c in v] for k, v in ground_truth.items()})
    assert caption_metrics(results, ground_truth) == plain
    assert plain["Bleu_1"] == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------------------------------------ ground truth

def test_ground_truth_from_gt_file_equals_annotation_file(demo_data):
    from_gt = ground_truth_from_coco(demo_data / "coco_karpathy_val_gt.json")
    from_annotation = ground_truth_from_annotation(demo_data / "coco_karpathy_val.json")
    assert list(from_gt.items()) == list(from_annotation.items())
    assert list(from_gt) == val_dataset(demo_data).image_ids
    assert len(from_gt) == 8 and all(isinstance(i, int) and len(c) == 5 for i, c in from_gt.items())


def test_ground_truth_from_annotation_keeps_retrieval_dataset_ids(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(json.dumps([
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man (riding).", "Two; words"]},
        {"image": "b.png", "caption": "One caption.", "image_id": "coco_7"},
        {"image": "c.png", "caption": ["x"], "image_id": 7}]))
    assert ground_truth_from_annotation(path) == {391895: ["A man (riding).", "Two; words"],
                                                  "coco_7": ["One caption."], 7: ["x"]}


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    ("{", "is not valid JSON"),
    ({"images": [{"id": 1}]}, "'annotations'"),
    ({"annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 2}]}, "annotations[1]: missing field 'caption'"),
    ({"annotations": [{"caption": "a"}]}, "annotations[0]: missing field 'image_id'"),
    ({"annotations": [{"image_id": [1], "caption": "a"}]}, "'image_id' must be an integer or a string"),
    ({"annotations": []}, "has no annotations"),
])
def test_bad_coco_ground_truth(tmp_path, content, message):
    path = tmp_path / "val_gt.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(InputError, match="val_gt.json") as error:
        ground_truth_from_coco(path)
    assert message in str(error.value)


def test_bad_annotation_ground_truth(tmp_path):
    path = tmp_path / "val.json"
    path.write_text(json.dumps([{"image": "a_1.png", "caption": ["x"]}, {"image": "b_1.png", "caption": ["y"]}]))
    with pytest.raises(InputError, match="same image id 1"):
        ground_truth_from_annotation(path)
    path.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(InputError, match=r"val.json\[0\]: missing field 'caption'"):
        ground_truth_from_annotation(path)


# -------------------------------------------------------------------------------------------------- id checks

@pytest.mark.parametrize("results, message", [
    ({1: "a", "2": "c", 3: "x"}, r"1 captioned images have no ground truth \[3\], 0 ground-truth"),
    ({1: "a"}, r"0 captioned images have no ground truth \[\], 1 ground-truth images have no caption \['2'\]"),
    ({1: "a", 2: "c"}, r"no ground truth \[2\], 1 ground-truth images have no caption \['2'\]"),
])
def test_results_must_cover_the_ground_truth_images(results, message):
    with pytest.raises(InputError, match=message):
        caption_metrics(results, {1: ["a b"], "2": ["c d"]})


def test_empty_ground_truth_is_an_input_error():
    with pytest.raises(InputError, match="ground truth is empty"):
        caption_metrics({}, {})


# -------------------------------------------------------------------------------------------------- generation

def test_generate_captions_gives_every_image_once_in_order(demo_data):
    dataset = val_dataset(demo_data)
    results = generate_captions(captioner(dataset, lambda i: f"image {i}"), eval_loader(dataset, 3, num_workers=0))
    assert results == [{"image_id": dataset.image_ids[i], "caption": f"image {i}"} for i in range(len(dataset))]


def test_generate_captions_merges_the_shards_of_two_ranks(demo_data, monkeypatch):
    # Rank 0's loop runs here; all_gather_object hands it rank 1's shard as rank 1 would have captioned it.
    dataset = val_dataset(demo_data)
    caption_fn = captioner(dataset, lambda i: f"image {i}")
    loader = DataLoader(dataset, batch_size=3, sampler=ShardSampler(dataset, 0, 2))
    rank1 = [(i, f"image {i}") for i in ShardSampler(dataset, 1, 2)]
    monkeypatch.setattr(utils, "all_gather_object", lambda local: [local, rank1])
    assert generate_captions(caption_fn, loader) == [{"image_id": dataset.image_ids[i], "caption": f"image {i}"}
                                                     for i in range(len(dataset))]

    monkeypatch.setattr(utils, "all_gather_object", lambda local: [local, rank1, rank1[:1]])
    with pytest.raises(RuntimeError, match=r"repeated \[1\], missing \[\]"):
        generate_captions(caption_fn, loader)
    monkeypatch.setattr(utils, "all_gather_object", lambda local: [local])
    with pytest.raises(RuntimeError, match=r"repeated \[\], missing \[1, 3, 5, 7\]"):
        generate_captions(caption_fn, loader)


def test_caption_fn_must_caption_every_image(demo_data):
    dataset = val_dataset(demo_data)
    with pytest.raises(ValueError, match="returned 1 texts for a batch of 3 items"):
        generate_captions(lambda images: ["one"], eval_loader(dataset, 3, num_workers=0))


@needs_java
def test_evaluate_perfect_captions(demo_data, tmp_path):
    dataset = val_dataset(demo_data)
    ground_truth = ground_truth_from_coco(demo_data / "coco_karpathy_val_gt.json")
    caption_fn = captioner(dataset, lambda i: ground_truth[dataset.image_ids[i]][2])
    results_path = tmp_path / "val_results.json"
    metrics, results = evaluate_captions(caption_fn, eval_loader(dataset, 3, num_workers=0), ground_truth,
                                         results_path=results_path)
    assert results == [{"image_id": i, "caption": ground_truth[i][2]} for i in dataset.image_ids]
    assert json.loads(results_path.read_text()) == results
    assert metrics["Bleu_4"] == pytest.approx(1.0, abs=1e-6) and metrics["ROUGE_L"] == pytest.approx(1.0)
    assert 0.9 < metrics["METEOR"] <= 1 and metrics["CIDEr"] > 1
    assert agg_metric(metrics) == metrics["CIDEr"] + metrics["Bleu_4"]


def test_evaluate_checks_ids_before_scoring_or_writing(demo_data, tmp_path, monkeypatch):
    without_java(monkeypatch)
    dataset = val_dataset(demo_data)
    ground_truth = ground_truth_from_annotation(demo_data / "coco_karpathy_val.json")
    del ground_truth[dataset.image_ids[-1]]
    results_path = tmp_path / "results.json"
    with pytest.raises(InputError, match=f"no ground truth \\[{dataset.image_ids[-1]}\\]"):
        evaluate_captions(lambda images: ["x"] * len(images), eval_loader(dataset, 3, num_workers=0), ground_truth,
                          results_path=results_path)
    assert not results_path.exists()


def test_two_processes_caption_every_image_once(demo_data, tmp_path):
    # 7 images over 2 ranks in batches of 2: shards of 4 and 3 images, the last batch of each rank partial.
    entries = json.loads((demo_data / "coco_karpathy_val.json").read_text())[:7]
    ann_file = tmp_path / "val7.json"
    ann_file.write_text(json.dumps(entries))
    out = tmp_path / "two"
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--no-python", sys.executable,
               "-c", TWO_PROCESSES, demo_data, ann_file, out, timeout=300)
    rank0, rank1 = (json.loads((tmp_path / f"two.{rank}.json").read_text()) for rank in (0, 1))
    dataset = RetrievalDataset(str(ann_file), str(demo_data), eval_transform(32))
    expected = [{"image_id": dataset.image_ids[i], "caption": f"mean {dataset[i][0].mean():.6f}"} for i in range(7)]
    assert len({r["caption"] for r in expected}) == 7
    assert rank0["results"] == rank1["results"] == expected
    assert json.loads((tmp_path / "two.results.json").read_text()) == expected
    assert rank0["metrics"] == rank1["metrics"] and set(rank0["metrics"]) == WITHOUT_JAVA
