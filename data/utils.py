"""Annotation reading, caption cleaning, empty-text handling and image files (the start-up check and the loading),
shared by every dataset."""

import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError

from utils import InputError, all_gather_object, get_rank, get_world_size, log

IMAGE_CHECKS = ("decode", "header")   # decode every image in full, or open only its header (faster, misses truncation)
SUMMARY_FROM = 1000                   # image checks of at least this many files log a summary line
FIRST = 5                             # places named in one message


@dataclass(kw_only=True)
class InputChecks:
    """The `data:` keys of the start-up checks of the annotation and image files."""
    image_check: Literal["decode", "header"] = "decode"  # decode every image in full, or read headers only
    skip_missing_images: bool = False         # drop training examples whose images cannot be loaded, with a warning
    skip_empty_text: bool = False             # drop training examples whose text is empty after cleaning
    allow_unknown_tokens: bool = False        # train even when the tokenizer knows few of the training words


def pre_caption(caption, max_words=50):
    """BLIP's caption cleaning: lower-case, `. ! " ( ) * # : ; ~` become spaces, whitespace runs collapse to one
    space, then the first `max_words` words."""
    caption = re.sub(r"[.!\"()*#:;~]", " ", caption.lower())
    caption = re.sub(r"\s+", " ", caption).strip()
    return " ".join(caption.split(" ")[:max_words])


def read_json(path, what):
    """The content of the JSON file `path`; a missing or broken file is an InputError naming `what` it is."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path} is not valid JSON: {e}") from None


def read_annotation(path):
    """The list of entries of a JSON annotation file."""
    entries = read_json(path, "annotation file")
    if not isinstance(entries, list):
        raise InputError(f"annotation file {path} must hold a JSON list of entries; it holds a "
                         f"{type(entries).__name__}")
    return entries


def read_entries(path):
    """[(where, entry)] of a JSON list file or a `.jsonl` file (one object per line), `where` naming the entry for
    error messages: "file[index]", or "file line n" for JSONL."""
    if not path.endswith(".jsonl"):
        return [(f"{path}[{i}]", entry) for i, entry in enumerate(read_annotation(path))]
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except FileNotFoundError:
        raise InputError(f"annotation file {path} does not exist") from None
    entries = []
    for number, line in enumerate(lines, 1):
        if line.strip():  # blank lines, such as a trailing one, hold no entry
            try:
                entries.append((f"{path} line {number}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {number} is not valid JSON: {e}") from None
    return entries


def drop_empty_texts(placed, field, ann_file, skip):
    """The entries of `placed` [(where, entry)] whose `entry[field]`, a text already cleaned by pre_caption, is not
    empty. Empty ones raise one InputError with their count and first places, unless `skip`: then they are
    dropped with one warning line saying the same."""
    empty = [where for where, entry in placed if not entry[field]]
    if not empty:
        return [entry for _, entry in placed]
    first = ", ".join(empty[:FIRST])
    if not skip:
        raise InputError(f"{ann_file}: {len(empty)} of {len(placed)} entries have a {field} that is empty after "
                         f"cleaning (pre_caption keeps no . ! \" ( ) * # : ; ~ or spaces), e.g. {first}. Write the "
                         f"{field}s or remove the entries, or set data.skip_empty_text: true to skip them")
    log(f"warning: {ann_file}: skipping {len(empty)} of {len(placed)} entries whose {field} is empty after "
        f"cleaning, e.g. {first}")
    return [entry for _, entry in placed if entry[field]]


def check_image_files(entries, image_paths, ann_file, image_root, skip_missing, skippable=True, *,
                      image_check="decode"):
    """Entries whose images (`image_paths(entry)` -> list of paths) can all be loaded.

    Every distinct file is checked once (see find_bad_images; every process of a process group must call this).
    Bad files (missing, zero bytes, not an image, truncated, ...) are each logged with the reason and raise one
    InputError with their count, unless `skip_missing`: then the entries that use any of them are dropped with a
    warning. `skippable=False` is for evaluation sets, which are never thinned (their scores would no longer
    compare with others'). `image_check`: "decode" decodes each image in full, "header" reads only its header
    (fast on huge curated sets, but a truncated file then fails only when training reads it).
    """
    if image_check not in IMAGE_CHECKS:
        raise InputError(f"image_check must be one of {', '.join(IMAGE_CHECKS)}; got {image_check!r}")
    paths = sorted({p for entry in entries for p in image_paths(entry)})
    start = time.perf_counter()
    bad = find_bad_images(paths, decode=image_check == "decode")
    if len(paths) >= SUMMARY_FROM:
        log(f"{ann_file}: checked {len(paths)} image files ({'decoded' if image_check == 'decode' else 'headers'}, "
            f"{get_world_size()} processes) in {time.perf_counter() - start:.1f} s: {len(bad)} bad")
    if not bad:
        return entries
    for path, reason in bad.items():
        log(f"bad image: {path}: {reason}")
    reasons = Counter(reason.split(":")[0] for reason in bad.values())
    summary = (f"{ann_file}: {len(bad)} of {len(paths)} images are missing or unreadable under image_root "
               f"{image_root} ({', '.join(f'{n} {reason}' for reason, n in reasons.most_common())}; each is listed "
               f"above), e.g. {'; '.join(f'{path} ({reason})' for path, reason in list(bad.items())[:FIRST])}")
    if not skip_missing:
        fix = ("or set data.skip_missing_images: true to drop the examples that use them" if skippable else
               "an evaluation set must be complete (skip_missing_images does not apply to it)")
        raise InputError(f"{summary}. Fix data.image_root or the files; {fix}")
    kept = [entry for entry in entries if not any(p in bad for p in image_paths(entry))]
    log(f"warning: {summary}; skipping {len(entries) - len(kept)} of {len(entries)} examples that use them")
    return kept


def find_bad_images(paths, decode=True):
    """{path: reason} of the files among `paths` that cannot be loaded (`decode`: decoded in full, else opened by
    their header), in the order of `paths`; the same on every process.

    With a process group each process checks every W-th path, each with a pool of threads (PIL decodes without
    holding the GIL), and the results are gathered: every process takes part.
    """
    shard = paths[get_rank()::get_world_size()]
    with ThreadPoolExecutor() as pool:
        problems = {path: reason for path, reason in zip(shard, pool.map(lambda p: image_problem(p, decode), shard))
                    if reason}
    found = {path: reason for part in all_gather_object(problems) for path, reason in part.items()}
    return {path: found[path] for path in paths if path in found}


def image_problem(path, decode=True):
    """Why the image file `path` cannot be loaded ("missing", "zero bytes", "truncated: ...", ...), or None."""
    try:
        if os.path.getsize(path) == 0:
            return "zero bytes"
        with Image.open(path) as image:
            if decode:
                image.load()
    except Exception as e:  # a check reports every failure instead of stopping at one
        return _reason(e)
    return None


def load_image(path, index, ann_file=None):
    """The image file `path` of dataset item `index` (from annotation file `ann_file`) decoded, as RGB.

    A file that fails here passed the start-up check: it changed since, or was checked by its header only
    (image_check "header"), so the InputError names it, the item and the fix.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as e:
        source = f" of {ann_file}" if ann_file else ""
        raise InputError(f"image {path} (dataset item {index}{source}) cannot be loaded: {_reason(e)}. It passed "
                         "the start-up check, so it changed since or only its header was checked "
                         "(data.image_check: header): restore or replace the file, or remove its entry, then "
                         "restart (training continues from checkpoint_last.pth with --resume)") from None


def _reason(error):
    """A short reason for an exception raised while opening or decoding an image file."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, IsADirectoryError):
        return "a directory, not a file"
    if isinstance(error, PermissionError):
        return "unreadable: permission denied"
    if isinstance(error, UnidentifiedImageError):
        return "unreadable: not an image format PIL knows"
    if isinstance(error, OSError) and "truncated" in str(error):
        return f"truncated: {error}"
    return f"undecodable: {type(error).__name__}: {error}"
