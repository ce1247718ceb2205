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
from typing import Literal, Optional, Union

import torch
from torch.utils.data import ConcatDataset, Dataset

from data.loader import LoaderConfig
from data.shards import MixtureStream, ShardSource
from data.transforms import eval_transform, train_transform
from data.utils import (FIRST, InputChecks, check_image_files, drop_empty_texts, load_image, pre_caption,
                        read_annotation, read_entries)
from data.vqa import DEFAULT_PROMPT, VQASplitConfig, VQATrainDataset, read_vqa_split
from utils import Count, InputError, PositiveFloat, UnitInterval, UnitRange, log


# The image-caption instructions of LAVIS's blip_instruction processor (X-InstructBLIP; lavis/processors/
# instruction_text_processors.py TEMPLATES["image"]["caption"], its first 14): InstructBLIP's own templates were not
# released. LAVIS lower-cases the template it draws, as CaptionDataset does.
CAPTION_INSTRUCTIONS = (
    "A short caption:", "A short description:", "A short image caption:", "A short image description:", "A photo of",
    "A photo that shows", "A picture of", "A picture that shows", "An image of", "An image that shows",
    "Write a short description.", "Write a description for the image.",
    "Provide a description of what is presented in the image.", "Briefly describe the content of the image.")


@dataclass
class CaptionSource:
    """One annotation file of image-caption pairs (or instruction pairs: {"image", "text_input", "text_output"})."""
    ann_file: str
    image_root: str = "."
    # instruction templates, one drawn at random as each caption's text_input; "lavis": CAPTION_INSTRUCTIONS
    instructions: Optional[Union[Literal["lavis"], list[str]]] = None
    weight: PositiveFloat = 1.0               # share in a mixture with shards (data.shards.MixtureStream)


@dataclass
class CaptionDataConfig(LoaderConfig, InputChecks):
    """The `data:` section of the BLIP-2 configs: training (stage 1 and 2), retrieval, caption and VQA evaluation."""
    # Caption files, VQA splits (stage 2) and webdataset shards; with shards (or weights) a mixture stream
    train: list[Union[CaptionSource, VQASplitConfig, ShardSource]] = field(default_factory=list)
    prefix_lm: bool = False                   # stage 2: captions split at a random word into text_input / text_output
    val_file: Optional[str] = None            # Karpathy format: [{"image", "caption": [...]}]; training needs it
    test_file: Optional[str] = None
    val_gt_file: Optional[str] = None         # caption metrics: COCO-format ground truth (coco_karpathy_val_gt.json);
    test_gt_file: Optional[str] = None        # null: the captions of val_file / test_file
    image_root: str = "."                     # of the val and test images
    max_words: Count = 50                     # training captions
    eval_max_words: Count = 30                # retrieval texts
    crop_scale: UnitRange = (0.5, 1.0)
    hflip: bool = True
    augment: bool = True                      # false: training images get the evaluation transform (resize only)
    vit_feature_cache: Optional[str] = None   # dir of frozen-encoder outputs, built once; needs augment: false
    vqa_val: Optional[VQASplitConfig] = None  # VQA evaluation splits (eval_vqa.py; stage 2 validates on vqa_val)
    vqa_test: Optional[VQASplitConfig] = None
    vqa_prompt: str = DEFAULT_PROMPT          # the question's place in the LM's input, VQA training and evaluation
    max_bad_fraction: UnitInterval = 0.1      # web shards: the share of unusable samples that stops the run


class CaptionDataset(Dataset):
    """Items: (image [3, S, S], text_input, text_output, image_id).

    text_output is the caption; text_input is `prompt` (empty by default), or for an instruction pair the file's
    text_input, or with the source's `instructions` one of them drawn at random; with `prefix_lm` a caption without
    text_input is split at a random word into a prefix (after `prompt`) and the rest (BLIP-2's prefix-LM objective
    for T5). image_id numbers the distinct images 0..num_images-1 in first-seen order over all sources. Captions of
    one image share its id; the same raw id in two sources is two images (COCO's "coco_1" and a custom file's
    "coco_1" are unrelated). Captions empty after cleaning are an InputError, or with `skip_empty_text` skipped
    with a warning; `image_check`: see data.utils.check_image_files.
    """

    def __init__(self, sources, transform, max_words=50, skip_missing_images=False, *, skip_empty_text=False,
                 image_check="decode", prompt="", prefix_lm=False):
        if not sources:
            raise InputError("CaptionDataset needs at least one annotation file")
        self.entries, ids = [], {}
        for number, source in enumerate(sources):
            for entry in _read_source(source, max_words, skip_missing_images, skip_empty_text, image_check):
                key = (number, entry.pop("raw_id"))
                entry["image_id"] = ids.setdefault(key, len(ids))
                self.entries.append(entry)
        self.num_images, self.transform = len(ids), transform
        self.prompt, self.prefix_lm = prompt, prefix_lm

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        entry = self.entries[index]
        image = load_image(entry["image"], index, entry["ann_file"])
        return self.transform(image), *self.texts(index)

    def texts(self, index):
        """(text_input, text_output, image_id) of item `index`, drawing what is random with torch's generator."""
        entry = self.entries[index]
        text_input, text_output = entry["text_input"], entry["caption"]
        if entry["instructions"]:
            text_input = entry["instructions"][int(torch.randint(len(entry["instructions"]), ()))].lower()
        elif self.prefix_lm and not text_input:
            words = text_output.split(" ")
            cut = int(torch.randint(len(words), ()))  # the prefix has 0 .. n-1 words, the target at least one
            text_input, text_output = " ".join(words[:cut]), " ".join(words[cut:])
        return prompted(self.prompt, text_input), text_output, entry["image_id"]


def caption_train_set(data_cfg, image_size, prompt="", seed=0):
    """The training set of a CaptionDataConfig, with BLIP-2's training transform (no RandAugment), or with
    `augment` false the evaluation transform: its caption files (one CaptionDataset, `prompt` as text_input) and
    VQA splits (data.vqa.VQATrainDataset each, prompted with `vqa_prompt`) together, read in epochs; or, when it
    lists webdataset shards or weights other than 1, a data.shards.MixtureStream of all of them drawn by weight
    (seeded by `seed`; read for train.max_steps). Training also needs a validation split: `val_file` (captions)
    or `vqa_val`."""
    d = data_cfg
    if not d.train or not (d.val_file or d.vqa_val):
        raise InputError("training needs data.train, the training sources ({ann_file, image_root} each, VQA "
                         "splits or shards), and data.val_file or data.vqa_val, the split that picks the best epoch")
    transform = (train_transform(image_size, d.crop_scale, randaugment=False, hflip=d.hflip) if d.augment else
                 eval_transform(image_size))
    if any(isinstance(s, ShardSource) or getattr(s, "weight", 1.0) != 1.0 for s in d.train):
        parts = [source if isinstance(source, ShardSource) else
                 (vqa_train_set(source, transform, d), 1.0) if isinstance(source, VQASplitConfig) else
                 (caption_set([source], transform, d, prompt), source.weight) for source in d.train]
        log(f"train: a stream of {len(parts)} sources drawn by weight")
        return MixtureStream(parts, transform, seed, text_input=prompted(prompt, ""), max_words=d.max_words,
                             max_bad_fraction=d.max_bad_fraction)
    captions = [s for s in d.train if isinstance(s, CaptionSource)]
    parts = [caption_set(captions, transform, d, prompt)] if captions else []
    parts += [vqa_train_set(source, transform, d) for source in d.train if isinstance(source, VQASplitConfig)]
    dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    log(f"train: {len(dataset)} pairs " + ", ".join(f"({len(p)} from {p.num_images} images)" for p in parts))
    return dataset


def caption_set(sources, transform, data_cfg, prompt):
    d = data_cfg
    return CaptionDataset(sources, transform, d.max_words, d.skip_missing_images, prompt=prompt,
                          skip_empty_text=d.skip_empty_text, image_check=d.image_check, prefix_lm=d.prefix_lm)


def training_texts(dataset):
    """(text_inputs, text_outputs) that a training set from caption_train_set feeds (templates and prompts as they
    are, every answer of a VQA question), for the start-up check of the tokenizers."""
    if isinstance(dataset, (ConcatDataset, MixtureStream)):  # a stream's shards are not read here
        parts = [training_texts(part) for part in dataset.datasets]
        return [t for inputs, _ in parts for t in inputs], [t for _, outputs in parts for t in outputs]
    if isinstance(dataset, VQATrainDataset):
        return dataset.text_inputs, [answer for choices in dataset.answer_choices for answer in choices]
    inputs = [prompted(dataset.prompt, t) for e in dataset.entries for t in (e["instructions"] or [e["text_input"]])]
    return inputs, [e["caption"] for e in dataset.entries]


def vqa_train_set(source, transform, data_cfg):
    """A VQATrainDataset of a VQA training split, its images checked as the caption sources' are."""
    questions = read_vqa_split(source)
    questions = check_image_files(questions, lambda q: [q["image"]], source.questions, source.image_root,
                                  data_cfg.skip_missing_images, image_check=data_cfg.image_check)
    return VQATrainDataset(questions, transform, data_cfg.vqa_prompt)


def prompted(prompt, text):
    """`text` placed in `prompt`: at its "{}" when it has one ("Question: {} Short answer:"), else after it."""
    if "{}" in prompt:
        return prompt.format(text)
    return " ".join(part for part in (prompt, text) if part)


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
    return {split: RetrievalDataset(path, data_cfg.image_root, eval_transform(image_size), data_cfg.eval_max_words,
                                    image_check=data_cfg.image_check)
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
    """{"image", "caption", "text_input", ...} of a caption entry {"image", "caption"[, "image_id"]} or an
    instruction pair {"image", "text_input", "text_output"[, "image_id"]} (its text_input kept as written, its
    text_output cleaned as a caption is)."""
    pair = isinstance(entry, dict) and "text_output" in entry
    texts = ("text_input", "text_output") if pair else ("caption",)
    _check_fields(entry, where, texts, "image, text_input, text_output[, image_id]" if pair
                  else "image, caption[, image_id]")
    for name in texts:
        if not isinstance(entry[name], str):
            raise InputError(f"{where}: '{name}' must be a string; got {entry[name]!r:.80}")
    raw_id = entry.get("image_id", entry["image"])
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise InputError(f"{where}: 'image_id' must be a string or an integer; got {raw_id!r:.80}")
    return {"image": os.path.join(source.image_root, entry["image"]), "raw_id": raw_id, "ann_file": source.ann_file,
            "caption": pre_caption(entry[texts[-1]], max_words), "text_input": entry["text_input"].strip() if pair
            else "", "instructions": CAPTION_INSTRUCTIONS if source.instructions == "lavis" else source.instructions}


def _parse_eval_entry(entry, where):
    _check_fields(entry, where, ("caption",), "image, caption (a list of strings)")
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


def _check_fields(entry, where, texts, expected):
    if not isinstance(entry, dict):
        raise InputError(f"{where}: expected an object with {expected}; got {entry!r:.80}")
    for name in ("image", *texts):
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
