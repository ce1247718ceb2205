"""Built-in demo data: scenes of coloured shapes, written in the real annotation formats.

    python -m data.synthetic --output_dir demo_data

writes, deterministically from `--seed`:
    images/{train,dev,test}/*.png             the NLVR scenes
    nlvr_train.json, nlvr_dev.json, nlvr_test.json
                                              NLVR2 format: statements about the colours in one or both images of
                                              a pair, whose truth follows from the scenes; every sentence occurs
                                              once with each label, so the text alone predicts at chance
    images/caption_{train,val,test}/synthetic_{id:012d}.png
                                              the caption scenes; like COCO's, the number in the name is the
                                              image's id, unique over the three splits
    coco_karpathy_train.json                  COCO Karpathy format, {"image", "caption", "image_id": "synthetic_<id>"}
                                              per caption, --captions_per_train_image of them per image
    coco_karpathy_val.json, coco_karpathy_test.json
                                              {"image", "caption": [5 captions]} per image. Each caption names the
                                              colour, shape and cell of every thing, and no two images of a split
                                              show the same, so one caption identifies its image
    coco_karpathy_val_gt.json, coco_karpathy_test_gt.json
                                              the same captions as COCO caption ground truth (pycocotools' COCO)
    vqa_{train,val,test}_questions.json       VQAv2's official layout over the caption images, about 3 questions per
    vqa_{train,val}_annotations.json          image (colour, shape, counts, position, yes/no), each with 10 human
                                              answers that mostly agree (variants that the VQA normalisation maps
                                              together, a second defensible answer, mistakes); test has questions
                                              only, like test-dev. The image ids are those of the caption file names:
                                              read them with image_template
                                              "images/caption_{split}/synthetic_{image_id:012d}.png"
    shards/caption_train-{000000..000007}.tar the pairs of coco_karpathy_train.json as webdataset shards, one
                                              sample per pair as img2dataset writes them: {key}.png (the image
                                              file's bytes), {key}.txt (the caption), {key}.json ({"caption",
                                              "url": the image path, "key", "status", "width", "height"});
                                              --num_shards of them (8: enough for 2 processes x 4 loader workers)
    vg_style_train.json                       Visual Genome's caption format, {"image", "caption"} without
                                              image_id: one or two more captions of half the training images, to
                                              mix with the shards
    scenes.json                               image path -> the objects it shows
    tokenizer/vocab.txt                       a WordPiece vocabulary covering every word of the NLVR, caption and
                                              VQA files, of the caption instructions (data.caption) and of the VQA
                                              prompt
"""

import argparse
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass

import webdataset as wds
from PIL import Image, ImageDraw

from data.caption import CAPTION_INSTRUCTIONS
from data.vqa import DEFAULT_PROMPT

COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 245), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
# Things sit in distinct cells of a GRID x GRID layout on a dark background. At 32 px each cell is one 16 px ViT
# patch, which lets a tiny ViT trained from scratch see them within the demo's few minutes.
GRID = 2


@dataclass(frozen=True)
class Thing:
    color: str
    shape: str
    x: float  # centre, as a fraction of the image width
    y: float
    size: float  # half the side of the bounding square, as a fraction of the width


def has_color(scene, color):
    return any(t.color == color for t in scene)


# Every statement asserts that a colour is present, so a true example shows more of that colour than a false one:
# the image-side signal a model trained from scratch needs to get going. (Statements that assert absence, such as
# "neither image ...", cancel that signal, and a tiny model then stays at chance for thousands of steps.)
NLVR_STATEMENTS = {
    "the left image contains a {color} shape.": lambda left, right: left,
    "the right image contains a {color} shape.": lambda left, right: right,
    "both images contain a {color} shape.": lambda left, right: left and right,
    "at least one image contains a {color} shape.": lambda left, right: left or right,
}

CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # by cell number, for GRID 2
COUNTS = ("one shape", "two shapes", "three shapes")  # a caption scene has one to three things
# (caption, phrase for one thing): every caption names the colour, shape and cell of each thing of the scene, so
# that one caption identifies its image; the wording and the order of the things vary.
CAPTION_TEMPLATES = (
    ("{things}.", "a {color} {shape} at the {cell}"),
    ("there is {things}.", "a {color} {shape} in the {cell} corner"),
    ("{count}: {things}.", "a {color} {shape} ({cell})"),
    ("{things}.", "the {cell} has a {color} {shape}"),
    ("a dark picture with {things}.", "a {color} {shape} on the {cell}"),
)
DISTINCT_SCENES = sum(math.comb(GRID * GRID, n) * (len(COLORS) * len(SHAPES)) ** n for n in range(1, len(COUNTS) + 1))


def random_scene(rng, focus_color, max_objects=3):
    """1..max_objects things of random shapes in distinct cells; each is of `focus_color` with probability 0.35."""
    scene = []
    for cell in rng.sample(range(GRID * GRID), rng.randint(1, max_objects)):
        color = focus_color if rng.random() < 0.35 else rng.choice([c for c in COLORS if c != focus_color])
        scene.append(place(rng, cell, color))
    return scene


def place(rng, cell, color):
    """A thing of `color`, a random shape and a random size, wholly inside `cell` (numbered row by row)."""
    size = rng.uniform(0.17, 0.22)
    slack = 0.5 / GRID - size
    x = (cell % GRID + 0.5) / GRID + rng.uniform(-slack, slack)
    y = (cell // GRID + 0.5) / GRID + rng.uniform(-slack, slack)
    return Thing(color, rng.choice(SHAPES), round(x, 4), round(y, 4), round(size, 4))


def cell_of(thing):
    return int(thing.y * GRID) * GRID + int(thing.x * GRID)


def render(scene, size, background):
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for t in scene:
        cx, cy, h = t.x * size, t.y * size, t.size * size
        box = [cx - h, cy - h, cx + h, cy + h]
        if t.shape == "circle":
            draw.ellipse(box, fill=COLORS[t.color])
        elif t.shape == "square":
            draw.rectangle(box, fill=COLORS[t.color])
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=COLORS[t.color])
    return image


def nlvr_split(rng, num_pairs):
    """`num_pairs` sentences, each with a true and a false example: [(sentence, label, left, right)]."""
    examples = []
    for _ in range(num_pairs):
        template, color = rng.choice(list(NLVR_STATEMENTS)), rng.choice(list(COLORS))
        holds = NLVR_STATEMENTS[template]
        for label in rng.sample([True, False], 2):
            while True:
                left, right = random_scene(rng, color), random_scene(rng, color)
                if holds(has_color(left, color), has_color(right, color)) == label:
                    break
            examples.append((template.format(color=color), label, left, right))
    return examples


def write_images(output_dir, paths, scenes, size, rng, scene_index):
    """Render `scenes` on random dark backgrounds to `paths`, relative to output_dir."""
    for directory in {os.path.dirname(path) for path in paths}:
        os.makedirs(os.path.join(output_dir, directory), exist_ok=True)
    for path, scene in zip(paths, scenes):
        background = tuple(rng.randint(0, 40) for _ in range(3))
        render(scene, size, background).save(os.path.join(output_dir, path))
        scene_index[path] = [asdict(t) for t in scene]


def write_json(output_dir, filename, data):
    with open(os.path.join(output_dir, filename), "w") as f:
        json.dump(data, f, indent=1)


def write_nlvr(output_dir, split, filename, num_pairs, size, rng, scene_index):
    examples = nlvr_split(rng, num_pairs)
    paths = [f"images/{split}/{split}-{i}.png" for i in range(2 * len(examples))]
    write_images(output_dir, paths, [s for _, _, left, right in examples for s in (left, right)], size, rng,
                 scene_index)
    entries = [{"images": paths[2 * i:2 * i + 2], "sentence": sentence, "label": str(label)}
               for i, (sentence, label, _, _) in enumerate(examples)]
    write_json(output_dir, filename, entries)
    return [sentence for sentence, *_ in examples]


def caption_scenes(rng, num_images, distinct):
    """`num_images` scenes of one to three things of any colour and shape in distinct cells; with `distinct`, no two
    show the same things in the same cells."""
    scenes, seen = [], set()
    while len(scenes) < num_images:
        cells = rng.sample(range(GRID * GRID), rng.randint(1, len(COUNTS)))
        scene = [place(rng, cell, rng.choice(list(COLORS))) for cell in cells]
        key = frozenset((t.color, t.shape, cell_of(t)) for t in scene)
        if not (distinct and key in seen):
            seen.add(key)
            scenes.append(scene)
    return scenes


def describe(rng, scene, template):
    """One caption of `scene` in `template`, naming its things in a random order."""
    frame, phrase = template
    things = [phrase.format(color=t.color, shape=t.shape, cell=CELL_NAMES[cell_of(t)])
              for t in rng.sample(scene, len(scene))]
    listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    return frame.format(things=listed, count=COUNTS[len(scene) - 1])


def captions(rng, scene, num):
    """`num` captions of `scene`, in different templates while there are enough."""
    templates = rng.sample(CAPTION_TEMPLATES, len(CAPTION_TEMPLATES))
    return [describe(rng, scene, templates[i % len(templates)]) for i in range(num)]


def write_captions(output_dir, splits, captions_per_train_image, size, rng, scene_index):
    """The caption splits, `splits` being [(split, number of images)]; returns every caption written and
    {split: (image ids, scenes)}."""
    texts, next_id, split_scenes = [], 1, {}
    for split, num in splits:
        ids = list(range(next_id, next_id + num))
        next_id += num
        # Repeated scenes would make retrieval ambiguous; training may repeat them, as real data does.
        scenes = caption_scenes(rng, num, distinct=split != "train")
        split_scenes[split] = ids, scenes
        paths = [f"images/caption_{split}/synthetic_{i:012d}.png" for i in ids]
        write_images(output_dir, paths, scenes, size, rng, scene_index)
        per_image = [captions(rng, scene, captions_per_train_image if split == "train" else 5) for scene in scenes]
        if split == "train":
            write_json(output_dir, "coco_karpathy_train.json",
                       [{"image": path, "caption": caption, "image_id": f"synthetic_{i}"}
                        for path, i, image_captions in zip(paths, ids, per_image) for caption in image_captions])
        else:
            write_caption_eval(output_dir, split, paths, ids, per_image)
        texts += [caption for image_captions in per_image for caption in image_captions]
    return texts, split_scenes


def write_caption_eval(output_dir, split, paths, ids, per_image):
    """coco_karpathy_{split}.json and its COCO-format ground truth coco_karpathy_{split}_gt.json."""
    write_json(output_dir, f"coco_karpathy_{split}.json",
               [{"image": path, "caption": image_captions} for path, image_captions in zip(paths, per_image)])
    annotations = [{"image_id": i, "caption": caption} for i, image_captions in zip(ids, per_image)
                   for caption in image_captions]
    write_json(output_dir, f"coco_karpathy_{split}_gt.json",
               {"annotations": [{**a, "id": n} for n, a in enumerate(annotations, 1)],
                "images": [{"id": i} for i in ids]})


def write_caption_shards(output_dir, num_shards, image_size):
    """shards/caption_train-{000000..}.tar: the pairs of coco_karpathy_train.json in its order, cut into
    `num_shards` shards of about equal size (one a pair where there are fewer pairs), as img2dataset writes them
    (the image file's bytes as they are)."""
    with open(os.path.join(output_dir, "coco_karpathy_train.json")) as f:
        pairs = json.load(f)
    num_shards = min(num_shards, len(pairs))
    os.makedirs(os.path.join(output_dir, "shards"), exist_ok=True)
    for shard in range(num_shards):
        path = os.path.join(output_dir, "shards", f"caption_train-{shard:06d}.tar")
        with wds.TarWriter(path, mtime=0) as tar:  # a fixed mtime: the same bytes every time
            for index, pair in enumerate(pairs[shard * len(pairs) // num_shards:
                                               (shard + 1) * len(pairs) // num_shards]):
                key = f"{shard:05d}{index:04d}"  # img2dataset's keys: shard number, then number in the shard
                with open(os.path.join(output_dir, pair["image"]), "rb") as f:
                    image = f.read()
                meta = {"url": pair["image"], "key": key, "caption": pair["caption"], "status": "success",
                        "width": image_size, "height": image_size}
                tar.write({"__key__": key, "png": image, "txt": pair["caption"], "json": meta})


def write_vg_style(output_dir, ids, scenes, rng):
    """vg_style_train.json: one or two more captions of half of the training images (`ids`, `scenes`), in Visual
    Genome's caption format (no image_id: the image path is the id)."""
    chosen = sorted(rng.sample(range(len(ids)), len(ids) // 2))
    write_json(output_dir, "vg_style_train.json",
               [{"image": f"images/caption_train/synthetic_{ids[i]:012d}.png", "caption": caption}
                for i in chosen for caption in captions(rng, scenes[i], rng.randint(1, 2))])


# VQA questions about a caption scene. Each kind of question gives (question, answer, second defensible answer or
# None, question_type, answer_type), or None where the scene cannot answer it. Question types are VQAv2's: the
# longest of its 65 question openings that begins the question ("what shape ..." is of type "what").
SHAPE_SYNONYMS = {"circle": "dot", "square": "rectangle", "triangle": "pyramid"}
COLOR_SYNONYMS = {"red": "crimson", "green": "lime", "blue": "royal blue", "yellow": "gold"}
CELL_SYNONYMS = {"top left": "upper left", "top right": "upper right", "bottom left": "lower left",
                 "bottom right": "lower right"}
NUMBER_NAMES = ("zero", "one", "two", "three")  # a scene has at most three things


def ask_color(rng, scene):
    thing = rng.choice(scene)
    place = "" if [t.shape for t in scene].count(thing.shape) == 1 else f" at the {CELL_NAMES[cell_of(thing)]}"
    return (f"what color is the {thing.shape}{place}?", thing.color, COLOR_SYNONYMS[thing.color],
            "what color is the", "other")


def ask_shape(rng, scene):
    thing = rng.choice(scene)
    return (f"what shape is at the {CELL_NAMES[cell_of(thing)]}?", thing.shape, SHAPE_SYNONYMS[thing.shape], "what",
            "other")


def ask_count(rng, scene):
    return "how many shapes are there?", str(len(scene)), None, "how many", "number"


def ask_color_count(rng, scene):
    """About a colour of the scene or, half the time, one it lacks (answer 0), so that 0 is as common as not."""
    present = sorted({t.color for t in scene})
    absent = [c for c in COLORS if c not in present]
    color = rng.choice(present if rng.random() < 0.5 else absent)
    return (f"how many {color} shapes are there?", str(sum(t.color == color for t in scene)), None, "how many",
            "number")


def ask_position(rng, scene):
    kinds = [(t.color, t.shape) for t in scene]
    unique = [t for t in scene if kinds.count((t.color, t.shape)) == 1]
    if not unique:
        return None
    thing = rng.choice(unique)
    cell = CELL_NAMES[cell_of(thing)]
    return f"where is the {thing.color} {thing.shape}?", cell, CELL_SYNONYMS[cell], "where is the", "other"


def ask_presence(rng, scene):
    """About a thing of the scene or, half the time, a colour and shape it lacks: the question alone says
    nothing."""
    present = {(t.color, t.shape) for t in scene}
    answer = rng.random() < 0.5
    pool = sorted(present) if answer else [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    color, shape = rng.choice(pool)
    return f"is there a {color} {shape}?", "yes" if answer else "no", None, "is there a", "yes/no"


QUESTION_KINDS = (ask_color, ask_shape, ask_count, ask_color_count, ask_position, ask_presence)


def answer_variants(answer, answer_type):
    """Ways of writing `answer` that the VQA normalisation maps to it: case, final period, article, number word,
    hyphen."""
    variants = [answer.capitalize(), answer + "."]
    if answer_type == "number":
        variants.append(NUMBER_NAMES[int(answer)])
    elif answer in SHAPES:
        variants.append("a " + answer)
    elif answer in CELL_NAMES:
        variants += ["the " + answer, answer.replace(" ", "-")]
    return variants


def human_answers(rng, answer, alternative, mistakes, answer_type):
    """Ten annotators' {"answer", "answer_confidence", "answer_id"}: the answer as written, one of its variants,
    the second defensible answer (for a few of them, on some questions) or a plain mistake, at rates that vary per
    question, so that some questions get ten identical answers."""
    variant_rate, mistake_rate = rng.choice((0.0, 0.2, 0.4)), rng.choice((0.0, 0.05, 0.15))
    num_alternative = rng.choice((0, 0, 1, 2, 3)) if alternative else 0
    written = []
    for n in range(10):
        if n < num_alternative:
            written.append((alternative, "maybe"))
        elif rng.random() < mistake_rate:
            written.append((rng.choice(mistakes), "maybe"))
        elif rng.random() < variant_rate:
            written.append((rng.choice(answer_variants(answer, answer_type)), "yes"))
        else:
            written.append((answer, "yes"))
    rng.shuffle(written)
    return [{"answer": a, "answer_confidence": confidence, "answer_id": n}
            for n, (a, confidence) in enumerate(written, 1)]


def wrong_answers(answer, answer_type):
    """Plain mistakes for `answer`: the other answers of its kind."""
    if answer_type == "yes/no":
        return ["no" if answer == "yes" else "yes"]
    if answer_type == "number":
        return [str(n) for n in (int(answer) - 1, int(answer) + 1) if n >= 0]
    for names in (tuple(COLORS), SHAPES, CELL_NAMES):
        if answer in names:
            return [name for name in names if name != answer]
    raise ValueError(f"no mistakes known for {answer!r}")


def vqa_split(rng, ids, scenes, questions_per_image):
    """(questions, annotations) of VQAv2's official files over `scenes`, whose image ids are `ids`; question ids
    are image id x 1000 + number, as in VQAv2."""
    questions, annotations = [], []
    for image_id, scene in zip(ids, scenes):
        asked = [q for q in (kind(rng, scene) for kind in QUESTION_KINDS) if q]
        for number, (question, answer, alternative, question_type, answer_type) in enumerate(
                rng.sample(asked, min(questions_per_image, len(asked)))):
            question_id = image_id * 1000 + number
            questions.append({"image_id": image_id, "question": question, "question_id": question_id})
            answers = human_answers(rng, answer, alternative, wrong_answers(answer, answer_type), answer_type)
            annotations.append({"question_id": question_id, "image_id": image_id, "question_type": question_type,
                                "answer_type": answer_type, "multiple_choice_answer": answer, "answers": answers})
    return questions, annotations


def write_vqa(output_dir, split_scenes, rng, questions_per_image):
    """vqa_{split}_questions.json for every caption split and vqa_{split}_annotations.json but for test; returns the
    questions' and answers' texts."""
    texts = []
    for split, (ids, scenes) in split_scenes.items():
        questions, annotations = vqa_split(rng, ids, scenes, questions_per_image)
        texts += [q["question"] for q in questions] + [a["answer"] for ann in annotations for a in ann["answers"]]
        header = {"data_type": "synthetic", "data_subtype": f"caption_{split}"}
        write_json(output_dir, f"vqa_{split}_questions.json",
                   {"task_type": "Open-Ended", **header, "questions": questions})
        if split != "test":
            write_json(output_dir, f"vqa_{split}_annotations.json", {**header, "annotations": annotations})
    return texts


def write_vocab(output_dir, texts):
    """BERT specials plus every lower-cased word and punctuation mark of `texts`, one per line."""
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    os.makedirs(os.path.join(output_dir, "tokenizer"), exist_ok=True)
    with open(os.path.join(output_dir, "tokenizer", "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")


def generate(output_dir, seed=0, num_train=5000, num_val=250, num_test=250, image_size=32, num_caption_train=4000,
             num_caption_val=100, num_caption_test=100, captions_per_train_image=2, questions_per_image=3,
             num_shards=8):
    """Write the demo dataset; `num_*` count NLVR sentence pairs (two examples each), `num_caption_*` images, which
    the VQA splits ask `questions_per_image` questions about; `num_shards` the shards of the caption training
    pairs."""
    if max(num_caption_val, num_caption_test) > DISTINCT_SCENES:
        raise ValueError(f"a caption val or test split can hold at most {DISTINCT_SCENES} distinct scenes")
    rng = random.Random(seed)
    scene_index, texts = {}, []
    for split, filename, num in (("train", "nlvr_train.json", num_train), ("dev", "nlvr_dev.json", num_val),
                                 ("test", "nlvr_test.json", num_test)):
        texts += write_nlvr(output_dir, split, filename, num, image_size, rng, scene_index)
    # Generators of their own keep the NLVR files the same whatever the caption splits hold, and the caption files
    # the same as before the VQA splits existed.
    caption_texts, split_scenes = write_captions(output_dir, (("train", num_caption_train), ("val", num_caption_val),
                                                              ("test", num_caption_test)), captions_per_train_image,
                                                 image_size, random.Random(f"captions-{seed}"), scene_index)
    texts += caption_texts
    write_caption_shards(output_dir, num_shards, image_size)
    # Their own generator, and not in the vocabulary's texts: every other file stays as it was before them (their
    # words are those of the caption templates).
    write_vg_style(output_dir, *split_scenes["train"], random.Random(f"vg-{seed}"))
    texts += write_vqa(output_dir, split_scenes, random.Random(f"vqa-{seed}"), questions_per_image)
    texts += [*CAPTION_INSTRUCTIONS, DEFAULT_PROMPT]  # what the instruction-aware Q-Former reads beside them
    with open(os.path.join(output_dir, "scenes.json"), "w") as f:
        json.dump(scene_index, f)
    write_vocab(output_dir, texts)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=5000, help="NLVR sentence pairs in the train split")
    parser.add_argument("--num_val", type=int, default=250)
    parser.add_argument("--num_test", type=int, default=250)
    parser.add_argument("--image_size", type=int, default=32, help="side of the written images in pixels")
    parser.add_argument("--num_caption_train", type=int, default=4000, help="images in the caption train split")
    parser.add_argument("--num_caption_val", type=int, default=100)
    parser.add_argument("--num_caption_test", type=int, default=100)
    parser.add_argument("--captions_per_train_image", type=int, default=2)
    parser.add_argument("--questions_per_image", type=int, default=3, help="VQA questions per caption image")
    parser.add_argument("--num_shards", type=int, default=8, help="webdataset shards of the caption training pairs")
    args = parser.parse_args()
    generate(args.output_dir, args.seed, args.num_train, args.num_val, args.num_test, args.image_size,
             args.num_caption_train, args.num_caption_val, args.num_caption_test, args.captions_per_train_image,
             args.questions_per_image, args.num_shards)
    print(f"wrote the demo dataset to {args.output_dir}")


if __name__ == "__main__":
    main()
