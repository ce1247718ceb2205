"""Image-caption data: training pairs mixed from several annotation files, and the retrieval / caption evaluation
sets. Every file is a list of objects; image paths are relative to the file's `image_root`.

Training (`CaptionSource`, `CaptionDataset`):
    COCO Karpathy train   [{"image", "caption", "image_id"}, ...], image_id a string such as "coco_522418"
        https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_train.json
    Visual Genome         [{"image", "caption"}, ...]: no image_id, the image path is the id
        https://storage.googleapis.com/sfr-vision-language-research/LAVIS/datasets/visual_genome/vg_caption.json
    custom                {"image", "caption"[, "image_id" str or int]} objects as a JSON list, or one per line in a
                          `.jsonl` file
Evaluation (`RetrievalDataset`): Karpathy val/test, [{"image", "caption": [str, ...]}, ...]
        https://storage.googleapis.com/sfr-vision-language-research/datasets/coco_karpathy_val.json, ..._test.json
        https://storage.googleapis.com/sfr-vision-language-research/datasets/flickr30k_val.json, ..._test.json
    Caption metrics score against the COCO-format ground truth coco_karpathy_val_gt.json and
    coco_karpathy_test_gt.json (same site), keyed by the image ids that `RetrievalDataset.image_ids` gives.
"""

import os
import re
from dataclasses import dataclass, field
from typing import Optional

from torch.utils.data import Dataset

from data.loader import LoaderConfig
from data.transforms import eval_transform, train_transform
from data.utils import (FIRST, check_image_files, drop_empty_texts, load_image, pre_caption, read_annotation,
                        read_entries)
from utils import InputError, log


@dataclass
class CaptionSource:
    """One annotation file of image-caption pairs."""
    ann_file: str
    image_root: str = "."


@dataclass
class CaptionDataConfig(LoaderConfig):
    """The `data:` section of the BLIP-2 configs: training (stage 1 and 2), retrieval and caption evaluation."""
    train: list[CaptionSource] = field(default_factory=list)
    val_file: Optional[str] = None            # Karpathy format: [{"image", "caption": [...]}]; training needs it
    test_file: Optional[str] = None
    val_gt_file: Optional[str] = None         # caption metrics: COCO-format ground truth (coco_karpathy_val_gt.json);
    test_gt_file: Optional[str] = None        # null: the captions of val_file / test_file
    image_root: str = "."                     # of the val and test images
    max_words: int = 50                       # training captions
    eval_max_words: int = 30                  # retrieval texts
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    augment: bool = True                      # false: training images get the evaluation transform (resize only)
    vit_feature_cache: Optional[str] = None   # dir of frozen-encoder outputs, built once; needs augment: false
    skip_missing_images: bool = False         # drop training pairs whose image is missing instead of stopping


class CaptionDataset(Dataset):
    """Items: (image [3, S, S], caption, image_id).

    image_id numbers the distinct images 0..num_images-1 in first-seen order over all sources. Captions of one
    image share its id; the same raw id in two sources is two images (COCO's "coco_1" and a custom file's "coco_1"
    are unrelated). Captions empty after cleaning are an InputError, or with `skip_empty_text` skipped with a
    warning; `image_check`: see data.utils.check_image_files.
    """

    def __init__(self, sources, transform, max_words=50, skip_missing_images=False, *, skip_empty_text=False,
                 image_check="decode"):
        if not sources:
            raise InputError("CaptionDataset needs at least one annotation file")
        self.entries, ids = [], {}
        for number, source in enumerate(sources):
            for entry in _read_source(source, max_words, skip_missing_images, skip_empty_text, image_check):
                key = (number, entry.pop("raw_id"))
                entry["image_id"] = ids.setdefault(key, len(ids))
                self.entries.append(entry)
        self.num_images, self.transform = len(ids), transform

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        image = load_image(entry["image"], index, entry["ann_file"])
        return self.transform(image), entry["caption"], entry["image_id"]


def caption_train_set(data_cfg, image_size):
    """The CaptionDataset of a CaptionDataConfig (train, crop_scale, hflip, augment, max_words,
    skip_missing_images), with BLIP-2's training transform (no RandAugment), or with `augment` false the evaluation
    transform. Training also needs `val_file`: the best epoch is chosen on it."""
    d = data_cfg
    missing = [name for name, value in (("data.train", d.train), ("data.val_file", d.val_file)) if not value]
    if missing:
        raise InputError(f"training needs {' and '.join(missing)}: data.train lists the training annotation files "
                         "({ann_file, image_root} each), data.val_file the split that picks the best epoch")
    transform = (train_transform(image_size, d.crop_scale, randaugment=False, hflip=d.hflip) if d.augment else
                 eval_transform(image_size))
    dataset = CaptionDataset(d.train, transform, d.max_words, d.skip_missing_images)
    log(f"train: {len(dataset)} captions of {dataset.num_images} images")
    return dataset


class RetrievalDataset(Dataset):
    """Items: (image [3, S, S], index).

    `text` holds every cleaned caption, image by image; `img2txt[i]` lists the indices in `text` of image i's
    captions and `txt2img[t]` is the image of caption t. `image_ids[i]` is the entry's "image_id", else, as COCO
    caption evaluation expects, the integer after the last "_" of the file name ("COCO_val2014_000000391895.jpg"
    -> 391895, Flickr's "1000092795.jpg" -> 1000092795), else the image path as written.
    """

    def __init__(self, ann_file, image_root, transform, max_words=30, *, image_check="decode"):
        entries = [_parse_eval_entry(entry, f"{ann_file}[{i}]") for i, entry in enumerate(read_annotation(ann_file))]
        if not entries:
            raise InputError(f"{ann_file} has no examples")
        self.image_ids = _unique_image_ids(entries, ann_file)
        self.text, self.img2txt, self.txt2img = [], [], []
        for image, entry in enumerate(entries):
            self.img2txt.append(list(range(len(self.text), len(self.text) + len(entry["caption"]))))
            self.txt2img += [image] * len(entry["caption"])
            self.text += [pre_caption(caption, max_words) for caption in entry["caption"]]
        _check_eval_texts(self.text, self.img2txt, ann_file)
        self.image_paths = [os.path.join(image_root, entry["image"]) for entry in entries]
        check_image_files(self.image_paths, lambda path: [path], ann_file, image_root, skip_missing=False,
                          skippable=False, image_check=image_check)
        self.ann_file, self.transform = ann_file, transform

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        return self.transform(load_image(self.image_paths[index], index, self.ann_file)), index


def eval_sets(data_cfg, image_size):
    """{"val", "test": RetrievalDataset} of a CaptionDataConfig, for the splits whose file is set."""
    files = {"val": data_cfg.val_file, "test": data_cfg.test_file}
    return {split: RetrievalDataset(path, data_cfg.image_root, eval_transform(image_size), data_cfg.eval_max_words)
            for split, path in files.items() if path}


def _read_source(source, max_words, skip_missing_images, skip_empty_text, image_check):
    """The usable entries of one source: {"image": full path, "caption" (cleaned), "raw_id", "ann_file"}."""
    placed = [(where, _parse_train_entry(entry, where, source, max_words))
              for where, entry in read_entries(source.ann_file)]
    entries = drop_empty_texts(placed, "caption", source.ann_file, skip_empty_text)
    entries = check_image_files(entries, lambda e: [e["image"]], source.ann_file, source.image_root,
                                skip_missing_images, image_check=image_check)
    if not entries:
        raise InputError(f"{source.ann_file} has no usable examples")
    return entries


def _parse_train_entry(entry, where, source, max_words):
    _check_fields(entry, where, "image, caption[, image_id]")
    if not isinstance(entry["caption"], str):
        raise InputError(f"{where}: 'caption' must be a string; got {entry['caption']!r:.80}")
    raw_id = entry.get("image_id", entry["image"])
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise InputError(f"{where}: 'image_id' must be a string or an integer; got {raw_id!r:.80}")
    return {"image": os.path.join(source.image_root, entry["image"]),
            "caption": pre_caption(entry["caption"], max_words), "raw_id": raw_id, "ann_file": source.ann_file}


def _parse_eval_entry(entry, where):
    _check_fields(entry, where, "image, caption (a list of strings)")
    captions = [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
    if not (isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions)):
        raise InputError(f"{where}: 'caption' must be a string or a non-empty list of strings; got "
                         f"{entry['caption']!r:.80}")
    image_id = entry.get("image_id")
    if image_id is not None and (isinstance(image_id, bool) or not isinstance(image_id, (str, int))):
        raise InputError(f"{where}: 'image_id' must be a string or an integer; got {image_id!r:.80}")
    return {"image": entry["image"], "caption": captions, "image_id": image_id}


def _check_eval_texts(texts, img2txt, ann_file):
    """An image all of whose captions are empty after cleaning is an InputError: text-to-image retrieval has no
    query for it and image-to-text recall no rank. Single empty captions are kept with a warning, as the original
    evaluation keeps them: the texts stay the file's, so recall compares with other evaluations of that file."""
    silent = [f"{ann_file}[{image}]" for image, captions in enumerate(img2txt) if not any(texts[t] for t in captions)]
    if silent:
        raise InputError(f"{ann_file}: {len(silent)} images have only captions that are empty after cleaning "
                         f"(pre_caption), e.g. {', '.join(silent[:FIRST])}; an evaluation image needs a caption: "
                         "write one or remove the entries")
    empty = [f"{ann_file}[{image}] caption {t - captions[0]}" for image, captions in enumerate(img2txt)
             for t in captions if not texts[t]]
    if empty:
        log(f"warning: {ann_file}: {len(empty)} of {len(texts)} captions are empty after cleaning, e.g. "
            f"{', '.join(empty[:FIRST])}; kept (as the original evaluation does), they count as retrieval queries")


def _check_fields(entry, where, expected):
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with {expected}; got {entry!r:.80}")
    for name in ("image", "caption"):
        if name not in entry:
            raise InputError(f"{where}: missing field '{name}'")
    if not isinstance(entry["image"], str):
        raise InputError(f"{where}: 'image' must be an image path; got {entry['image']!r:.80}")


def _unique_image_ids(entries, ann_file):
    ids = [entry["image_id"] if entry["image_id"] is not None else _id_from_path(entry["image"]) for entry in entries]
    first = {}
    for index, image_id in enumerate(ids):
        if first.setdefault(image_id, index) != index:
            raise InputError(f"{ann_file}[{first[image_id]}] and [{index}] have the same image id {image_id!r} (from "
                             f"'image_id' or the file name); caption evaluation needs one id per image: give each "
                             f"entry a distinct 'image_id'")
    return ids


def _id_from_path(path):
    tail = os.path.splitext(os.path.basename(path))[0].rsplit("_", 1)[-1]
    return int(tail) if re.fullmatch(r"[0-9]+", tail) else path
