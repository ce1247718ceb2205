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
    scenes.json                               image path -> the objects it shows
    tokenizer/vocab.txt                       a WordPiece vocabulary covering every word written
"""

import argparse
import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

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
    """The caption splits, `splits` being [(split, number of images)]; returns every caption written."""
    texts, next_id = [], 1
    for split, num in splits:
        ids = list(range(next_id, next_id + num))
        next_id += num
        # Repeated scenes would make retrieval ambiguous; training may repeat them, as real data does.
        scenes = caption_scenes(rng, num, distinct=split != "train")
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
    return texts


def write_caption_eval(output_dir, split, paths, ids, per_image):
    """coco_karpathy_{split}.json and its COCO-format ground truth coco_karpathy_{split}_gt.json."""
    write_json(output_dir, f"coco_karpathy_{split}.json",
               [{"image": path, "caption": image_captions} for path, image_captions in zip(paths, per_image)])
    annotations = [{"image_id": i, "caption": caption} for i, image_captions in zip(ids, per_image)
                   for caption in image_captions]
    write_json(output_dir, f"coco_karpathy_{split}_gt.json",
               {"annotations": [{**a, "id": n} for n, a in enumerate(annotations, 1)],
                "images": [{"id": i} for i in ids]})


def write_vocab(output_dir, texts):
    """BERT specials plus every lower-cased word and punctuation mark of `texts`, one per line."""
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    os.makedirs(os.path.join(output_dir, "tokenizer"), exist_ok=True)
    with open(os.path.join(output_dir, "tokenizer", "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")


def generate(output_dir, seed=0, num_train=5000, num_val=250, num_test=250, image_size=32, num_caption_train=4000,
             num_caption_val=100, num_caption_test=100, captions_per_train_image=2):
    """Write the demo dataset; `num_*` count NLVR sentence pairs (two examples each), `num_caption_*` images."""
    if max(num_caption_val, num_caption_test) > DISTINCT_SCENES:
        raise ValueError(f"a caption val or test split can hold at most {DISTINCT_SCENES} distinct scenes")
    rng = random.Random(seed)
    scene_index, texts = {}, []
    for split, filename, num in (("train", "nlvr_train.json", num_train), ("dev", "nlvr_dev.json", num_val),
                                 ("test", "nlvr_test.json", num_test)):
        texts += write_nlvr(output_dir, split, filename, num, image_size, rng, scene_index)
    # A generator of their own keeps the NLVR files the same whatever the caption splits hold.
    texts += write_captions(output_dir, (("train", num_caption_train), ("val", num_caption_val),
                                         ("test", num_caption_test)), captions_per_train_image, image_size,
                            random.Random(f"captions-{seed}"), scene_index)
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
    args = parser.parse_args()
    generate(args.output_dir, args.seed, args.num_train, args.num_val, args.num_test, args.image_size,
             args.num_caption_train, args.num_caption_val, args.num_caption_test, args.captions_per_train_image)
    print(f"wrote the demo dataset to {args.output_dir}")


if __name__ == "__main__":
    main()
