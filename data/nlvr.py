"""NLVR2: `[{"images": [path0, path1], "sentence": str, "label": "True" | "False"}, ...]`, paths relative to
`image_root` (BLIP's `nlvr_train.json`, `nlvr_dev.json`, `nlvr_test.json`)."""

import os

import torch
from torch.utils.data import Dataset

from data.utils import check_image_files, drop_empty_texts, load_image, pre_caption, read_entries
from utils import InputError

ANNOTATION_URLS = {
    "train": "https://storage.googleapis.com/sfr-vision-language-research/datasets/nlvr_train.json",
    "val": "https://storage.googleapis.com/sfr-vision-language-research/datasets/nlvr_dev.json",
    "test": "https://storage.googleapis.com/sfr-vision-language-research/datasets/nlvr_test.json",
}
LABELS = {"True": 1, "False": 0}


class NLVRDataset(Dataset):
    """Items: (image0 [3, S, S], image1 [3, S, S], sentence, label 1/0).

    With `train`, each item is swapped with probability 1/2: the images change places and `left` and `right`
    trade places in the sentence, so the statement stays true or false (the original's augmentation). Without
    `train`, items are deterministic. Sentences empty after cleaning are an InputError, or with `skip_empty_text`
    skipped with a warning; `image_check`: see data.utils.check_image_files.
    """

    def __init__(self, ann_file, image_root, transform, max_words=40, train=False, skip_missing_images=False, *,
                 skip_empty_text=False, image_check="decode"):
        placed = [(where, _parse_entry(entry, where, image_root, max_words)) for where, entry in read_entries(ann_file)]
        entries = drop_empty_texts(placed, "sentence", ann_file, skip_empty_text)
        self.entries = check_image_files(entries, lambda e: e["images"], ann_file, image_root, skip_missing_images,
                                         image_check=image_check)
        if not self.entries:
            raise InputError(f"{ann_file} has no usable examples")
        self.ann_file, self.transform, self.train = ann_file, transform, train

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        image0, image1 = (self.transform(load_image(path, index, self.ann_file)) for path in entry["images"])
        sentence = entry["sentence"]
        if self.train and torch.rand(()) < 0.5:
            image0, image1, sentence = image1, image0, swap_left_right(sentence)
        return image0, image1, sentence, entry["label"]


def swap_left_right(sentence):
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in sentence.split(" "))


def _parse_entry(entry, where, image_root, max_words):
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with images, sentence, label; got {entry!r:.80}")
    for field in ("images", "sentence", "label"):
        if field not in entry:
            raise InputError(f"{where}: missing field '{field}'")
    images = entry["images"]
    if not (isinstance(images, list) and len(images) == 2 and all(isinstance(p, str) for p in images)):
        raise InputError(f"{where}: 'images' must be a list of two image paths; got {images!r:.120}")
    if not isinstance(entry["sentence"], str):
        raise InputError(f"{where}: 'sentence' must be a string; got {entry['sentence']!r:.80}")
    label = entry["label"]
    if isinstance(label, bool):
        label = str(label)
    if label not in LABELS:
        raise InputError(f'{where}: \'label\' must be "True" or "False"; got {entry["label"]!r}')
    return {"images": [os.path.join(image_root, p) for p in images],
            "sentence": pre_caption(entry["sentence"], max_words), "label": LABELS[label]}
