"""Built-in demo data: scenes of coloured shapes, written in the real annotation formats.

    python -m data.synthetic --output_dir demo_data

writes, deterministically from `--seed`:
    images/{split}/*.png                      the rendered scenes
    nlvr_train.json, nlvr_dev.json, nlvr_test.json
                                              NLVR2 format: statements about the colours in one or both images of
                                              a pair, whose truth follows from the scenes; every sentence occurs
                                              once with each label, so the text alone predicts at chance
    scenes.json                               image path -> the objects it shows
    tokenizer/vocab.txt                       a WordPiece vocabulary covering every word written
"""

import argparse
import json
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


def random_scene(rng, focus_color, max_objects=3):
    """1..max_objects things of random shapes; each is of `focus_color` with probability 0.35."""
    scene = []
    for cell in rng.sample(range(GRID * GRID), rng.randint(1, max_objects)):
        color = focus_color if rng.random() < 0.35 else rng.choice([c for c in COLORS if c != focus_color])
        size = rng.uniform(0.17, 0.22)
        slack = 0.5 / GRID - size
        x = (cell % GRID + 0.5) / GRID + rng.uniform(-slack, slack)
        y = (cell // GRID + 0.5) / GRID + rng.uniform(-slack, slack)
        scene.append(Thing(color, rng.choice(SHAPES), round(x, 4), round(y, 4), round(size, 4)))
    return scene


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


def write_images(output_dir, split, scenes, size, rng, scene_index):
    """Render `scenes` as images/{split}/{split}-{i}.png; returns their paths relative to output_dir."""
    os.makedirs(os.path.join(output_dir, "images", split), exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        path = f"images/{split}/{split}-{i}.png"
        background = tuple(rng.randint(0, 40) for _ in range(3))
        render(scene, size, background).save(os.path.join(output_dir, path))
        scene_index[path] = [asdict(t) for t in scene]
        paths.append(path)
    return paths


def write_nlvr(output_dir, split, filename, num_pairs, size, rng, scene_index):
    examples = nlvr_split(rng, num_pairs)
    paths = write_images(output_dir, split, [s for _, _, left, right in examples for s in (left, right)], size, rng,
                         scene_index)
    entries = [{"images": paths[2 * i:2 * i + 2], "sentence": sentence, "label": str(label)}
               for i, (sentence, label, _, _) in enumerate(examples)]
    with open(os.path.join(output_dir, filename), "w") as f:
        json.dump(entries, f, indent=1)
    return [sentence for sentence, *_ in examples]


def write_vocab(output_dir, texts):
    """BERT specials plus every lower-cased word and punctuation mark of `texts`, one per line."""
    words = sorted({w for text in texts for w in re.findall(r"\w+|[^\w\s]", text.lower())})
    os.makedirs(os.path.join(output_dir, "tokenizer"), exist_ok=True)
    with open(os.path.join(output_dir, "tokenizer", "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")


def generate(output_dir, seed=0, num_train=5000, num_val=250, num_test=250, image_size=32):
    """Write the demo dataset; `num_*` count sentence pairs (two examples each)."""
    rng = random.Random(seed)
    scene_index, texts = {}, []
    for split, filename, num in (("train", "nlvr_train.json", num_train), ("dev", "nlvr_dev.json", num_val),
                                 ("test", "nlvr_test.json", num_test)):
        texts += write_nlvr(output_dir, split, filename, num, image_size, rng, scene_index)
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
    args = parser.parse_args()
    generate(args.output_dir, args.seed, args.num_train, args.num_val, args.num_test, args.image_size)
    print(f"wrote the demo dataset to {args.output_dir}")


if __name__ == "__main__":
    main()
