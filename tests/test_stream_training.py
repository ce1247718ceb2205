"""Training on a stream (webdataset shards mixed with a caption file, data.shards): a stage-1 run planned in
train.max_steps, resumed from a mid-run checkpoint at the step it holds, and stopped by too much dirty data."""

import json
import shutil
import tarfile

import pytest
import webdataset as wds

import data.feature_cache
from tests.conftest import killed_after_step
from tests.test_train_blip2_stage1 import stage1_config, train
from utils import InputError

STREAM = ["train.max_steps=6", "train.eval_every_steps=3", "train.save_every_steps=2", "train.print_freq=1"]


def shard_config(directory, demo_data, shards=None):
    """stage1_config with data.train the demo's shards (weight 3) and its Visual Genome-style file (weight 1)."""
    path = stage1_config(directory, demo_data)
    shards = shards or f"{demo_data}/shards/caption_train-{{000000..000007}}.tar"
    path.write_text(path.read_text().replace(
        f"    - ann_file: {demo_data}/coco_karpathy_train.json\n",
        f"    - url: {shards}\n      weight: 3.0\n    - ann_file: {demo_data}/vg_style_train.json\n      weight: 1.0\n"
    ))
    return path


def records(out):
    return [json.loads(line) for line in (out / "train_steps.jsonl").read_text().splitlines()]


def losses(out):
    return [line["train_loss"] for line in map(json.loads, (out / "log.txt").read_text().splitlines())
            if "train_loss" in line]


@pytest.fixture(scope="module")
def stopped_run(demo_data, tmp_path_factory):
    """A 6-step stream run that dies in step 5 (checkpoint_last.pth holds step 4), copied before any resume."""
    directory = tmp_path_factory.mktemp("stream")
    config, out = shard_config(directory, demo_data), directory / "out"
    with killed_after_step(4):
        train(config, out, *STREAM)
    return config, out


def resumed_copy(stopped_run, destination):
    config, out = stopped_run
    shutil.copytree(out, destination)
    train(config, destination, *STREAM, resume=True)
    return destination


def test_a_stream_run_is_planned_in_steps_and_resumes_at_its_checkpoint(stopped_run, tmp_path, monkeypatch):
    config, out = stopped_run
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    starts = []
    real_loader = data.feature_cache.stream_train_loader
    monkeypatch.setattr(data.feature_cache, "stream_train_loader",
                        lambda stream, *args, **kwargs: starts.append(stream.start_step) or real_loader(stream, *args,
                                                                                                       **kwargs))
    resumed = resumed_copy(stopped_run, tmp_path / "resumed")
    assert starts == [4]  # a fresh pass seeded by the step, not the first 4 steps' batches again
    assert [r["step"] for r in records(resumed)] == [1, 2, 3, 4, 5, 6]  # no repeat: the records after 4 went
    lines = [json.loads(line) for line in (resumed / "log.txt").read_text().splitlines()]
    assert [line.get("step") for line in lines[:2]] == [3, 6]
    assert "best_step" in lines[-1]
    # Every step draws a full batch from the stream: what the records say was read since the process started (the
    # resumed one at step 4) grows with the steps.
    assert all(r["samples_read"] >= 8 * (r["step"] - (4 if r["step"] > 4 else 0)) for r in records(resumed))
    assert all(not any(r["samples_skipped"].values()) for r in records(resumed))


def test_a_resumed_stream_is_a_function_of_the_seed_and_the_step(stopped_run, tmp_path):
    first, second = (resumed_copy(stopped_run, tmp_path / name) for name in ("a", "b"))
    kept = ("step", "lr", "loss", "loss_itc", "loss_itm", "loss_itg", "grad_norm", "samples_read")
    assert [[r[k] for k in kept] for r in records(first)] == [[r[k] for k in kept] for r in records(second)]
    assert losses(first) == losses(second)


def dirty_copy(demo_data, directory, bad_every):
    """The demo's shards with every `bad_every`-th image replaced by bytes that do not decode."""
    directory.mkdir()
    for shard in range(8):
        source = f"{demo_data}/shards/caption_train-{shard:06d}.tar"
        samples = {}
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[extension] = tar.extractfile(member).read()
        with wds.TarWriter(str(directory / f"{shard}.tar")) as writer:
            for i, sample in enumerate(samples.values()):
                if i % bad_every == 0:
                    sample["png"] = b"not a png"
                writer.write(sample)
    return f"{directory}/{{0..7}}.tar"


def test_dirty_shards_are_counted_and_too_many_stop_the_run(demo_data, tmp_path):
    shards = dirty_copy(demo_data, tmp_path / "dirty", bad_every=4)
    config = shard_config(tmp_path, demo_data, shards)
    with pytest.raises(InputError, match=r"unusable .*more than data.max_bad_fraction 0.1"):
        train(config, tmp_path / "strict", *STREAM, "data.max_bad_fraction=0.1")
    train(config, tmp_path / "lenient", *STREAM, "train.eval_every_steps=6", "data.max_bad_fraction=0.5")
    last = records(tmp_path / "lenient")[-1]
    skipped = last["samples_skipped"]["undecodable image"]
    # A quarter of the shard samples, which are three quarters of the stream: about 3/16 of what was read.
    assert 0.1 < skipped / last["samples_read"] < 0.3
    assert sum(last["samples_skipped"].values()) == skipped
