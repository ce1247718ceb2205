"""bench.py runs, and its figures are consistent: one record per mode with sane throughput and memory (timings are
only checked to be positive), FLOPs per sample equal to a count of our own (every nn.Linear and nn.Conv2d by forward
hooks, every SDPA call by a TorchFunctionMode, over the batches bench.py builds; a training step is three forwards
but for the patch embedding's input gradient), options reach the config and are checked, and the staircase's steps
accumulate their switches. The NLVR tiny model is the one measured: every parameter of it is trainable.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import bench
from tests.conftest import ROOT, run_script
from train_nlvr import logits_and_labels

FIELDS = ("task", "size", "mode", "device", "batch_size", "samples_per_s", "samples_per_s_min", "samples_per_s_max",
          "peak_memory_mb", "gflops_per_sample")
QUICK = ("--size", "tiny", "--steps", "1", "--reps", "2", "--warmup", "1")


@pytest.fixture(scope="module")
def nlvr_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "nlvr.json"
    run_script("bench.py", "--task", "nlvr", *QUICK, "--options", "train.attention=math", "--json", out)
    return {record["mode"]: record for record in json.loads(out.read_text())}


def test_one_record_per_mode_with_sane_figures(nlvr_records):
    assert list(nlvr_records) == ["train", "eval"]
    for mode, record in nlvr_records.items():
        assert all(record.get(key) is not None for key in FIELDS), record
        assert (record["task"], record["size"], record["mode"]) == ("nlvr", "tiny", mode)
        assert record["device"].startswith("cpu")
        assert 0 < record["samples_per_s_min"] <= record["samples_per_s"] <= record["samples_per_s_max"]
        assert record["peak_memory_mb"] > 0 and record["gflops_per_sample"] > 0
        assert record["mfu"] is None  # no GPU peak on CPU
        assert record["options"] == ["train.attention=math"]
    assert nlvr_records["train"]["batch_size"] == 16 and nlvr_records["eval"]["batch_size"] == 128  # the config's


class CountAttention(TorchFunctionMode):
    """FLOPs of the two matrix products of every scaled_dot_product_attention call: 2 x 2 x [B, H, Lq, D] x Lk."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            self.flops += 4 * query.numel() * key.shape[-2]
        return func(*args, **(kwargs or {}))


def our_flops(batch_size, tmp_path):
    """(forward FLOPs, of which the patch embedding's) per sample of the NLVR tiny model on bench's batch."""
    cfg = bench.build_config("nlvr", "tiny", [], tmp_path)
    model, tokenizer = bench.build_model("nlvr", cfg, "tiny", torch.device("cpu"))
    batch = bench.train_batch("nlvr", cfg, batch_size, torch.Generator().manual_seed(0))
    counts = {"linear": 0, "conv": 0}

    def linear(module, inputs, output):
        counts["linear"] += 2 * inputs[0].numel() * module.out_features

    def conv(module, inputs, output):
        kh, kw = module.kernel_size
        counts["conv"] += 2 * output.numel() * module.in_channels // module.groups * kh * kw

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
    with torch.no_grad(), CountAttention() as attention:
        logits_and_labels(model, batch, tokenizer, torch.device("cpu"))
    assert counts["linear"] and counts["conv"] and attention.flops
    return (counts["linear"] + counts["conv"] + attention.flops) / batch_size, counts["conv"] / batch_size


def test_flops_per_sample_match_our_own_count(nlvr_records, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # bench's config paths are relative to the repository
    train, evaluation = nlvr_records["train"], nlvr_records["eval"]
    forward, _ = our_flops(evaluation["batch_size"], tmp_path)
    # Within 0.5%: the record rounds to 0.1 MFLOP; leaving out attention (2% here) would show.
    assert evaluation["gflops_per_sample"] * 1e9 == pytest.approx(forward, rel=5e-3)
    # Training: forward, then backward's input and weight gradients (two more forwards each), except that the
    # patch embedding's input (the images) needs no gradient.
    forward, patch_embedding = our_flops(train["batch_size"], tmp_path)
    assert train["gflops_per_sample"] * 1e9 == pytest.approx(3 * forward - patch_embedding, rel=5e-3)
    # Per-sample FLOPs do not depend on the batch size (both batches pad to the same text length).
    assert 2.9 < train["gflops_per_sample"] / evaluation["gflops_per_sample"] < 3.0


def test_an_unknown_option_is_refused_by_name():
    result = run_script("bench.py", "--task", "nlvr", "--mode", "eval", *QUICK, "--options", "train.nope=1",
                        check=False)
    assert result.returncode != 0
    assert "unknown key 'train.nope'" in result.stderr


def test_max_batch_needs_cuda():
    result = run_script("bench.py", "--task", "nlvr", "--max_batch", check=False)
    assert result.returncode != 0
    assert "--device cuda" in result.stderr


def test_staircase_steps_accumulate_their_switches(tmp_path):
    """NLVR's training staircase with train.compile pinned off (compiling takes minutes on CPU): the ITG switch
    (stage 1 only) and the compile step are left out, each other step adds its switches to the previous ones, and
    the pinned option comes last so that it wins."""
    out = tmp_path / "stairs.json"
    run_script("bench.py", "--task", "nlvr", "--mode", "train", "--size", "tiny", "--steps", "1", "--reps", "1",
               "--warmup", "1", "--staircase", "--options", "train.compile=false", "--json", out)
    records = json.loads(out.read_text())
    labels = [label for label, _ in bench.STAIRCASE["train"] if not label.startswith(("+ ITG", "+ torch.compile"))]
    assert [r["step"] for r in records] == labels
    assert all(r["mode"] == "train" and r["samples_per_s"] > 0 for r in records)
    options = [r["options"] for r in records]
    assert options[0] == ["train.attention=math", "train.fused_adamw=false", "train.compile=false"]
    assert not any("itg_attention" in o for step in options for o in step)
    for previous, current in zip(options, options[1:]):
        assert current[-1] == "train.compile=false"
        assert current[:len(previous) - 1] == previous[:-1] and len(current) > len(previous)
    assert options[-1][-2] == "train.fused_adamw=true"
