"""Web-scale caption data: webdataset tar shards mixed with JSON caption files into one endless training stream.

Shards are what img2dataset writes and LAVIS and open_clip read with webdataset: tar files of samples
{key}.jpg (or .png, .webp), {key}.txt (the caption) and/or {key}.json ({"caption", "url", ...}). A source names its
shards with brace patterns, such as /data/cc3m/{00000..00331}.tar (webdataset's expand_urls: braces, "::" between
patterns, ${WDS_*} variables); paths, file:, pipe: and http(s) URLs are read with webdataset's gopen.

MixtureStream is the training stream of several such sources and of map-style caption sets (a CaptionDataset of one
CaptionSource, a VQATrainDataset), each drawn with probability proportional to its weight, as LAVIS's sample_ratio.
Its loader (stream_train_loader) has no batch sampler: it is endless, and a run is planned in train.max_steps.
"""

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import random
from dataclasses import dataclass
from typing import Literal, Union
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset
from webdataset.autodecode import IMAGE_EXTENSIONS

from data.loader import sample_seed, seeded_generators
from data.utils import FIRST, pre_caption
from utils import InputError, PositiveFloat, all_reduce_sum, get_rank, get_world_size, log

# Why a shard sample is skipped (the keys of MixtureStream.skipped()).
SKIP_REASONS = ("missing image", "undecodable image", "missing caption", "undecodable caption", "empty caption",
                "tar error")
_COUNTERS = ("read", *SKIP_REASONS)
SHUFFLE_BUFFER = 1000   # samples in the shuffle buffer of each source and slot (LAVIS's wds.shuffle(1000))
IMAGE_DECODER = wds.imagehandler("pilrgb")  # PIL, converted to RGB as data.utils.load_image converts


@dataclass
class ShardSource:
    """One `data.train` entry of webdataset tar shards (img2dataset's layout)."""
    url: Union[str, list[str]]                # brace pattern(s) of the shards: /data/cc3m/{00000..00331}.tar
    weight: PositiveFloat = 1.0               # share of the mixture: weight / sum of the sources' weights
    # the caption: {key}.txt ("txt"), the "caption" of {key}.json ("json"), or txt where there is one, else json
    caption: Literal["auto", "txt", "json"] = "auto"


class Skipped(Exception):
    """A shard sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def image_id(source, key):
    """A 62-bit integer naming image `key` (a shard sample's url or key, a dataset's image id) of source number
    `source`: the same in every process and run (Python's hash() of a string is not)."""
    digest = hashlib.blake2b(f"{source}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


def parse_sample(sample, caption_field="auto", max_words=50):
    """(PIL image, caption cleaned by pre_caption, image key) of a webdataset sample {"__key__", "jpg", "txt", ...};
    raises Skipped with the reason when it cannot be used. The image key is the json's "url" where it has one
    (img2dataset records the image's source URL: two captions of one image are two samples with one url), else the
    sample key."""
    images = [name for name in sample if name in IMAGE_EXTENSIONS]
    if not images:
        raise Skipped("missing image")
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:  # UnicodeDecodeError is one
            raise Skipped("undecodable caption") from None
        if not isinstance(meta, dict):
            raise Skipped("undecodable caption")
    if "txt" in sample and caption_field != "json":
        try:
            text = sample["txt"].decode("utf-8")
        except UnicodeDecodeError:
            raise Skipped("undecodable caption") from None
    elif "caption" in meta and caption_field != "txt":
        text = meta["caption"]
        if not isinstance(text, str):
            raise Skipped("undecodable caption")
    else:
        raise Skipped("missing caption")
    caption = pre_caption(text, max_words)
    if not caption:
        raise Skipped("empty caption")
    try:
        image = IMAGE_DECODER(images[0], sample[images[0]])
    except Exception:  # web images fail in many ways (truncated, not an image, bomb, bad mode): skip them all
        raise Skipped("undecodable image") from None
    return image, caption, meta["url"] if isinstance(meta.get("url"), str) else sample["__key__"]


class _Shards:
    """A ShardSource in the mixture: its shards are the units split over the loader slots."""
    unit = "shards"

    def __init__(self, source, number, stream):
        self.number, self.stream, self.caption_field = number, stream, source.caption
        self.weight, self.name = source.weight, f"data.train[{number}] ({source.url})"
        patterns = [source.url] if isinstance(source.url, str) else source.url
        self.urls = [url for pattern in patterns for url in wds.shardlists.expand_urls(pattern)]
        _check_urls(self.urls, self.name)

    def __len__(self):
        return len(self.urls)

    def samples(self, slot, slots, rng):
        """The raw samples of one pass over this slot's shards, the shards in an order drawn from `rng`, the samples
        through a shuffle buffer drawing from it."""
        urls = self.urls[slot::slots]
        rng.shuffle(urls)
        return wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=self.tar_error),
                                wds.shuffle(self.stream.shuffle_buffer, rng=rng))

    def item(self, sample):
        image, caption, key = parse_sample(sample, self.caption_field, self.stream.max_words)
        return self.stream.transform(image), self.stream.text_input, caption, image_id(self.number, key)

    def tar_error(self, error):
        """webdataset's handler of errors in opening and reading shards: count, report, go on."""
        self.stream.count("tar error")
        detail = "; ".join(map(str, error.args))  # webdataset appends the shard's stream and url to the args
        print(f"warning: rank {get_rank()}: {self.name}: {type(error).__name__}: {detail}; skipped", flush=True)
        return True


class _Examples:
    """A map-style dataset in the mixture: its examples are the units split over the loader slots."""
    unit = "examples"

    def __init__(self, dataset, weight, number):
        self.dataset, self.weight, self.number = dataset, weight, number
        self.name = f"data.train[{number}] ({len(dataset)} examples)"

    def __len__(self):
        return len(self.dataset)

    def samples(self, slot, slots, rng):
        """The indices of this slot's examples in an order drawn from `rng`."""
        indices = list(range(slot, len(self.dataset), slots))
        rng.shuffle(indices)
        return indices

    def item(self, index):
        image, text_input, text_output, key = self.dataset[index]
        return image, text_input, text_output, image_id(self.number, key)


class MixtureStream(IterableDataset):
    """The endless training stream of `sources`: items (image [3, S, S], text_input, text_output, image_id) as
    data.caption.CaptionDataset's.

    `sources`, in data.train's order (errors name them data.train[i]): ShardSource entries, and (dataset, weight)
    pairs of map-style datasets with such items, e.g. a CaptionDataset of one CaptionSource (weight: its
    CaptionSource.weight), built by the caller as caption_train_set builds it, so that it has made the curated
    files' strict start-up checks. Shard captions are cleaned by pre_caption(`max_words`) and their text_input is
    `text_input` (prompted(prompt, "") for captions); their image is decoded as RGB and passed through
    `transform`; they are used whole (data.prefix_lm and instructions apply to the datasets only). image_id is
    image_id(source number, image key): a shard sample's json "url" or its key, a dataset's own image id; equal
    ids make the stage-1 ITC positives.

    Slots: each loader worker of each process reads its own share, slot rank + world_size x worker of world_size x
    workers (utils.get_rank/get_world_size at iteration time; workers must be forked from the process, as
    DataLoader's are on Linux). Shard i of a source goes to slot i mod slots (as webdataset's split_by_node then
    split_by_worker assign them), example i of a dataset likewise, so that over one pass every sample of a source
    is read exactly once over all slots. A source with fewer shards (examples) than slots is an InputError.

    Order: each source is a stream of passes. Pass p of source s in a slot reads the slot's shards in an order, and
    through a shuffle buffer of `shuffle_buffer` samples, drawn from random.Random seeded by (seed, start_step,
    slot, s, p) (a dataset: its examples in a shuffled order), then starts pass p + 1. Each item of a slot comes
    from source s with probability weight_s / sum of the weights, drawn independently by a generator seeded by
    (seed, start_step, slot). Each sample is loaded and augmented with torch's, numpy's and Python's generators
    seeded for it alone (data.loader.seeded_generators with sample_seed(pass seed, p, position in the pass)). So
    the stream is a function of (seed, start_step, processes, workers): the same for a fixed seed, number of
    processes and loader workers.

    Resume: a run resumed at step s (`start_step=s`) does not continue the interrupted passes: every source starts
    a fresh pass over all its shards (examples) in an order seeded by (seed, s) as well. Samples the interrupted
    passes had already given can come again before the others, those they had not given wait for the fresh pass,
    and the weights hold from the first batch on. Positions inside the tar streams are not kept: reaching them
    would mean reading the bytes again.

    Dirty data: a shard sample without an image, with an undecodable image, without a caption, with an undecodable
    or empty caption is skipped, as are the unreadable parts of a shard ("tar error", each reported with the
    shard); `skipped()` counts them by reason and `read()` counts the samples read (usable or not), over this
    process's loader workers, in shared memory. A slot whose shards give no usable sample in a whole pass is an
    InputError (it would never yield). Datasets keep their own strictness: an image that fails there raises. A
    tar cut at a member boundary reads as a shorter tar (Python's tarfile cannot tell the two apart), so the samples
    it lost are not counted.
    """

    def __init__(self, sources, transform, seed, *, start_step=0, text_input="", max_words=50,
                 shuffle_buffer=SHUFFLE_BUFFER, max_bad_fraction=1.0):
        if not sources:
            raise InputError("a training stream needs at least one source in data.train")
        self.parts = [_Shards(source, number, self) if isinstance(source, ShardSource) else _Examples(*source, number)
                      for number, source in enumerate(sources)]
        weights = np.array([part.weight for part in self.parts], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self.datasets = [part.dataset for part in self.parts if isinstance(part, _Examples)]
        self.transform, self.seed, self.start_step = transform, seed, start_step
        self.text_input, self.max_words, self.shuffle_buffer = text_input, max_words, shuffle_buffer
        self.max_bad_fraction = max_bad_fraction
        # Made here, in the main process: the forked loader workers inherit the shared memory and add to it.
        self.counts = multiprocessing.Array("q", 1 + len(SKIP_REASONS))

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        world_size = get_world_size()
        self.check_slots(world_size, workers)
        slot, slots = get_rank() + world_size * worker, world_size * workers
        slot_seed = sample_seed(self.seed, self.start_step, slot)
        streams = [self._passes(part, slot, slots, slot_seed) for part in self.parts]
        draws = np.random.default_rng(slot_seed)
        while True:
            yield next(streams[draws.choice(len(streams), p=self.probabilities)])

    def _passes(self, part, slot, slots, slot_seed):
        """The endless items of `part` in `slot`: pass after pass, skipped samples counted."""
        for pass_number in itertools.count():
            pass_seed = sample_seed(slot_seed, part.number, pass_number)
            used = 0
            for position, sample in enumerate(part.samples(slot, slots, random.Random(pass_seed))):
                self.count("read")
                try:
                    with seeded_generators(sample_seed(pass_seed, pass_number, position)):
                        item = part.item(sample)
                except Skipped as skip:
                    self.count(skip.reason)
                    continue
                used += 1
                yield item
            if not used:
                raise InputError(f"{part.name}: the {part.unit} of loader slot {slot} of {slots} gave no usable "
                                 f"sample in a whole pass (skipped so far: {self.skipped()}); check the shards")

    def check_slots(self, world_size, workers):
        """InputError when a source has fewer shards (or examples) than world_size x workers slots: a slot would
        have nothing to read."""
        workers = max(workers, 1)
        slots = world_size * workers
        for part in self.parts:
            if len(part) < slots:
                fewer = (f"lower data.num_workers to {len(part) // world_size} or " if len(part) >= world_size
                         else "")
                raise InputError(f"{part.name} has {len(part)} {part.unit} for {slots} loader slots ({world_size} "
                                 f"processes x {workers} loader workers), and every slot reads {part.unit} of its "
                                 f"own: {fewer}write the source in at least {slots} {part.unit}")

    def count(self, name):
        """Add one to counter `name` ("read" or a skip reason)."""
        with self.counts.get_lock():
            self.counts[_COUNTERS.index(name)] += 1

    def read(self):
        """Samples read by this process's loader workers (usable or not)."""
        return self.counts[0]

    def skipped(self):
        """{reason: samples skipped} by this process's loader workers."""
        with self.counts.get_lock():
            return dict(zip(SKIP_REASONS, self.counts[1:]))

    def health(self):
        """{"samples_read", "samples_skipped": {reason: count}} over all processes since they started (a resumed
        run counts afresh), with a log line when some were skipped; InputError when the skipped share exceeds
        `max_bad_fraction` (data.max_bad_fraction). Every rank calls it, at the same steps: the train loop's
        records."""
        with self.counts.get_lock():
            counts = all_reduce_sum(torch.tensor(list(self.counts), dtype=torch.float64)).long().tolist()
        read, skipped = counts[0], dict(zip(SKIP_REASONS, counts[1:]))
        bad = sum(skipped.values())
        if bad:
            listed = ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)
            log(f"web data: {bad} of {read} samples read so far were skipped ({listed})")
        if read and bad / read > self.max_bad_fraction:
            raise InputError(f"{bad} of the {read} samples read from the training shards ({bad / read:.1%}) were "
                             f"unusable ({skipped}), more than data.max_bad_fraction {self.max_bad_fraction}: check "
                             "the shards (or raise data.max_bad_fraction)")
        return {"samples_read": read, "samples_skipped": skipped}


def stream_train_loader(stream, batch_size, **loader_kwargs):
    """Endless batches of `stream` (a MixtureStream), `batch_size` items each, every batch from one loader worker.
    No sampler: a loader without `batch_sampler`, which the train loop runs for train.max_steps. Iterate it once:
    every iteration starts the stream afresh (from its seed and start_step). `loader_kwargs`:
    LoaderConfig.loader_kwargs or DataLoader's own."""
    stream.check_slots(get_world_size(), loader_kwargs.get("num_workers", 0))
    # Its own generator: the workers' base seed must not be drawn from (and so shift) the process's torch stream.
    return DataLoader(stream, batch_size=batch_size, drop_last=True,
                      generator=torch.Generator().manual_seed(stream.seed), **loader_kwargs)


def _check_urls(urls, name):
    """InputError when a source names no shards, a shard twice, or local shard files that do not exist."""
    if not urls:
        raise InputError(f"{name}: the pattern names no shards")
    repeated = [url for url, n in collections.Counter(urls).items() if n > 1]
    if repeated:
        raise InputError(f"{name} names {len(repeated)} shards more than once, e.g. {', '.join(repeated[:FIRST])}: "
                         "each would be read several times per pass; fix the patterns")
    local = [parsed for parsed in map(urlparse, urls) if parsed.scheme in ("", "file")]
    missing = [parsed.path for parsed in local if not os.path.isfile(parsed.path)]
    if missing:
        raise InputError(f"{name}: {len(missing)} of {len(urls)} shard files do not exist, e.g. "
                         f"{', '.join(missing[:FIRST])}; fix the url pattern (or write the shards)")
