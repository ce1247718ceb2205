import io
import json
import math
import re
import tarfile
from collections import Counter
from typing import Union

import pytest
import torch
import webdataset as wds
from PIL import Image

from data.caption import CaptionDataset, CaptionSource
from data.shards import MixtureStream, ShardSource, image_id, stream_train_loader
from data.transforms import eval_transform, train_transform
from data.utils import pre_caption
from tests.conftest import run_script
from utils import InputError, config_section

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")


def picture(color):
    """An 8 px image of `color` with a white corner, so that crops and flips change it."""
    image = Image.new("RGB", (8, 8), color)
    image.paste((255, 255, 255), (0, 0, 3, 2))
    return image


def encoded(color, format="PNG"):
    buffer = io.BytesIO()
    picture(color).save(buffer, format=format)
    return buffer.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as tar:
        for sample in samples:
            tar.write(sample)


def caption_shards(directory, word, num_shards, per_shard):
    """`num_shards` shards of `per_shard` samples (png + txt "{word} {shard} {index}"); returns the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    for shard in range(num_shards):
        write_shard(directory / f"{shard:03d}.tar", [
            {"__key__": f"{shard:05d}{i:04d}", "png": encoded((20 * shard, 10 * i, 0)), "txt": f"{word} {shard} {i}"}
            for i in range(per_shard)])
    return f"{directory}/{{000..{num_shards - 1:03d}}}.tar"


def caption_file(directory, word, num):
    """A CaptionDataset of `num` images with captions "{word} {i}"."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(num):
        picture((0, 0, 10 * i)).save(directory / f"{i}.png")
    path = directory / "ann.json"
    path.write_text(json.dumps([{"image": f"{i}.png", "caption": f"{word} {i}"} for i in range(num)]))
    return CaptionDataset([CaptionSource(str(path), str(directory))], eval_transform(8))


def take(stream, n):
    items = iter(stream)
    return [next(items) for _ in range(n)]


# --- shards split over processes and loader workers --------------------------------------------------------------

def test_two_processes_two_workers_read_every_sample_once_per_pass(tmp_path):
    pattern = caption_shards(tmp_path / "shards", "sample", num_shards=8, per_shard=3)
    out = tmp_path / "out"
    out.mkdir()
    run_script(*TORCHRUN, "tests/shards_ddp.py", "--pattern", pattern, "--out", out, "--workers", 2,
               "--batch_size", 3, "--samples_per_slot", 6, "--passes", 2)
    seen = {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)}
    everything = Counter(f"sample {shard} {i}" for shard in range(8) for i in range(3))
    orders = {}
    for pass_number in range(2):
        read = Counter(caption for rank in seen for _, p, caption in seen[rank] if p == pass_number)
        assert read == everything  # every sample once per pass: none lost, none twice
        for rank in seen:
            for worker in range(2):
                slot = rank + 2 * worker  # shard i goes to slot i mod 4
                captions = [c for w, p, c in seen[rank] if (w, p) == (worker, pass_number)]
                assert {int(c.split()[1]) for c in captions} == {slot, slot + 4}
                orders.setdefault(slot, []).append(captions)
    assert any(first != second for first, second in orders.values())  # each pass is shuffled anew


def test_fewer_shards_or_examples_than_slots_is_an_input_error(tmp_path):
    stream = MixtureStream([ShardSource(caption_shards(tmp_path / "s", "x", num_shards=3, per_shard=1))],
                           eval_transform(8), 0)
    with pytest.raises(InputError, match=r"data.train\[0\] .* has 3 shards for 4 loader slots \(1 processes x 4 "
                                         r"loader workers\).*lower data.num_workers to 3"):
        stream_train_loader(stream, 2, num_workers=4)
    with pytest.raises(InputError, match=r"has 3 shards for 4 loader slots \(2 processes x 2 loader workers\)"):
        stream.check_slots(world_size=2, workers=2)
    examples = MixtureStream([(caption_file(tmp_path / "j", "y", 3), 1.0)], eval_transform(8), 0)
    with pytest.raises(InputError, match=r"data.train\[0\] \(3 examples\) has 3 examples for 4 loader slots"):
        examples.check_slots(world_size=4, workers=0)
    stream.check_slots(world_size=1, workers=3)  # as many slots as shards is fine


def test_missing_and_repeated_shards_are_input_errors(tmp_path):
    pattern = caption_shards(tmp_path / "s", "x", num_shards=2, per_shard=1)
    with pytest.raises(InputError, match=r"1 of 3 shard files do not exist, e.g. .*/s/002.tar"):
        MixtureStream([ShardSource(pattern.replace("001", "002"))], eval_transform(8), 0)
    with pytest.raises(InputError, match=r"names 1 shards more than once, e.g. .*/s/001.tar"):
        MixtureStream([ShardSource([pattern, str(tmp_path / "s/001.tar")])], eval_transform(8), 0)


def test_weights_are_config_keys_greater_than_zero(tmp_path):
    config = tmp_path / "data.yaml"
    hint = list[Union[CaptionSource, ShardSource]]
    config.write_text("train:\n  - {url: 'a/{0..3}.tar', weight: 2, caption: json}\n  - {ann_file: b.json}\n")
    assert config_section(config, "train", hint) == [ShardSource("a/{0..3}.tar", 2.0, "json"), CaptionSource("b.json")]
    for entry in ("{url: a.tar, weight: 0}", "{ann_file: b.json, weight: -1}"):
        config.write_text(f"train:\n  - {entry}\n")
        with pytest.raises(InputError, match=r"train\[0\].weight must be greater than 0"):
            config_section(config, "train", hint)


# --- the mixture -------------------------------------------------------------------------------------------------

def test_mixture_frequencies_follow_the_weights(tmp_path):
    weights = {"alpha": 1.0, "beta": 3.0, "gamma": 2.0}
    sources = [ShardSource(caption_shards(tmp_path / "alpha", "alpha", 2, 4), weights["alpha"]),
               ShardSource(caption_shards(tmp_path / "beta", "beta", 2, 4), weights["beta"]),
               (caption_file(tmp_path / "gamma", "gamma", 5), weights["gamma"])]
    draws = 3000
    counts = Counter(caption.split()[0] for _, _, caption, _ in take(MixtureStream(sources, eval_transform(8), 7),
                                                                       draws))
    expected = {word: draws * w / sum(weights.values()) for word, w in weights.items()}
    chi_square = sum((counts[word] - expected[word]) ** 2 / expected[word] for word in weights)
    # For 2 degrees of freedom the chi-square survival function is exp(-x / 2): the bound of a 0.1 % false alarm.
    assert chi_square < -2 * math.log(1e-3), (counts, expected)


# --- dirty shards ------------------------------------------------------------------------------------------------

def dirty_samples(shard):
    """Three good samples (first, middle, last) and one of each kind of bad sample, in this order."""
    jpeg = encoded((200, 0, 0), "JPEG")
    return [
        {"__key__": f"{shard}good0", "jpg": jpeg, "txt": f"good {shard} 0"},
        {"__key__": f"{shard}truncated", "jpg": jpeg[:len(jpeg) // 2], "txt": "a cut image"},
        {"__key__": f"{shard}notimage", "png": b"not a png at all", "txt": "no image in it"},
        {"__key__": f"{shard}nocaption", "jpg": jpeg},
        {"__key__": f"{shard}empty", "jpg": jpeg, "txt": " ... !! "},  # empty once cleaned (pre_caption)
        {"__key__": f"{shard}noimage", "txt": "a caption without image"},
        {"__key__": f"{shard}good1", "png": encoded((0, 200, 0)), "json": {"caption": f"Good {shard} 1."}},
        {"__key__": f"{shard}badjson", "jpg": jpeg, "json": b"{not json"},
        {"__key__": f"{shard}badtext", "jpg": jpeg, "txt": b"\xff\xfe caption"},
        {"__key__": f"{shard}good2", "jpg": jpeg, "txt": f"good {shard} 2"},
    ]


BAD_PER_SHARD = {"missing image": 1, "undecodable image": 2, "missing caption": 1, "undecodable caption": 2,
                 "empty caption": 1, "tar error": 0}


def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path):
    write_shard(tmp_path / "dirty0.tar", dirty_samples(0))
    # A buffer of one keeps the tar's order: the third good sample is the shard's last, so the counts are exact.
    stream = MixtureStream([ShardSource(str(tmp_path / "dirty0.tar"))], eval_transform(8), 0, shuffle_buffer=1)
    items = take(stream, 3)
    assert [caption for _, _, caption, _ in items] == ["good 0 0", "good 0 1", "good 0 2"]
    assert all(image.shape == (3, 8, 8) for image, *_ in items)
    assert stream.skipped() == BAD_PER_SHARD and stream.read() == 10

    # Counted in shared memory by the loader workers, read in the main process; batches hold good samples only.
    write_shard(tmp_path / "dirty1.tar", dirty_samples(1))
    stream = MixtureStream([ShardSource(str(tmp_path / "dirty{0..1}.tar"))], eval_transform(8), 0, shuffle_buffer=1)
    loader = stream_train_loader(stream, 3, num_workers=2)
    batches = [batch for _, batch in zip(range(2), loader)]
    del loader
    assert [sorted(batch[2]) for batch in batches] == [[f"good {s} {i}" for i in range(3)] for s in (0, 1)]
    skipped = stream.skipped()
    assert all(skipped[reason] >= 2 * n for reason, n in BAD_PER_SHARD.items()) and stream.read() >= 20


def test_a_truncated_shard_gives_its_samples_before_the_cut(tmp_path):
    whole = tmp_path / "whole.tar"
    write_shard(whole, [{"__key__": f"{i:04d}", "png": encoded((i, 0, 0)), "txt": f"sample {i}"} for i in range(6)])
    data = whole.read_bytes()
    with tarfile.open(whole) as tar:
        cut = tar.getmember("0003.png")  # in the middle of the fourth sample's image
    (tmp_path / "cut.tar").write_bytes(data[:cut.offset_data + cut.size // 2])
    stream = MixtureStream([ShardSource(str(tmp_path / "cut.tar"))], eval_transform(8), 0, shuffle_buffer=1)
    assert [caption for _, _, caption, _ in take(stream, 3)] == ["sample 0", "sample 1", "sample 2"]
    assert stream.skipped()["tar error"] >= 1


def test_a_slot_without_any_usable_sample_is_an_input_error(tmp_path):
    write_shard(tmp_path / "bad.tar", [s for s in dirty_samples(0) if "good" not in s["__key__"]])
    stream = MixtureStream([ShardSource(str(tmp_path / "bad.tar"))], eval_transform(8), 0)
    with pytest.raises(InputError, match=r"bad.tar\): the shards of loader slot 0 of 1 gave no usable sample"):
        take(stream, 1)


# --- determinism, resume, items ----------------------------------------------------------------------------------

def mixed_sources(tmp_path):
    return [ShardSource(caption_shards(tmp_path / "a", "alpha", 4, 5)),
            ShardSource(caption_shards(tmp_path / "b", "beta", 4, 5), 2.0),
            (caption_file(tmp_path / "c", "gamma", 8), 1.0)]


def same_items(first, second):
    return len(first) == len(second) and all(
        torch.equal(a[0], b[0]) and a[1:] == b[1:] for a, b in zip(first, second))


def test_same_seed_same_stream_and_start_step_changes_the_order(tmp_path):
    sources = mixed_sources(tmp_path)
    augment = train_transform(8, (0.3, 1.0), randaugment=False)  # random crops and flips: the per-sample seeds show

    def stream(**kwargs):
        return MixtureStream(sources, augment, kwargs.pop("seed", 3), text_input="a photo of", **kwargs)

    first = take(stream(), 60)
    assert same_items(first, take(stream(), 60))
    for changed in (stream(start_step=100), stream(seed=4)):
        other = take(changed, 60)
        assert [item[2] for item in other] != [item[2] for item in first]
    # The same sample comes augmented differently on another pass (its seed names the pass and the position).
    by_caption = {}
    for image, _, caption, _ in take(stream(), 300):
        by_caption.setdefault(caption, []).append(image)
    assert any(not torch.equal(images[0], images[1]) for images in by_caption.values() if len(images) > 1)

    batches = [[b for _, b in zip(range(6), stream_train_loader(stream(), 4, num_workers=2))] for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) and a[1:3] == b[1:3] and torch.equal(a[3], b[3]) for a, b in zip(*batches))


def test_items_have_the_caption_datasets_shape_and_types(tmp_path):
    sources = mixed_sources(tmp_path)
    dataset_item = sources[2][0][0]
    for image, text_input, text_output, item_id in take(MixtureStream(sources, eval_transform(8), 0,
                                                                      text_input="a photo of"), 30):
        assert image.shape == dataset_item[0].shape and image.dtype == dataset_item[0].dtype
        assert isinstance(text_output, str) and type(item_id) is int and 0 <= item_id < 2 ** 62
        word, *numbers = text_output.split()
        if word == "gamma":  # the dataset's own text_input (its prompt), its image id renamed for source 2
            assert text_input == "" and item_id == image_id(2, int(numbers[0]))
        else:
            assert text_input == "a photo of"
            source = 0 if word == "alpha" else 1
            assert item_id == image_id(source, f"{int(numbers[0]):05d}{int(numbers[1]):04d}")
    batch = next(iter(stream_train_loader(MixtureStream(sources, eval_transform(8), 0), 5)))
    assert batch[0].shape == (5, 3, 8, 8) and batch[3].dtype == torch.int64 and len(batch[2]) == 5


# --- the demo shards ---------------------------------------------------------------------------------------------

def test_demo_shards_hold_the_caption_training_pairs(demo_data):
    pairs = json.loads((demo_data / "coco_karpathy_train.json").read_text())
    shards = sorted((demo_data / "shards").glob("*.tar"))
    assert [s.name for s in shards] == [f"caption_train-{n:06d}.tar" for n in range(8)]  # 2 processes x 2 workers
    read = []
    for shard in shards:  # read with the tarfile module, apart from webdataset
        with tarfile.open(shard) as tar:
            files = {member.name: tar.extractfile(member).read() for member in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in files}):
            meta = json.loads(files[f"{key}.json"])
            assert files[f"{key}.png"] == (demo_data / meta["url"]).read_bytes()
            assert files[f"{key}.txt"].decode() == meta["caption"] and meta["key"] == key
            read.append({"image": meta["url"], "caption": meta["caption"]})
    assert read == [{"image": p["image"], "caption": p["caption"]} for p in pairs]

    # Through the stream: one pass of one slot gives the pairs CaptionDataset gives, captions of one image one id.
    dataset = CaptionDataset([CaptionSource(str(demo_data / "coco_karpathy_train.json"), str(demo_data))],
                             eval_transform(32))
    stream = MixtureStream([ShardSource(str(demo_data / "shards/caption_train-{000000..000007}.tar"))],
                           eval_transform(32), 0)
    items = take(stream, len(pairs))

    def groups(items):
        by_id = {}
        for image, _, caption, item_id in items:
            by_id.setdefault(item_id, Counter())[(caption, image.numpy().tobytes())] += 1
        return sorted(sorted(c.items()) for c in by_id.values())

    assert groups(items) == groups(dataset[i] for i in range(len(dataset)))


def test_demo_visual_genome_style_file_mixes_with_the_shards(demo_data):
    entries = json.loads((demo_data / "vg_style_train.json").read_text())
    train_images = {p["image"] for p in json.loads((demo_data / "coco_karpathy_train.json").read_text())}
    assert entries and all(set(e) == {"image", "caption"} and e["image"] in train_images for e in entries)
    vocab = set((demo_data / "tokenizer/vocab.txt").read_text().split())
    assert {w for e in entries for w in re.findall(r"\w+|[^\w\s]", e["caption"].lower())} <= vocab
    vg = CaptionDataset([CaptionSource(str(demo_data / "vg_style_train.json"), str(demo_data))], eval_transform(32))
    stream = MixtureStream([ShardSource(str(demo_data / "shards/caption_train-{000000..000007}.tar")), (vg, 1.0)],
                           eval_transform(32), 0)
    captions = Counter(caption for _, _, caption, _ in take(stream, 100))
    shard_captions = {pre_caption(c) for c in (p["caption"] for p in json.loads(
        (demo_data / "coco_karpathy_train.json").read_text()))}
    vg_captions = {pre_caption(e["caption"]) for e in entries}
    assert set(captions) <= shard_captions | vg_captions
    assert set(captions) & (vg_captions - shard_captions) and set(captions) & (shard_captions - vg_captions)
