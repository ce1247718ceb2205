import json
import re
from collections import defaultdict

import pytest
import torch
from PIL import Image
from torchvision import transforms

from data import synthetic
from data.caption import (CAPTION_INSTRUCTIONS, CaptionDataConfig, CaptionDataset, CaptionSource, RetrievalDataset,
                          VQASplitConfig, caption_train_set)
from data.transforms import eval_transform, train_transform
from data.utils import pre_caption
from models.tokenizer import init_tokenizer
from utils import InputError


def images(root, *names):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(path)


def write(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def test_train_transform_flips_only_when_asked():
    def steps(**kwargs):
        return [type(step) for step in train_transform(32, **kwargs).transforms]

    assert transforms.RandomHorizontalFlip in steps()
    assert transforms.RandomHorizontalFlip not in steps(hflip=False)
    assert transforms.RandomHorizontalFlip not in steps(hflip=False, randaugment=False)


# --- CaptionDataset ----------------------------------------------------------------------------------------------

def test_formats_load_with_one_id_per_image_and_source(tmp_path):
    images(tmp_path, "coco/a.png", "coco/b.png", "vg/b.png", "vg/c.png", "own/d.png")
    coco = write(tmp_path / "coco_karpathy_train.json", [
        {"image": "a.png", "caption": "A dog (running)!", "image_id": "coco_1"},
        {"image": "b.png", "caption": "a cat", "image_id": "coco_2"},
        {"image": "a.png", "caption": "Another dog.", "image_id": "coco_1"}])
    vg = write(tmp_path / "vg_caption.json", [{"image": "b.png", "caption": "x"}, {"image": "c.png", "caption": "y"},
                                              {"image": "b.png", "caption": "z"}])
    own = tmp_path / "own.jsonl"
    own.write_text('{"image": "d.png", "caption": "same raw id as coco", "image_id": "coco_1"}\n\n'
                   '{"image": "d.png", "caption": "an integer id", "image_id": 7}\n')
    dataset = CaptionDataset([CaptionSource(coco, str(tmp_path / "coco")), CaptionSource(vg, str(tmp_path / "vg")),
                              CaptionSource(str(own), str(tmp_path / "own"))], eval_transform(8))

    assert [(e["caption"], e["image_id"]) for e in dataset.entries] == [
        ("a dog running", 0), ("a cat", 1), ("another dog", 0), ("x", 2), ("y", 3), ("z", 2),
        ("same raw id as coco", 4), ("an integer id", 5)]
    assert dataset.num_images == 6 and len(dataset) == 8
    image, text_input, caption, image_id = dataset[3]
    assert (text_input, caption, image_id) == ("", "x", 2)
    assert torch.equal(image, eval_transform(8)(Image.open(tmp_path / "vg/b.png")))


def test_text_pairs_prompts_instructions_and_the_prefix_lm_split(tmp_path):
    images(tmp_path, "a.png", "b.png")
    captions = write(tmp_path / "captions.json", [{"image": "a.png", "caption": "A red circle at the top left."}])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"image": "b.png", "text_input": " What colour is the circle? ", "text_output": "Red."}\n')
    source, pair_source = CaptionSource(str(captions), str(tmp_path)), CaptionSource(str(pairs), str(tmp_path))
    prompted = CaptionDataset([source, pair_source], None, prompt="a photo of")
    assert [prompted.texts(i) for i in range(2)] == [("a photo of", "a red circle at the top left", 0),
                                                    ("a photo of What colour is the circle?", "red", 1)]
    templates = CaptionDataset([CaptionSource(str(captions), str(tmp_path), instructions="lavis")], None)
    drawn = set()
    for seed in range(60):
        torch.manual_seed(seed)
        text_input, caption, _ = templates.texts(0)
        drawn.add(text_input)
        assert caption == "a red circle at the top left"
    assert drawn == {t.lower() for t in CAPTION_INSTRUCTIONS}  # all 14, lower-cased as LAVIS's processor

    split = CaptionDataset([source], None, prefix_lm=True)
    words, cuts = "a red circle at the top left".split(), set()
    for seed in range(80):
        torch.manual_seed(seed)
        text_input, text_output, _ = split.texts(0)
        prefix = text_input.split() if text_input else []
        assert prefix + text_output.split() == words and text_output  # a prefix and a non-empty rest
        cuts.add(len(prefix))
    assert cuts == set(range(len(words)))


def test_training_sets_mix_caption_files_and_vqa_splits(demo_data):
    vqa = VQASplitConfig(str(demo_data / "vqa_train_questions.json"), str(demo_data / "vqa_train_annotations.json"),
                         str(demo_data), "images/caption_train/synthetic_{image_id:012d}.png")
    cfg = CaptionDataConfig(train=[CaptionSource(str(demo_data / "coco_karpathy_train.json"), str(demo_data)), vqa],
                            val_file="val.json", num_workers=0)
    dataset = caption_train_set(cfg, 32, prompt="a photo of")
    captions, questions = dataset.datasets
    assert len(dataset) == len(captions) + len(questions) and len(questions) == 3 * 24
    _, text_input, answer, _ = dataset[len(captions)]
    assert text_input.startswith("Question: ") and text_input.endswith(" Short answer:") and answer
    assert dataset[0][1] == "a photo of"


def test_captions_are_cut_to_max_words(tmp_path):
    images(tmp_path, "0.png")
    ann = write(tmp_path / "ann.json", [{"image": "0.png", "caption": "One, two: three four five."}])
    dataset = CaptionDataset([CaptionSource(ann, str(tmp_path))], None, max_words=3)
    assert dataset.entries[0]["caption"] == "one, two three"


@pytest.mark.parametrize("entry, message", [
    ("just a string", "ann.json[1]: expected an object with image, caption"),
    ({"caption": "c"}, "ann.json[1]: missing field 'image'"),
    ({"image": "0.png"}, "ann.json[1]: missing field 'caption'"),
    ({"image": 3, "caption": "c"}, "ann.json[1]: 'image' must be an image path"),
    ({"image": "0.png", "caption": ["c"]}, "ann.json[1]: 'caption' must be a string"),
    ({"image": "0.png", "caption": "c", "image_id": 1.5}, "ann.json[1]: 'image_id' must be a string or an integer"),
])
def test_bad_entries_name_file_and_index(tmp_path, entry, message):
    images(tmp_path, "0.png")
    ann = write(tmp_path / "ann.json", [{"image": "0.png", "caption": "good"}, entry])
    with pytest.raises(InputError) as err:
        CaptionDataset([CaptionSource(ann, str(tmp_path))], None)
    assert message in str(err.value)


def test_bad_jsonl_names_the_line(tmp_path):
    images(tmp_path, "0.png")
    good = '{"image": "0.png", "caption": "c"}'
    (tmp_path / "fields.jsonl").write_text(f'{good}\n\n{{"image": "0.png"}}\n')
    (tmp_path / "broken.jsonl").write_text(f"{good}\n{{\n")
    with pytest.raises(InputError, match=r"fields.jsonl line 3: missing field 'caption'"):
        CaptionDataset([CaptionSource(str(tmp_path / "fields.jsonl"), str(tmp_path))], None)
    with pytest.raises(InputError, match=r"broken.jsonl line 2 is not valid JSON"):
        CaptionDataset([CaptionSource(str(tmp_path / "broken.jsonl"), str(tmp_path))], None)
    with pytest.raises(InputError, match="none.jsonl does not exist"):
        CaptionDataset([CaptionSource(str(tmp_path / "none.jsonl"), str(tmp_path))], None)


def test_missing_images_fail_together_or_are_skipped(tmp_path, capsys):
    images(tmp_path, "0.png", "1.png")
    (tmp_path / "corrupt.png").write_bytes(b"not an image")
    ann = write(tmp_path / "ann.json", [{"image": "gone.png", "caption": "a"}, {"image": "0.png", "caption": "b"},
                                        {"image": "corrupt.png", "caption": "c"}, {"image": "1.png", "caption": "d"},
                                        {"image": "gone.png", "caption": "e"}])
    with pytest.raises(InputError) as err:
        CaptionDataset([CaptionSource(ann, str(tmp_path))], None)
    message = str(err.value)
    assert "ann.json: 2 of 4 images are missing or unreadable" in message
    assert "corrupt.png (unreadable" in message and "gone.png (missing)" in message
    assert "data.skip_missing_images: true" in message

    dataset = CaptionDataset([CaptionSource(ann, str(tmp_path))], None, skip_missing_images=True)
    assert [(e["caption"], e["image_id"]) for e in dataset.entries] == [("b", 0), ("d", 1)]
    assert dataset.num_images == 2
    assert "skipping 3 of 5 examples" in capsys.readouterr().out


def test_a_source_with_nothing_usable_is_an_error(tmp_path):
    images(tmp_path, "0.png")
    good = write(tmp_path / "good.json", [{"image": "0.png", "caption": "a"}])
    gone = write(tmp_path / "gone.json", [{"image": "gone.png", "caption": "a"}])
    with pytest.raises(InputError, match="gone.json has no usable examples"):
        CaptionDataset([CaptionSource(good, str(tmp_path)), CaptionSource(gone, str(tmp_path))], None,
                       skip_missing_images=True)
    with pytest.raises(InputError, match="empty.json has no usable examples"):
        CaptionDataset([CaptionSource(write(tmp_path / "empty.json", []), str(tmp_path))], None)
    with pytest.raises(InputError, match="at least one annotation file"):
        CaptionDataset([], None)


# --- RetrievalDataset --------------------------------------------------------------------------------------------

EVAL_ENTRIES = [
    {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["A man (riding).", "Two; words", "x"]},
    {"image": "1000092795.jpg", "caption": "A single string caption!"},
    {"image": "photo_ab.png", "caption": ["no number in the name"]},
    {"image": "other_5.png", "caption": ["an explicit id wins", "b"], "image_id": "given"},
]


def test_retrieval_index_maps_match_a_recomputation(tmp_path):
    images(tmp_path, *(e["image"] for e in EVAL_ENTRIES))
    dataset = RetrievalDataset(write(tmp_path / "test.json", EVAL_ENTRIES), str(tmp_path), eval_transform(8))
    per_image = [[pre_caption(c, 30) for c in ([e["caption"]] if isinstance(e["caption"], str) else e["caption"])]
                 for e in EVAL_ENTRIES]
    assert dataset.text == [caption for captions in per_image for caption in captions]
    assert [[dataset.text[t] for t in texts] for texts in dataset.img2txt] == per_image
    assert sorted(t for texts in dataset.img2txt for t in texts) == list(range(len(dataset.text)))
    assert all(t in dataset.img2txt[image] for t, image in enumerate(dataset.txt2img))
    assert dataset.image_ids == [391895, 1000092795, "photo_ab.png", "given"]
    assert dataset.image_paths[1] == str(tmp_path / "1000092795.jpg")
    assert len(dataset) == 4
    image, index = dataset[2]
    assert index == 2 and torch.equal(image, eval_transform(8)(Image.open(tmp_path / "photo_ab.png")))


def test_retrieval_cuts_captions_to_max_words(tmp_path):
    images(tmp_path, "a_1.png")
    dataset = RetrievalDataset(write(tmp_path / "t.json", [{"image": "a_1.png", "caption": ["one two three"]}]),
                               str(tmp_path), None, max_words=2)
    assert dataset.text == ["one two"]


@pytest.mark.parametrize("entry, message", [
    ({"image": "a_2.png", "caption": []}, "t.json[1]: 'caption' must be a string or a non-empty list of strings"),
    ({"image": "a_2.png", "caption": ["ok", 3]}, "t.json[1]: 'caption' must be a string or a non-empty list"),
    ({"image": "a_2.png"}, "t.json[1]: missing field 'caption'"),
    ({"image": "a_2.png", "caption": "c", "image_id": [2]}, "t.json[1]: 'image_id' must be a string or an integer"),
    ({"image": "b/a_1.png", "caption": "c"}, "t.json[0] and [1] have the same image id 1"),
    ([], "t.json[1]: expected an object"),
])
def test_bad_retrieval_entries(tmp_path, entry, message):
    images(tmp_path, "a_1.png", "a_2.png", "b/a_1.png")
    ann = write(tmp_path / "t.json", [{"image": "a_1.png", "caption": ["c"]}, entry])
    with pytest.raises(InputError) as err:
        RetrievalDataset(ann, str(tmp_path), None)
    assert message in str(err.value)


def test_retrieval_images_must_all_be_there(tmp_path):
    images(tmp_path, "a_1.png")
    ann = write(tmp_path / "t.json", [{"image": "a_1.png", "caption": "c"}, {"image": "gone_2.png", "caption": "c"}])
    with pytest.raises(InputError) as err:
        RetrievalDataset(ann, str(tmp_path), None)
    message = str(err.value)
    assert "t.json: 1 of 2 images are missing or unreadable" in message and "gone_2.png (missing)" in message
    assert "evaluation set must be complete" in message and "skip_missing_images: true" not in message
    with pytest.raises(InputError, match="empty.json has no examples"):
        RetrievalDataset(write(tmp_path / "empty.json", []), str(tmp_path), None)


# --- the synthetic caption splits --------------------------------------------------------------------------------

def file_bytes(root, *names):
    """Relative path -> content of the files and of the files under the folders `names`."""
    paths = [p for name in names for p in ([root / name] if (root / name).is_file() else (root / name).rglob("*"))]
    return {p.relative_to(root): p.read_bytes() for p in paths}


NLVR = ("nlvr_train.json", "nlvr_dev.json", "nlvr_test.json", "images/train", "images/dev", "images/test")


def test_caption_splits_leave_the_nlvr_files_unchanged(tmp_path):
    synthetic.generate(str(tmp_path / "a"), seed=2, num_train=3, num_val=2, num_test=2, num_caption_train=0,
                       num_caption_val=0, num_caption_test=0)
    synthetic.generate(str(tmp_path / "b"), seed=2, num_train=3, num_val=2, num_test=2, num_caption_train=5,
                       num_caption_val=3, num_caption_test=3, captions_per_train_image=3)
    assert file_bytes(tmp_path / "a", *NLVR) == file_bytes(tmp_path / "b", *NLVR)
    assert len(file_bytes(tmp_path / "a", *NLVR)) == 3 + 2 * 2 * (3 + 2 + 2)


def scene_cell(thing):
    """The cell a thing's centre lies in, as the captions name it."""
    return ("top" if thing["y"] < 0.5 else "bottom") + " " + ("left" if thing["x"] < 0.5 else "right")


MENTION = re.compile(r"(?P<color>red|green|blue|yellow) (?P<shape>circle|square|triangle)"
                     r"|(?P<cell>(?:top|bottom) (?:left|right))")


def described_things(caption):
    """The (colour, shape, cell) triples a caption states, read without the generator's templates: each
    colour-shape mention pairs with the cell named beside it, cells coming all after or all before their things."""
    mentions = list(MENTION.finditer(caption))
    things = [(m["color"], m["shape"]) for m in mentions if m["color"]]
    cells = [m["cell"] for m in mentions if m["cell"]]
    assert "".join("t" if m["color"] else "c" for m in mentions) in ("tc" * len(things), "ct" * len(things)), caption
    return [(color, shape, cell) for (color, shape), cell in zip(things, cells)]


def caption_files(demo_data):
    """[(image path, [captions])] over the three caption splits."""
    per_image = defaultdict(list)
    for entry in json.loads((demo_data / "coco_karpathy_train.json").read_text()):
        per_image[entry["image"]].append(entry["caption"])
    for split in ("val", "test"):
        for entry in json.loads((demo_data / f"coco_karpathy_{split}.json").read_text()):
            per_image[entry["image"]] += entry["caption"]
    return list(per_image.items())


def test_every_caption_names_every_thing_of_its_scene(demo_data):
    scenes = json.loads((demo_data / "scenes.json").read_text())
    counts = {"one shape": 1, "two shapes": 2, "three shapes": 3}
    for path, captions in caption_files(demo_data):
        scene = {(t["color"], t["shape"], scene_cell(t)) for t in scenes[path]}
        assert 1 <= len(scene) <= 3 and len({t[2] for t in scene}) == len(scene)
        for caption in captions:
            things = described_things(caption)
            assert len(things) == len(scene) and set(things) == scene, (caption, scene)
            count = re.match(r"(one shape|two shapes|three shapes):", caption)
            assert not count or counts[count[1]] == len(scene)


def test_caption_scenes_are_where_the_pixels_are(demo_data):
    scenes = json.loads((demo_data / "scenes.json").read_text())
    for path, _ in caption_files(demo_data):
        image = Image.open(demo_data / path).convert("RGB")
        for t in scenes[path]:
            centre = int(t["x"] * image.width), int(t["y"] * image.height)
            assert image.getpixel(centre) == synthetic.COLORS[t["color"]]
            # inside its cell: no nearer to a cell border (0, 1/2, 1) than its half-side, up to the rounding
            assert t["size"] <= min(abs(v - border) for v in (t["x"], t["y"]) for border in (0, 0.5, 1)) + 1e-3


@pytest.mark.parametrize("split", ["val", "test"])
def test_each_eval_caption_identifies_its_image(demo_data, split):
    scenes = json.loads((demo_data / "scenes.json").read_text())
    entries = json.loads((demo_data / f"coco_karpathy_{split}.json").read_text())
    assert len(entries) == 8 and all(len(e["caption"]) == 5 == len(set(e["caption"])) for e in entries)
    descriptions = [frozenset((t["color"], t["shape"], scene_cell(t)) for t in scenes[e["image"]]) for e in entries]
    assert len(set(descriptions)) == len(entries)


def file_id(path):
    return int(re.fullmatch(r"images/caption_(train|val|test)/synthetic_(\d{12})\.png", path)[2])


def test_image_ids_are_unique_over_the_caption_splits(demo_data):
    train = json.loads((demo_data / "coco_karpathy_train.json").read_text())
    assert len(train) == 2 * 24 and all(e["image_id"] == f"synthetic_{file_id(e['image'])}" for e in train)
    ids = [file_id(path) for path, _ in caption_files(demo_data)]
    assert len(ids) == len(set(ids)) == 24 + 8 + 8


@pytest.mark.parametrize("split", ["val", "test"])
def test_ground_truth_matches_the_eval_file(demo_data, split):
    entries = json.loads((demo_data / f"coco_karpathy_{split}.json").read_text())
    gt = json.loads((demo_data / f"coco_karpathy_{split}_gt.json").read_text())
    captions = defaultdict(list)
    for annotation in gt["annotations"]:
        captions[annotation["image_id"]].append(annotation["caption"])
    assert captions == {file_id(e["image"]): e["caption"] for e in entries}
    assert [image["id"] for image in gt["images"]] == [file_id(e["image"]) for e in entries]
    assert len({a["id"] for a in gt["annotations"]}) == len(gt["annotations"])
    dataset = RetrievalDataset(str(demo_data / f"coco_karpathy_{split}.json"), str(demo_data), eval_transform(32))
    assert dataset.image_ids == [image["id"] for image in gt["images"]]


def test_ground_truth_loads_in_pycocotools(demo_data):
    from pycocotools.coco import COCO

    coco = COCO(str(demo_data / "coco_karpathy_test_gt.json"))
    results = coco.loadRes([{"image_id": i, "caption": "a red circle"} for i in coco.getImgIds()])
    assert sorted(results.getImgIds()) == sorted(coco.getImgIds()) and len(coco.getAnnIds()) == 5 * 8


def test_the_datasets_read_the_synthetic_files(demo_data):
    train = CaptionDataset([CaptionSource(str(demo_data / "coco_karpathy_train.json"), str(demo_data))],
                           train_transform(32, hflip=False))
    assert len(train) == 48 and train.num_images == 24
    image, text_input, caption, image_id = train[5]
    assert image.shape == (3, 32, 32) and image_id == 2 and ":" not in caption and text_input == ""
    test = RetrievalDataset(str(demo_data / "coco_karpathy_test.json"), str(demo_data), eval_transform(32))
    assert len(test) == 8 and len(test.text) == 40


def test_vocabulary_covers_every_caption(demo_data):
    tokenizer = init_tokenizer(str(demo_data / "tokenizer"))
    for _, captions in caption_files(demo_data):
        for caption in captions:
            for text in (caption, pre_caption(caption)):
                tokens = tokenizer.tokenize(text)
                assert tokenizer.unk_token not in tokens and tokens
