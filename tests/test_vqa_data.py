"""data/vqa.py: every question layout read into question dicts, the errors on bad files, question cleaning, the
evaluation and training datasets; and the demo data's VQA splits, checked against the scenes."""

import json
import re
from collections import Counter

import pytest
import torch
from PIL import Image

from data import synthetic
from data.transforms import eval_transform
from data.vqa import VQAEvalDataset, VQASplitConfig, VQATrainDataset, pre_question, read_vqa_split
from eval_vqa import normalize_answer, question_type_baseline, vqa_scores
from utils import InputError


def images(root, *names):
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(path, format="PNG")


def write(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def answer_records(*answers):
    return [{"answer": a, "answer_confidence": "yes", "answer_id": n} for n, a in enumerate(answers, 1)]


def official_files(tmp_path, data_subtype="val2014"):
    questions = write(tmp_path / "questions.json", {"data_subtype": data_subtype, "questions": [
        {"image_id": 391895, "question": "What is he riding?", "question_id": 391895000},
        {"image_id": 7, "question": "Is it raining?", "question_id": 7001}]})
    annotations = write(tmp_path / "annotations.json", {"annotations": [
        {"question_id": 7001, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": answer_records(*["no"] * 9, "yes")},
        {"question_id": 391895000, "image_id": 391895, "question_type": "what is", "answer_type": "other",
         "multiple_choice_answer": "bike", "answers": answer_records(*["bike"] * 6, *["bicycle"] * 4)}]})
    return questions, annotations


# --- layouts -----------------------------------------------------------------------------------------------------

def test_official_layout_with_annotations(tmp_path):
    questions, annotations = official_files(tmp_path)
    read = read_vqa_split(VQASplitConfig(questions, annotations, image_root="/coco"))
    assert read == [
        {"question_id": 391895000, "image": "/coco/val2014/COCO_val2014_000000391895.jpg",
         "question": "What is he riding?", "answers": ["bike"] * 6 + ["bicycle"] * 4, "answer_type": "other",
         "question_type": "what is"},
        {"question_id": 7001, "image": "/coco/val2014/COCO_val2014_000000000007.jpg", "question": "Is it raining?",
         "answers": ["no"] * 9 + ["yes"], "answer_type": "yes/no", "question_type": "is it"}]


def test_official_layout_without_annotations_and_test_dev_images(tmp_path):
    questions, _ = official_files(tmp_path, "test-dev2015")
    read = read_vqa_split(VQASplitConfig(questions, image_root="coco"))
    assert [q["image"] for q in read] == ["coco/test2015/COCO_test2015_000000391895.jpg",
                                          "coco/test2015/COCO_test2015_000000000007.jpg"]
    assert all(q["answers"] == [] and q["answer_type"] == q["question_type"] == "" for q in read)


def test_image_template_overrides_the_coco_naming(tmp_path):
    questions, _ = official_files(tmp_path)
    read = read_vqa_split(VQASplitConfig(questions, image_root="r", image_template="img/{image_id:08d}.png"))
    assert [q["image"] for q in read] == ["r/img/00391895.png", "r/img/00000007.png"]


def test_lavis_layout(tmp_path):
    train = write(tmp_path / "vqa_train.json", [
        {"image": "train2014/a.jpg", "question": "What color?", "question_id": 5, "answer": ["red", "red", "Red"],
         "dataset": "vqa"},
        {"image": "train2014/b.jpg", "question": "How many?", "question_id": 6, "answer": ["2"]}])
    assert read_vqa_split(VQASplitConfig(train, image_root="coco")) == [
        {"question_id": 5, "image": "coco/train2014/a.jpg", "question": "What color?", "answers": ["red", "red", "Red"],
         "answer_type": "", "question_type": ""},
        {"question_id": 6, "image": "coco/train2014/b.jpg", "question": "How many?", "answers": ["2"],
         "answer_type": "", "question_type": ""}]
    test = write(tmp_path / "vqa_test.json", [{"image": "test2015/c.jpg", "question": "Why?", "question_id": 9}])
    assert read_vqa_split(VQASplitConfig(test))[0]["answers"] == []


def test_lavis_layout_takes_answers_and_types_from_the_annotations(tmp_path):
    _, annotations = official_files(tmp_path)
    val = write(tmp_path / "vqa_val_eval.json", [
        {"image": "val2014/x.jpg", "question": "Is it raining?", "question_id": 7001, "answer": ["no"]},
        {"image": "val2014/y.jpg", "question": "What is he riding?", "question_id": 391895000}])
    read = read_vqa_split(VQASplitConfig(val, annotations))
    assert [(q["answers"], q["answer_type"], q["question_type"]) for q in read] == [
        (["no"] * 9 + ["yes"], "yes/no", "is it"), (["bike"] * 6 + ["bicycle"] * 4, "other", "what is")]
    assert [q["image"] for q in read] == ["./val2014/x.jpg", "./val2014/y.jpg"]


def test_gqa_layouts(tmp_path):
    official = write(tmp_path / "testdev_balanced_questions.json", {
        "20968295": {"imageId": "n161313", "question": "Is the sky blue?", "answer": "yes", "fullAnswer": "Yes.",
                     "types": {"structural": "verify"}},
        "201307251": {"imageId": "n15740", "question": "What is on the table?", "answer": "cup"}})
    assert read_vqa_split(VQASplitConfig(official, image_root="gqa/images")) == [
        {"question_id": "20968295", "image": "gqa/images/n161313.jpg", "question": "Is the sky blue?",
         "answers": ["yes"], "answer_type": "", "question_type": ""},
        {"question_id": "201307251", "image": "gqa/images/n15740.jpg", "question": "What is on the table?",
         "answers": ["cup"], "answer_type": "", "question_type": ""}]
    read = read_vqa_split(VQASplitConfig(official, image_template="{image_id}.png"))
    assert read[0]["image"] == "./n161313.png"
    lavis = write(tmp_path / "gqa_lavis.json", [
        {"image": "n161313.jpg", "question": "Is the sky blue?", "answer": "yes", "question_id": "20968295"},
        {"image": "n15740.jpg", "question": "What is on the table?", "answer": "cup", "question_id": 201307251}])
    read = read_vqa_split(VQASplitConfig(lavis, image_root="gqa/images"))
    assert [(q["question_id"], q["image"], q["answers"]) for q in read] == [
        ("20968295", "gqa/images/n161313.jpg", ["yes"]), (201307251, "gqa/images/n15740.jpg", ["cup"])]


# --- bad files ---------------------------------------------------------------------------------------------------

QUESTION = {"image_id": 1, "question": "q?", "question_id": 10}


@pytest.mark.parametrize("entry, message", [
    ("text", r"questions.json: questions\[1\]: expected an object with image_id, question, question_id"),
    ({"question": "q", "question_id": 11}, r"questions.json: questions\[1\]: missing field 'image_id'"),
    ({"image_id": "1", "question": "q", "question_id": 11}, r"questions\[1\]: 'image_id' must be of type int"),
    ({"image_id": 1, "question": "q", "question_id": True}, r"questions\[1\]: 'question_id' must be of type int"),
    ({"image_id": 1, "question": None, "question_id": 11}, r"questions\[1\]: 'question' must be of type str"),
    ({"image_id": 2, "question": "q", "question_id": 10},
     r"questions\[1\]: question_id 10 is already used by .*questions.json: questions\[0\]"),
])
def test_bad_official_questions_name_file_index_and_field(tmp_path, entry, message):
    path = write(tmp_path / "questions.json", {"data_subtype": "val2014", "questions": [QUESTION, entry]})
    with pytest.raises(InputError, match=message):
        read_vqa_split(VQASplitConfig(path))


ANNOTATION = {"question_id": 10, "image_id": 1, "question_type": "what", "answer_type": "other",
              "answers": answer_records("a", "b")}


@pytest.mark.parametrize("change, message", [
    ({"answer_type": 3}, r"annotations.json: annotations\[0\]: 'answer_type' must be of type str"),
    ({"answers": []}, r"annotations.json: annotations\[0\]: 'answers' is empty"),
    ({"answers": [{"answer": "a"}, {"text": "b"}]}, r"annotations\[0\].answers\[1\]: missing field 'answer'"),
    ({"question_id": 11}, r"disagree: 1 questions have no annotation \(e.g. ids \[10\]\), 1 annotations no question "
                          r"\(e.g. ids \[11\]\)"),
    ({"image_id": 2}, "disagree on the image of question 10: image_id 1 vs 2"),
])
def test_bad_annotations_name_file_index_and_field(tmp_path, change, message):
    questions = write(tmp_path / "questions.json", {"data_subtype": "val2014", "questions": [QUESTION]})
    annotations = write(tmp_path / "annotations.json", {"annotations": [{**ANNOTATION, **change}]})
    with pytest.raises(InputError, match=message):
        read_vqa_split(VQASplitConfig(questions, annotations))


@pytest.mark.parametrize("entry, message", [
    ({"question": "q", "question_id": 2}, r"lavis.json\[1\]: missing field 'image'"),
    ({"image": "b.jpg", "question": "q", "question_id": "2"}, r"lavis.json\[1\]: 'question_id' must be of type int"),
    ({"image": "b.jpg", "question": "q", "question_id": 2, "answer": []}, r"lavis.json\[1\]: 'answer' must be a "
                                                                          "non-empty list of strings"),
    ({"image": "b.jpg", "question": "q", "question_id": 2, "answer": "x"}, r"lavis.json\[1\]: 'answer' must be"),
    ({"image": "b.jpg", "question": "q", "question_id": 1}, r"lavis.json\[1\]: question_id 1 is already used"),
])
def test_bad_lavis_entries_name_file_index_and_field(tmp_path, entry, message):
    path = write(tmp_path / "lavis.json", [{"image": "a.jpg", "question": "q", "question_id": 1, "answer": ["a"]},
                                           entry])
    with pytest.raises(InputError, match=message):
        read_vqa_split(VQASplitConfig(path))


def test_bad_gqa_entries_name_file_question_and_field(tmp_path):
    official = write(tmp_path / "gqa.json", {"1": {"imageId": "n1", "question": "q", "answer": "a"},
                                             "2": {"imageId": "n2", "question": "q"}})
    with pytest.raises(InputError, match=r"gqa.json: question '2': missing field 'answer'"):
        read_vqa_split(VQASplitConfig(official))
    lavis = write(tmp_path / "gqa_lavis.json", [{"image": "a", "question": "q", "answer": "a", "question_id": "1"},
                                                {"image": "b", "question": "q", "answer": ["a"], "question_id": "2"}])
    with pytest.raises(InputError, match=r"gqa_lavis.json\[1\]: 'answer' must be of type str"):
        read_vqa_split(VQASplitConfig(lavis))
    lavis = write(tmp_path / "gqa_lavis.json", [{"image": "a", "question": "q", "answer": "a", "question_id": 1.0}])
    with pytest.raises(InputError, match=r"gqa_lavis.json\[0\]: 'question_id' must be of type str or int"):
        read_vqa_split(VQASplitConfig(lavis))


@pytest.mark.parametrize("content, message", [
    (3, "unknown VQA questions layout"),
    ({"info": {}}, "unknown VQA questions layout"),
    ({"annotations": []}, "is a VQA annotations file; give it as the split's annotations"),
    ([], "has no questions"),
    ({"data_subtype": "val2014", "questions": {}}, "'questions' must be a list"),
    ({"questions": [QUESTION]}, "has no 'data_subtype'.*set the split's image_template"),
])
def test_unknown_layouts_and_empty_files_are_refused(tmp_path, content, message):
    with pytest.raises(InputError, match=message):
        read_vqa_split(VQASplitConfig(write(tmp_path / "q.json", content)))


def test_options_that_do_not_apply_are_refused(tmp_path):
    lavis = write(tmp_path / "lavis.json", [{"image": "a.jpg", "question": "q", "question_id": 1}])
    with pytest.raises(InputError, match="image_template .* does not apply: leave it out"):
        read_vqa_split(VQASplitConfig(lavis, image_template="{image_id}.jpg"))
    gqa = write(tmp_path / "gqa.json", {"1": {"imageId": "n1", "question": "q", "answer": "a"}})
    with pytest.raises(InputError, match="GQA questions file.*annotations .* are for VQAv2 / OK-VQA"):
        read_vqa_split(VQASplitConfig(gqa, annotations=str(tmp_path / "annotations.json")))
    with pytest.raises(InputError, match=r"image_template '\{image_id:d\}' cannot name image 'n1' \(ValueError"):
        read_vqa_split(VQASplitConfig(gqa, image_template="{image_id:d}"))
    questions = write(tmp_path / "questions.json", {"data_subtype": "val2014", "questions": [QUESTION]})
    with pytest.raises(InputError, match=r"questions\[0\]: image_template '\{imageId\}' cannot name image 1"):
        read_vqa_split(VQASplitConfig(questions, image_template="{imageId}"))
    with pytest.raises(InputError, match="VQA questions file .*missing.json does not exist"):
        read_vqa_split(VQASplitConfig(str(tmp_path / "missing.json")))


# --- cleaning and datasets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("question, cleaned", [
    ('What is "this"? (A Dog.)', "what is this? a dog"),
    ("How many: ~3~ #tags; *stars*!  ", "how many 3 tags stars"),
    ("Is it a-ok, or not?", "is it a-ok, or not?"),
    ("one  two", "one  two"),  # LAVIS splits on single spaces: runs of spaces stay
])
def test_pre_question_is_lavis_blip_question(question, cleaned):
    assert pre_question(question) == cleaned


def test_pre_question_keeps_max_words():
    assert pre_question("a b c d e", max_words=3) == "a b c"
    assert pre_question("a  b c", max_words=2) == "a "  # the empty word between the two spaces counts


def lavis_split(tmp_path, entries):
    return read_vqa_split(VQASplitConfig(write(tmp_path / "split.json", entries), image_root=str(tmp_path)))


def test_eval_dataset_items_and_attributes(tmp_path):
    images(tmp_path, "a.png", "b.png")
    questions = lavis_split(tmp_path, [
        {"image": "a.png", "question": "What color is it?", "question_id": 3, "answer": ["red"] * 10},
        {"image": "b.png", "question": "Is it (round)?", "question_id": 1},
        {"image": "a.png", "question": "How many.", "question_id": 2, "answer": ["2", "two"]}])
    dataset = VQAEvalDataset(questions, eval_transform(8))
    assert len(dataset) == 3 and dataset.question_ids == [3, 1, 2]
    assert dataset.questions == ["what color is it?", "is it round?", "how many"]
    assert dataset.answers == [["red"] * 10, [], ["2", "two"]]
    assert dataset.answer_types == dataset.question_types == ["", "", ""]
    image, index = dataset[1]
    assert index == 1 and torch.equal(image, eval_transform(8)(Image.open(tmp_path / "b.png").convert("RGB")))


def test_eval_dataset_checks_every_image(tmp_path):
    images(tmp_path, "a.png")
    cfg = VQASplitConfig(write(tmp_path / "split.json", [{"image": "a.png", "question": "q", "question_id": 1},
                                                         {"image": "gone.png", "question": "q", "question_id": 2}]),
                         image_root=str(tmp_path))
    with pytest.raises(InputError) as err:
        VQAEvalDataset(read_vqa_split(cfg), None, source=cfg)
    assert "split.json: 1 of 2 images are missing or unreadable" in str(err.value)
    assert "gone.png (missing)" in str(err.value) and "an evaluation set must be complete" in str(err.value)
    with pytest.raises(InputError, match="at least one question"):
        VQAEvalDataset([], None)


def test_train_dataset_prompt_and_image_indices(tmp_path):
    images(tmp_path, "a.png", "b.png")
    questions = lavis_split(tmp_path, [
        {"image": "b.png", "question": "What (color)?", "question_id": 1, "answer": ["red"]},
        {"image": "a.png", "question": "Is it round?", "question_id": 2, "answer": ["yes"]},
        {"image": "b.png", "question": "Where?", "question_id": 3, "answer": ["left"]}])
    dataset = VQATrainDataset(questions, eval_transform(8))
    assert dataset.text_inputs == ["Question: what color? Short answer:", "Question: is it round? Short answer:",
                                   "Question: where? Short answer:"]
    assert dataset.image_indices == [0, 1, 0] and dataset.num_images == 2
    image, text_input, text_output, image_index = dataset[1]
    assert (text_input, text_output, image_index) == ("Question: is it round? Short answer:", "yes", 1)
    assert image.shape == (3, 8, 8)
    assert VQATrainDataset(questions, None, prompt="Q: {} A:").text_inputs[0] == "Q: what color? A:"


def test_train_dataset_refuses_unanswered_questions_and_bad_prompts(tmp_path):
    questions = lavis_split(tmp_path, [{"image": "a.png", "question": "q", "question_id": 1, "answer": ["a"]},
                                       {"image": "a.png", "question": "q", "question_id": 2}])
    with pytest.raises(InputError, match=r"1 of 2 training questions have no answers \(e.g. ids \[2\]\)"):
        VQATrainDataset(questions, None)
    for prompt in ("Question: Short answer:", "{} and {}", "{question}", "Question: {"):
        with pytest.raises(InputError, match="VQA prompt"):
            VQATrainDataset(questions[:1], None, prompt=prompt)


def test_train_answer_is_uniform_over_distinct_answers_and_seeded(tmp_path):
    images(tmp_path, "a.png")
    answers = ["cat"] * 7 + ["dog", "Cat", "dog"]  # distinct: cat, dog, Cat
    questions = lavis_split(tmp_path, [{"image": "a.png", "question": "q", "question_id": 1, "answer": answers}])
    dataset = VQATrainDataset(questions, lambda image: torch.zeros(1))

    def draws(seed, n):
        torch.manual_seed(seed)
        return [dataset[0][2] for _ in range(n)]

    counts = Counter(draws(0, 3000))
    assert set(counts) == {"cat", "dog", "Cat"}
    assert all(abs(count / 3000 - 1 / 3) < 0.04 for count in counts.values()), counts  # not 0.7 / 0.2 / 0.1
    assert draws(5, 50) == draws(5, 50)
    assert draws(5, 50) != draws(6, 50)


# --- the demo data -----------------------------------------------------------------------------------------------

def demo_split(data_dir, split):
    annotations = None if split == "test" else str(data_dir / f"vqa_{split}_annotations.json")
    return VQASplitConfig(str(data_dir / f"vqa_{split}_questions.json"), annotations, str(data_dir),
                          f"images/caption_{split}/synthetic_{{image_id:012d}}.png")


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_demo_splits_read_back_with_their_images(demo_data, split):
    cfg = demo_split(demo_data, split)
    questions = read_vqa_split(cfg)
    num_images = {"train": 24, "val": 8, "test": 8}[split]
    assert len(questions) == 3 * num_images
    assert len({q["image"] for q in questions}) == num_images
    if split == "test":
        assert all(q["answers"] == [] and q["answer_type"] == "" for q in questions)
    else:
        assert all(len(q["answers"]) == 10 for q in questions)
        assert {q["answer_type"] for q in questions} <= {"yes/no", "number", "other"}
        assert all(q["question_type"] for q in questions)
    dataset = VQAEvalDataset(questions, eval_transform(32), source=cfg)  # every image exists and opens
    assert dataset[0][0].shape == (3, 32, 32)


def scene_answer(question, scene):
    """The answer to a demo question read from the scene's objects, without the generator's code."""
    def cell(t):
        return ("top" if t["y"] < 0.5 else "bottom") + " " + ("left" if t["x"] < 0.5 else "right")

    def only(things):
        assert len(things) == 1, (question, scene)
        return things[0]

    if m := re.fullmatch(r"what color is the (\w+)(?: at the (\w+ \w+))?\?", question):
        return only([t for t in scene if t["shape"] == m[1] and m[2] in (None, cell(t))])["color"]
    if m := re.fullmatch(r"what shape is at the (\w+ \w+)\?", question):
        return only([t for t in scene if cell(t) == m[1]])["shape"]
    if m := re.fullmatch(r"how many (?:(\w+) )?shapes are there\?", question):
        return str(sum(m[1] in (None, t["color"]) for t in scene))
    if m := re.fullmatch(r"where is the (\w+) (\w+)\?", question):
        return cell(only([t for t in scene if (t["color"], t["shape"]) == (m[1], m[2])]))
    m = re.fullmatch(r"is there a (\w+) (\w+)\?", question)
    return "yes" if any((t["color"], t["shape"]) == (m[1], m[2]) for t in scene) else "no"


@pytest.fixture(scope="module")
def larger_demo(tmp_path_factory):
    """Demo data with 300 caption train images and 100 val, to measure the answers' statistics."""
    out = tmp_path_factory.mktemp("vqa_demo")
    synthetic.generate(str(out), seed=1, num_train=1, num_val=1, num_test=1, num_caption_train=300,
                       num_caption_val=100, num_caption_test=2)
    return out


@pytest.mark.parametrize("split", ["train", "val"])
def test_demo_answers_follow_from_the_scenes(larger_demo, split):
    scenes = json.loads((larger_demo / "scenes.json").read_text())
    annotations = {a["question_id"]: a for a in
                   json.loads((larger_demo / f"vqa_{split}_annotations.json").read_text())["annotations"]}
    questions = read_vqa_split(demo_split(larger_demo, split))
    majority = unanimous = disagreeing = 0
    for q in questions:
        truth = scene_answer(q["question"], scenes[str(q["image"]).removeprefix(str(larger_demo) + "/")])
        assert annotations[q["question_id"]]["multiple_choice_answer"] == truth
        normalized = Counter(normalize_answer(a) for a in q["answers"])
        majority += normalized.most_common(1)[0][0] == truth  # the truth, whatever the way it is written
        unanimous += len(set(q["answers"])) == 1
        disagreeing += normalized[truth] < 10
    assert majority > 0.98 * len(questions)
    assert unanimous > 0.05 * len(questions) and disagreeing > 0.3 * len(questions)
    truth = {q["question_id"]: annotations[q["question_id"]]["multiple_choice_answer"] for q in questions}
    assert vqa_scores(truth, questions)["accuracy"] > 98


def test_demo_questions_alone_do_not_give_the_answer(larger_demo):
    train = read_vqa_split(demo_split(larger_demo, "train"))
    val = read_vqa_split(demo_split(larger_demo, "val"))
    assert {q["question_type"] for q in train} == {"what color is the", "what", "how many", "where is the",
                                                    "is there a"}
    presence = Counter(Counter(q["answers"]).most_common(1)[0][0] for q in train if q["answer_type"] == "yes/no")
    assert 0.35 < presence["yes"] / sum(presence.values()) < 0.65, presence
    scores = vqa_scores(question_type_baseline(train, val), val)
    assert scores["accuracy"] < 50 and scores["yes/no"] < 70, scores


def test_demo_vqa_files_are_deterministic_and_leave_the_others_alone(tmp_path):
    sizes = dict(num_train=2, num_val=1, num_test=1, num_caption_train=5, num_caption_val=3, num_caption_test=3)
    synthetic.generate(str(tmp_path / "a"), seed=3, **sizes)
    synthetic.generate(str(tmp_path / "b"), seed=3, **sizes)
    synthetic.generate(str(tmp_path / "c"), seed=3, questions_per_image=1, **sizes)
    vqa = ["vqa_train_questions.json", "vqa_val_questions.json", "vqa_test_questions.json",
           "vqa_train_annotations.json", "vqa_val_annotations.json"]
    assert not (tmp_path / "a" / "vqa_test_annotations.json").exists()
    for name in vqa:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    # the vocabulary covers the VQA words too: it may change with them
    others = [p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
              and p.name not in vqa + ["vocab.txt"]]
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "c" / p).read_bytes() for p in others)
    assert len(json.loads((tmp_path / "c" / "vqa_val_questions.json").read_text())["questions"]) == 3
