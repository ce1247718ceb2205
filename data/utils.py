"""Annotation reading, caption cleaning and the start-up check of image files, shared by every dataset."""

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor

from PIL import Image, UnidentifiedImageError

from utils import InputError, broadcast_from_main, log


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


def check_image_files(entries, image_paths, ann_file, image_root, skip_missing, skippable=True):
    """Entries whose images (`image_paths(entry)` -> list of paths) can all be opened.

    Every distinct file is checked once, on rank 0 (header only, so the check stays fast). Missing or unreadable
    files raise one InputError with their count and the first few, unless `skip_missing`: then the entries that
    use them are dropped with a warning. `skippable=False` is for evaluation sets, which are never thinned (their
    scores would no longer compare with others').
    """
    paths = sorted({p for entry in entries for p in image_paths(entry)})
    bad = dict(broadcast_from_main(lambda: _find_bad_images(paths)))
    if not bad:
        return entries
    first = "; ".join(f"{path} ({reason})" for path, reason in list(bad.items())[:5])
    if not skip_missing:
        fix = ("or set data.skip_missing_images: true to drop the examples that use them" if skippable else
               "an evaluation set must be complete (skip_missing_images does not apply to it)")
        raise InputError(f"{ann_file}: {len(bad)} of {len(paths)} images are missing or unreadable under "
                         f"image_root {image_root}, e.g. {first}. Fix data.image_root or the files; {fix}")
    kept = [entry for entry in entries if not any(p in bad for p in image_paths(entry))]
    log(f"warning: {ann_file}: skipping {len(entries) - len(kept)} of {len(entries)} examples whose images are "
        f"missing or unreadable ({len(bad)} files, e.g. {first})")
    return kept


def _find_bad_images(paths):
    """[(path, "missing" | "unreadable: ..."), ...] for the paths that cannot be opened (headers only, threaded)."""
    def check(path):
        try:
            with Image.open(path):
                return None
        except FileNotFoundError:
            return path, "missing"
        except (UnidentifiedImageError, OSError) as e:
            return path, f"unreadable: {type(e).__name__}"

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as pool:
        return [result for result in pool.map(check, paths) if result]
