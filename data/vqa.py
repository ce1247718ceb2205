"""Visual question answering data: the question files of VQAv2, OK-VQA and GQA in their official and LAVIS layouts,
read into one list of question dicts, and the evaluation and training datasets over them.

Every reader returns [{"question_id", "image" (full path), "question" (raw text), "answers" (list of str),
"answer_type", "question_type"}]: answers are the human answers (10 in VQAv2 and OK-VQA), GQA's single answer, or
[] for a split without answers (test-dev); the types are "" where the layout has none. The layout is told by
the content of the questions file:

    VQAv2 / OK-VQA official   questions {"data_subtype": "val2014", "questions": [{"image_id", "question",
                              "question_id"}]}, e.g. v2_OpenEnded_mscoco_val2014_questions.json (VQAv2),
                              OpenEnded_mscoco_val2014_questions.json (OK-VQA); answers and types from the optional
                              annotations {"annotations": [{"question_id", "image_id", "question_type",
                              "answer_type", "multiple_choice_answer", "answers": [{"answer", "answer_confidence",
                              "answer_id"}]}]}, e.g. v2_mscoco_val2014_annotations.json. Images by COCO's naming of
                              data_subtype, val2014/COCO_val2014_000000391895.jpg (test-dev2015 questions are on the
                              test2015 images), or by `image_template`.
    LAVIS VQAv2 / OK-VQA      [{"image", "question", "question_id", "answer": [human answers] (absent in test)}],
                              https://storage.googleapis.com/sfr-vision-language-research/datasets/vqa_train.json,
                              vqa_val.json, vqa_test.json and .../LAVIS/datasets/vqav2/vqa_val_eval.json. With the
                              official annotations file, answers and types come from it, as LAVIS scores against it.
    GQA official              {question_id: {"imageId", "question", "answer", ...}}, e.g. the GQA release's
                              testdev_balanced_questions.json; images {imageId}.jpg, or by `image_template`
    GQA LAVIS                 [{"image", "question", "answer": str, "question_id"}],
                              .../LAVIS/datasets/gqa/testdev_balanced_questions.json

`image_template` names an image by its id relative to `image_root`: "{image_id}" with an optional format spec, such
as "images/val/{image_id:012d}.png". Question ids are unique within a file; VQA's are integers, GQA's strings or
integers.
"""

import os
import re
import string
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch.utils.data import Dataset

from data.utils import check_image_files, load_image, read_json
from utils import Count, InputError, PositiveFloat, Workers, check_new_tokens

DEFAULT_PROMPT = "Question: {} Short answer:"  # BLIP-2's VQA prompt (LAVIS's blip2 VQA evaluation configs)


@dataclass
class VQAEvalConfig:
    """The `vqa:` section of stage-2 configs: how answers are generated and scored (eval_vqa.py, and stage 2's
    validation on data.vqa_val). The defaults are BLIP-2's zero-shot VQA settings (LAVIS's blip2 VQA evaluation
    configs: 5 beams, at most 10 new tokens, at least 1, length penalty -1, which favours short answers)."""
    batch_size: Count = 64
    num_beams: Count = 5
    max_new_tokens: Count = 10
    min_new_tokens: Workers = 1
    length_penalty: float = -1.0
    repetition_penalty: PositiveFloat = 1.0
    metric: Literal["vqa", "vqa_lavis", "gqa"] = "vqa"  # official VQA accuracy, LAVIS's variant, GQA exact match
    question_baseline: bool = True            # also score the question-type baseline of the VQA training splits

    def validate(self):
        return check_new_tokens(self)


@dataclass
class VQASplitConfig:
    """One VQA split: its questions file, the optional annotations file, and where its images are."""
    questions: str
    annotations: Optional[str] = None          # official VQAv2 / OK-VQA annotations: answers and types
    image_root: str = "."
    image_template: Optional[str] = None       # "{image_id}"-based image path, for the layouts without paths


def read_vqa_split(cfg):
    """The question dicts of a VQASplitConfig (see the module docstring), in the questions file's order."""
    data = read_json(cfg.questions, "VQA questions file")
    layout = _layout(data, cfg.questions)
    if layout in ("gqa", "gqa_lavis") and cfg.annotations:
        raise InputError(f"{cfg.questions} is a GQA questions file, which holds its answers; annotations "
                         f"({cfg.annotations}) are for VQAv2 / OK-VQA questions only: leave them out")
    if layout in ("lavis", "gqa_lavis") and cfg.image_template:
        raise InputError(f"{cfg.questions} names each image by its path (LAVIS layout), so image_template "
                         f"{cfg.image_template!r} does not apply: leave it out")
    questions = READERS[layout](data, cfg)
    if not questions:
        raise InputError(f"{cfg.questions} has no questions")
    if cfg.annotations:
        _add_annotations(questions, _read_annotations(cfg.annotations), cfg)
    for q in questions:
        del q["image_id"]  # only there to check the annotations' images
    return questions


def pre_question(question, max_words=50):
    """LAVIS's `blip_question` cleaning: lower-case, delete `. ! " ( ) * # : ; ~` (`?` stays), strip spaces on the
    right, then the first `max_words` words (split on single spaces, as LAVIS does)."""
    question = re.sub(r"[.!\"()*#:;~]", "", question.lower()).rstrip(" ")
    return " ".join(question.split(" ")[:max_words])


class VQAEvalDataset(Dataset):
    """Items: (image [3, S, S], index) for the `questions` of read_vqa_split, in their order.

    `question_ids`, `questions` (pre_question-cleaned), `answers`, `answer_types` and `question_types` are lists
    aligned with the items. Every image is checked once at construction; `source` (the split's VQASplitConfig)
    names the file and image_root in the error.
    """

    def __init__(self, questions, transform, source=None, image_check="decode"):
        if not questions:
            raise InputError("a VQA evaluation set needs at least one question")
        self.entries, self.image_paths = questions, [q["image"] for q in questions]
        self.ann_file, image_root = (source.questions, source.image_root) if source else ("VQA questions", "(as given)")
        check_image_files(self.image_paths, lambda path: [path], self.ann_file, image_root, skip_missing=False,
                          skippable=False, image_check=image_check)
        self.question_ids = [q["question_id"] for q in questions]
        self.questions = [pre_question(q["question"]) for q in questions]
        self.answers = [q["answers"] for q in questions]
        self.answer_types = [q["answer_type"] for q in questions]
        self.question_types = [q["question_type"] for q in questions]
        self.transform = transform

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        return self.transform(load_image(self.image_paths[index], index, self.ann_file)), index


class VQATrainDataset(Dataset):
    """Items: (image [3, S, S], text_input, text_output, image_index) for the `questions` of read_vqa_split.

    text_input is `prompt` with the pre_question-cleaned question in its "{}"; text_output is one of the question's
    distinct human answers, drawn uniformly per item as LAVIS's instruct VQA datasets do (random.choice over the
    unique answers), here with torch's generator so that the loader's seeding of its workers makes it repeatable.
    image_index numbers the distinct images 0..num_images-1 in first-seen order.
    """

    def __init__(self, questions, transform, prompt=DEFAULT_PROMPT):
        _check_prompt(prompt)
        if not questions:
            raise InputError("a VQA training set needs at least one question")
        unanswered = [q["question_id"] for q in questions if not q["answers"]]
        if unanswered:
            raise InputError(f"{len(unanswered)} of {len(questions)} training questions have no answers (e.g. ids "
                             f"{unanswered[:5]}); train on answered splits only (give the annotations file of "
                             "official-layout questions)")
        image_ids = {}
        self.image_paths = [q["image"] for q in questions]
        self.image_indices = [image_ids.setdefault(path, len(image_ids)) for path in self.image_paths]
        self.text_inputs = [prompt.format(pre_question(q["question"])) for q in questions]
        self.answer_choices = [list(dict.fromkeys(q["answers"])) for q in questions]  # distinct, first-seen order
        self.num_images, self.transform = len(image_ids), transform

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        choices = self.answer_choices[index]
        answer = choices[torch.randint(len(choices), ()).item()]
        image = self.transform(load_image(self.image_paths[index], index))
        return image, self.text_inputs[index], answer, self.image_indices[index]


def _check_prompt(prompt):
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None]
    except ValueError as e:
        raise InputError(f"VQA prompt {prompt!r} is not a valid format string: {e}") from None
    if fields != [""]:
        raise InputError(f"VQA prompt {prompt!r} must hold one '{{}}' where the question goes, such as "
                         f"{DEFAULT_PROMPT!r}")


# ------------------------------------------------------------------------------------------------------- layouts

def _layout(data, path):
    if isinstance(data, dict):
        if "questions" in data:
            return "vqa"
        if "annotations" in data:
            raise InputError(f"{path} is a VQA annotations file; give it as the split's annotations and the "
                             "questions file (with 'questions') as its questions")
        first = next(iter(data.values()), None)
        if isinstance(first, dict) and "imageId" in first:
            return "gqa"
    elif isinstance(data, list):
        first = data[0] if data else None
        return "gqa_lavis" if isinstance(first, dict) and isinstance(first.get("answer"), str) else "lavis"
    raise InputError(f"{path}: unknown VQA questions layout; expected the official VQAv2 / OK-VQA questions "
                     "({'data_subtype', 'questions': [...]}), GQA's {question_id: {'imageId', 'question', "
                     "'answer'}}, or a LAVIS list of {'image', 'question', 'question_id'[, 'answer']}")


def _read_official(data, cfg):
    entries = data["questions"]
    if not isinstance(entries, list):
        raise InputError(f"{cfg.questions}: 'questions' must be a list of questions")
    template = cfg.image_template or _coco_template(data.get("data_subtype"), cfg.questions)
    questions, ids = [], _UniqueIds(cfg.questions)
    for i, entry in enumerate(entries):
        where = f"{cfg.questions}: questions[{i}]"
        _require(entry, where, {"image_id": int, "question": str, "question_id": int})
        questions.append(_question(ids.add(entry["question_id"], where), entry["question"], [],
                                   _image_path(cfg, template, entry["image_id"], where), entry["image_id"]))
    return questions


def _coco_template(data_subtype, path):
    if not isinstance(data_subtype, str) or not data_subtype:
        raise InputError(f"{path} has no 'data_subtype' (such as 'val2014') to name its COCO images by; set the "
                         "split's image_template, e.g. 'val2014/COCO_val2014_{image_id:012d}.jpg'")
    images = "test2015" if data_subtype == "test-dev2015" else data_subtype  # test-dev is a subset of test2015
    return f"{images}/COCO_{images}_{{image_id:012d}}.jpg"


def _read_lavis(data, cfg):
    questions, ids = [], _UniqueIds(cfg.questions)
    for i, entry in enumerate(data):
        where = f"{cfg.questions}[{i}]"
        _require(entry, where, {"image": str, "question": str, "question_id": int})
        answers = entry.get("answer", [])
        if "answer" in entry and not (isinstance(answers, list) and answers and all(isinstance(a, str)
                                                                                     for a in answers)):
            raise InputError(f"{where}: 'answer' must be a non-empty list of strings (the human answers); got "
                             f"{answers!r:.80}")
        questions.append(_question(ids.add(entry["question_id"], where), entry["question"], answers,
                                   os.path.join(cfg.image_root, entry["image"])))
    return questions


def _read_gqa(data, cfg):
    template = cfg.image_template or "{image_id}.jpg"
    questions = []
    for qid, entry in data.items():
        where = f"{cfg.questions}: question {qid!r}"
        _require(entry, where, {"imageId": str, "question": str, "answer": str})
        questions.append(_question(qid, entry["question"], [entry["answer"]],
                                   _image_path(cfg, template, entry["imageId"], where)))
    return questions


def _read_gqa_lavis(data, cfg):
    questions, ids = [], _UniqueIds(cfg.questions)
    for i, entry in enumerate(data):
        where = f"{cfg.questions}[{i}]"
        _require(entry, where, {"image": str, "question": str, "answer": str, "question_id": (str, int)})
        questions.append(_question(ids.add(entry["question_id"], where), entry["question"], [entry["answer"]],
                                   os.path.join(cfg.image_root, entry["image"])))
    return questions


READERS = {"vqa": _read_official, "lavis": _read_lavis, "gqa": _read_gqa, "gqa_lavis": _read_gqa_lavis}


def _question(question_id, question, answers, image, image_id=None):
    return {"question_id": question_id, "image": image, "question": question, "answers": answers,
            "answer_type": "", "question_type": "", "image_id": image_id}


def _image_path(cfg, template, image_id, where):
    try:
        return os.path.join(cfg.image_root, template.format(image_id=image_id))
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise InputError(f"{where}: image_template {template!r} cannot name image {image_id!r} "
                         f"({type(e).__name__}: {e}); write it with {{image_id}} and an optional format spec, such "
                         "as 'val2014/COCO_val2014_{image_id:012d}.jpg'") from None


def _require(entry, where, fields):
    """InputError unless `entry` is an object whose `fields` {name: type or types} are there and of those types."""
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with {', '.join(fields)}; got {entry!r:.80}")
    for name, types in fields.items():
        if name not in entry:
            raise InputError(f"{where}: missing field '{name}'")
        value = entry[name]
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise InputError(f"{where}: '{name}' must be of type {expected}; got {value!r:.80}")


class _UniqueIds:
    """Question ids seen in one file: add() returns the id, or raises an InputError naming both places."""

    def __init__(self, path):
        self.path, self.first = path, {}

    def add(self, question_id, where):
        if question_id in self.first:
            raise InputError(f"{where}: question_id {question_id!r} is already used by {self.first[question_id]}; "
                             f"question ids must be unique within {self.path}")
        self.first[question_id] = where
        return question_id


# --------------------------------------------------------------------------------------------------- annotations

def _read_annotations(path):
    """{question_id: {"image_id", "answers", "answer_type", "question_type"}} of an official annotations file."""
    data = read_json(path, "VQA annotations file")
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise InputError(f"{path}: expected official VQA annotations, an object whose 'annotations' list holds "
                         "{'question_id', 'image_id', 'question_type', 'answer_type', 'answers': [{'answer', ...}]}")
    annotations, ids = {}, _UniqueIds(path)
    for i, entry in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _require(entry, where, {"question_id": int, "image_id": int, "question_type": str, "answer_type": str,
                                "answers": list})
        if not entry["answers"]:
            raise InputError(f"{where}: 'answers' is empty; each annotation holds the human answers")
        for j, answer in enumerate(entry["answers"]):
            _require(answer, f"{where}.answers[{j}]", {"answer": str})
        annotations[ids.add(entry["question_id"], where)] = {
            "image_id": entry["image_id"], "answers": [a["answer"] for a in entry["answers"]],
            "answer_type": entry["answer_type"], "question_type": entry["question_type"]}
    return annotations


def _add_annotations(questions, annotations, cfg):
    """Set the answers and types of `questions` from `annotations`, which must be of the same question ids (and,
    for official-layout questions, the same images)."""
    question_ids = {q["question_id"] for q in questions}
    no_annotation = [q["question_id"] for q in questions if q["question_id"] not in annotations]
    no_question = sorted(set(annotations) - question_ids)
    if no_annotation or no_question:
        raise InputError(f"{cfg.questions} and {cfg.annotations} disagree: {len(no_annotation)} questions have no "
                         f"annotation (e.g. ids {no_annotation[:5]}), {len(no_question)} annotations no question (e.g. "
                         f"ids {no_question[:5]}); give the annotations file of the same split")
    for q in questions:
        annotation = annotations[q["question_id"]]
        if q["image_id"] is not None and q["image_id"] != annotation["image_id"]:
            raise InputError(f"{cfg.questions} and {cfg.annotations} disagree on the image of question "
                             f"{q['question_id']}: image_id {q['image_id']} vs {annotation['image_id']}")
        q.update(answers=annotation["answers"], answer_type=annotation["answer_type"],
                 question_type=annotation["question_type"])
