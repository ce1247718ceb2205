import json
import re
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data import synthetic
from data.loader import ShardSampler, eval_loader
from data.nlvr import NLVRDataset, swap_left_right
from data.transforms import eval_transform
from data.utils import pre_caption
from models.tokenizer import init_tokenizer
from utils import InputError


@pytest.mark.parametrize("raw, max_words, expected", [
    ("A Dog (running) on the beach!", 50, "a dog running on the beach"),
    ('He said: "hi"; ok~ #tag *star*', 50, "he said hi ok tag star"),
    ("  two\t\tspaces\n\nand   newlines  ", 50, "two spaces and newlines"),
    ("keep, commas' and ? - / marks.", 50, "keep, commas' and ? - / marks"),
    ("one two three four five", 3, "one two three"),
])
def test_pre_caption(raw, max_words, expected):
    assert pre_caption(raw, max_words) == expected


def test_swap_left_right():
    assert swap_left_right("the left dog is right of the leftover") == "the right dog is left of the leftover"


def write_annotation(tmp_path, entries, name="ann.json"):
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def images(tmp_path, n):
    for i in range(n):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / f"{i}.png")


def test_train_swaps_images_and_words_eval_never(tmp_path):
    images(tmp_path, 2)
    ann = write_annotation(tmp_path, [{"images": ["0.png", "1.png"], "sentence": "The LEFT image is darker.",
                                       "label": "True"}])
    transform = eval_transform(8)
    train = NLVRDataset(str(ann), str(tmp_path), transform, train=True)
    evaluation = NLVRDataset(str(ann), str(tmp_path), transform, train=False)
    first, second = transform(Image.open(tmp_path / "0.png")), transform(Image.open(tmp_path / "1.png"))
    outcomes = Counter()
    torch.manual_seed(0)
    for _ in range(200):
        image0, image1, sentence, label = train[0]
        assert label == 1
        if torch.equal(image0, first):
            assert torch.equal(image1, second) and sentence == "the left image is darker"
            outcomes["kept"] += 1
        else:
            assert torch.equal(image0, second) and torch.equal(image1, first)
            assert sentence == "the right image is darker"
            outcomes["swapped"] += 1
    assert 70 < outcomes["swapped"] < 130
    for _ in range(20):
        image0, image1, sentence, _ = evaluation[0]
        assert torch.equal(image0, first) and sentence == "the left image is darker"


@pytest.mark.parametrize("entry, message", [
    ({"images": ["0.png", "1.png"], "sentence": "s", "label": "yes"},
     'ann.json[1]: \'label\' must be "True" or "False"'),
    ({"images": ["0.png", "1.png"], "sentence": "s", "label": 1}, "ann.json[1]: 'label' must be"),
    ({"images": ["0.png", "1.png"], "label": "True"}, "ann.json[1]: missing field 'sentence'"),
    ({"images": ["0.png"], "sentence": "s", "label": "True"}, "ann.json[1]: 'images' must be a list of two"),
    ("just a string", "ann.json[1]: expected an object"),
])
def test_bad_entries_name_file_and_index(tmp_path, entry, message):
    images(tmp_path, 2)
    good = {"images": ["0.png", "1.png"], "sentence": "s", "label": "False"}
    ann = write_annotation(tmp_path, [good, entry])
    with pytest.raises(InputError) as err:
        NLVRDataset(str(ann), str(tmp_path), eval_transform(8))
    assert message in str(err.value)


def test_bad_annotation_files(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        NLVRDataset(str(tmp_path / "none.json"), str(tmp_path), None)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(InputError, match="broken.json is not valid JSON"):
        NLVRDataset(str(tmp_path / "broken.json"), str(tmp_path), None)
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(InputError, match="must hold a JSON list"):
        NLVRDataset(str(tmp_path / "dict.json"), str(tmp_path), None)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(InputError, match="empty.json has no usable examples"):
        NLVRDataset(str(tmp_path / "empty.json"), str(tmp_path), None)


def test_missing_and_unreadable_images_fail_together_or_are_skipped(tmp_path, capsys):
    images(tmp_path, 4)
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    entries = [{"images": ["0.png", "1.png"], "sentence": "a", "label": "True"},
               {"images": ["2.png", "gone.png"], "sentence": "b", "label": "True"},
               {"images": ["corrupt.png", "3.png"], "sentence": "c", "label": "False"},
               {"images": ["gone.png", "0.png"], "sentence": "d", "label": "False"}]
    ann = write_annotation(tmp_path, entries)
    with pytest.raises(InputError) as err:
        NLVRDataset(str(ann), str(tmp_path), eval_transform(8))
    message = str(err.value)
    assert "2 of 6 images are missing or unreadable" in message
    assert "corrupt.png (unreadable" in message and "gone.png (missing)" in message
    assert "data.skip_missing_images: true" in message

    dataset = NLVRDataset(str(ann), str(tmp_path), eval_transform(8), skip_missing_images=True)
    assert [entry["sentence"] for entry in dataset.entries] == ["a"]
    assert "skipping 3 of 4 examples" in capsys.readouterr().out


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shard_sampler_covers_each_example_once(n, world_size):
    data = list(range(n))
    shards = [list(ShardSampler(data, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for shard in shards for i in shard) == data
    assert all(len(ShardSampler(data, r, world_size)) == len(shards[r]) for r in range(world_size))


def test_eval_loader_keeps_the_last_partial_batch(demo_data):
    dataset = NLVRDataset(str(demo_data / "nlvr_dev.json"), str(demo_data), eval_transform(32))
    loader = eval_loader(dataset, batch_size=4, num_workers=0)
    assert sum(len(batch[3]) for batch in loader) == len(dataset) == 10


# --- the synthetic generator -----------------------------------------------------------------------------------

def file_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


SMALL_CAPTIONS = dict(num_caption_train=6, num_caption_val=3, num_caption_test=3)


def test_generator_is_deterministic(tmp_path):
    synthetic.generate(str(tmp_path / "a"), seed=3, num_train=4, num_val=2, num_test=2, **SMALL_CAPTIONS)
    synthetic.generate(str(tmp_path / "b"), seed=3, num_train=4, num_val=2, num_test=2, **SMALL_CAPTIONS)
    synthetic.generate(str(tmp_path / "c"), seed=4, num_train=4, num_val=2, num_test=2, **SMALL_CAPTIONS)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b")
    assert file_bytes(tmp_path / "a") != file_bytes(tmp_path / "c")


def statement_holds(sentence, left, right):
    """The meaning of the demo statements, restated independently of the generator."""
    color = re.search(r"(red|green|blue|yellow)", sentence).group(1)
    in_left = any(t["color"] == color for t in left)
    in_right = any(t["color"] == color for t in right)
    if sentence.startswith("the left image"):
        return in_left
    if sentence.startswith("the right image"):
        return in_right
    if sentence.startswith("both images"):
        return in_left and in_right
    assert sentence.startswith("at least one image"), sentence
    return in_left or in_right


def colors_in_pixels(path):
    pixels = {tuple(p) for p in np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)}
    return {name for name, rgb in synthetic.COLORS.items() if rgb in pixels}


@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_labels_follow_from_the_scenes_and_pixels(demo_data, split):
    entries = json.loads((demo_data / f"nlvr_{split}.json").read_text())
    scenes = json.loads((demo_data / "scenes.json").read_text())
    for entry in entries:
        left, right = (scenes[p] for p in entry["images"])
        assert entry["label"] == str(statement_holds(entry["sentence"], left, right))
        for path in entry["images"]:
            assert colors_in_pixels(demo_data / path) == {t["color"] for t in scenes[path]}


def test_every_sentence_has_both_labels(demo_data):
    entries = json.loads((demo_data / "nlvr_train.json").read_text())
    labels = Counter()
    for entry in entries:
        labels[entry["sentence"], entry["label"]] += 1
    for sentence in {e["sentence"] for e in entries}:
        assert labels[sentence, "True"] == labels[sentence, "False"] > 0


def test_vocabulary_covers_every_sentence(demo_data):
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"))
    for split in ("train", "dev", "test"):
        for entry in json.loads((demo_data / f"nlvr_{split}.json").read_text()):
            tokens = tokenizer.tokenize(entry["sentence"])
            assert tokenizer.unk_token not in tokens and tokens
