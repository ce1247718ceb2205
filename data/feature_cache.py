"""A cache of the frozen image encoder's outputs, for BLIP-2 training without image augmentation.

With `data.augment: false` each training image is only resized, so a frozen encoder gives it the same tokens every
epoch: `build_feature_cache` computes them once into a directory and `FeatureCacheDataset` reads them back in place
of the images. The directory holds

    tokens.bin   the tokens [num_images, N, Dv] (row = image_id) as the raw bytes of the encoder's output dtype
    meta.json    {"shape", "dtype", "fingerprint": {"images", "image_size", "amp", "encoder_sha256"}}

meta.json is written last, so a directory without it holds no usable cache. A cache whose fingerprint differs from
the run's (other image files, image size, autocast or encoder weights) is rebuilt, never read.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from data.caption import CaptionDataset
from data.loader import eval_loader, train_loader
from data.shards import MixtureStream, stream_train_loader
from data.transforms import eval_transform
from data.utils import load_image
from utils import (Autocast, InputError, MetricLogger, attention_kernels, barrier, broadcast_from_main,
                   is_main_process, log)

TOKENS, META = "tokens.bin", "meta.json"
PRINT_FREQ = 50                               # batches between progress lines while encoding
FINGERPRINT_NAMES = {"images": "image files (paths, sizes or modification times)", "image_size": "image size",
                     "amp": "autocast (train.amp)", "encoder_sha256": "encoder weights"}


def caption_train_loader(state, train_set):
    """The training loader of the stage-1/2 run of `state` (a utils.TrainState, so call it once the model holds the
    weights training starts from): `train_set` in seeded epochs, or with data.vit_feature_cache the frozen
    encoder's cached tokens in place of its images; a MixtureStream (shards, weighted sources) endless from the
    step the run starts at."""
    run, cfg = state.run, state.cfg
    loader_kwargs = cfg.data.loader_kwargs(run.device)
    if isinstance(train_set, MixtureStream):
        if cfg.data.vit_feature_cache:
            raise InputError("data.vit_feature_cache caches the images of caption files; data.train is a stream "
                             "(shards or weights other than 1): remove data.vit_feature_cache")
        train_set.start_step = state.step
        return stream_train_loader(train_set, cfg.train.batch_size, **loader_kwargs)
    if cfg.data.vit_feature_cache:
        train_set = cached_train_set(run, state.model, train_set)
    return train_loader(train_set, cfg.train.batch_size, cfg.train.seed, **loader_kwargs)


def cached_train_set(run, model, train_set):
    """`train_set` (a CaptionDataset) of a stage-1/2 run with its images replaced by the frozen encoder's tokens
    from `data.vit_feature_cache`, built there first when missing or stale (`eval.batch_size` images per
    forward, under the run's autocast). Call it on every process once `model.visual_encoder` holds the weights
    training uses."""
    cfg, device = run.cfg, run.device
    if not isinstance(train_set, CaptionDataset):
        raise InputError("data.vit_feature_cache caches the images of caption sources; data.train also lists VQA "
                         "splits: remove them or data.vit_feature_cache")
    if cfg.data.augment:
        raise InputError("data.vit_feature_cache needs data.augment: false (augmented images differ every epoch, "
                         "their features cannot be cached); set data.augment: false or remove data.vit_feature_cache")
    if not cfg.model.freeze_vit:
        raise InputError("data.vit_feature_cache needs model.freeze_vit: true (a trained encoder's outputs change "
                         "every step); set model.freeze_vit: true or remove data.vit_feature_cache")
    loader_kwargs = {**cfg.data.loader_kwargs(device), "persistent_workers": False}  # one pass: keep no workers
    build_feature_cache(model.visual_encoder, train_set, cfg.data.vit_feature_cache, cfg.model.image_size,
                        cfg.eval.batch_size, device, run.autocast, cfg.train.attention, **loader_kwargs)
    return FeatureCacheDataset(train_set, cfg.data.vit_feature_cache)


def build_feature_cache(encoder, dataset, cache_dir, image_size, batch_size, device, autocast=None,
                        attention="auto", **loader_kwargs):
    """Make `cache_dir` hold `encoder`'s tokens [N, Dv] of every distinct image of `dataset` (a CaptionDataset),
    each image resized by `eval_transform(image_size)` and encoded under training's `autocast` (a utils.Autocast;
    None: fp32) and `attention` kernels; a cache there whose meta matches is reused. Returns the meta dict.

    Every process calls it: rank r encodes images r, r + W, ... (W processes) into the file rank 0 created, so
    `cache_dir` must be on a filesystem all of them see. `loader_kwargs`: DataLoader's.
    """
    paths = image_paths(dataset)
    autocast = autocast or Autocast(device, "fp32")
    _weights_from_main(encoder)
    with torch.no_grad(), autocast(), attention_kernels(attention):
        probe = encoder(torch.zeros(1, 3, image_size, image_size, device=device))
    meta = broadcast_from_main(lambda: {"shape": [len(paths), *probe.shape[1:]], "dtype": _dtype_name(probe.dtype),
                                        "fingerprint": fingerprint(encoder, paths, image_size, autocast.amp)})
    stale = broadcast_from_main(lambda: stale_reason(cache_dir, meta))
    if stale is None:
        log(f"feature cache {cache_dir}: reusing the encoder tokens of {len(paths)} images")
        return meta
    log(f"feature cache {cache_dir}: encoding {len(paths)} images ({stale})")
    problem = broadcast_from_main(lambda: _create_tokens_file(cache_dir, meta))
    if problem:  # raised on every rank, so that none waits at a barrier for rank 0
        raise InputError(problem)
    barrier()
    rows = _open_tokens(cache_dir, meta, "r+")
    # Its own generator: the pass must leave the global RNG, hence training, as a run without the cache finds it.
    loader = eval_loader(_ImageFiles(paths, eval_transform(image_size)), batch_size, generator=torch.Generator(),
                         **loader_kwargs)
    for images, index in MetricLogger().log_every(loader, PRINT_FREQ, "Feature cache"):
        with torch.no_grad(), autocast(), attention_kernels(attention):
            tokens = encoder(images.to(device, non_blocking=True))
        rows[index.numpy()] = tokens.contiguous().cpu().view(torch.uint8).numpy()
    rows.flush()
    barrier()  # every rank's rows are on disk before meta.json says the cache is complete
    if is_main_process():
        _write_json(meta, os.path.join(cache_dir, META))
    barrier()
    return meta


class FeatureCacheDataset(Dataset):
    """Items: (tokens [N, Dv] in the encoder's dtype, text_input, text_output, image_id): the items of `dataset` (a
    CaptionDataset), in its order, with each image replaced by its row of the cache in `cache_dir` (see
    build_feature_cache)."""

    def __init__(self, dataset, cache_dir):
        try:
            with open(os.path.join(cache_dir, META)) as f:
                self.meta = json.load(f)
        except FileNotFoundError:
            raise InputError(f"{cache_dir} holds no complete feature cache; build_feature_cache makes it") from None
        if [path for path, *_ in self.meta["fingerprint"]["images"]] != image_paths(dataset):
            raise InputError(f"the feature cache in {cache_dir} is of other images than the training set's; "
                             "build_feature_cache rebuilds it")
        self.dataset, self.num_images = dataset, dataset.num_images
        self.cache_dir, self.dtype = cache_dir, getattr(torch, self.meta["dtype"])
        self.rows = None  # mapped where it is read: in each DataLoader worker

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if self.rows is None:
            self.rows = _open_tokens(self.cache_dir, self.meta, "r")
        text_input, text_output, image_id = self.dataset.texts(index)
        row = np.array(self.rows[image_id])  # a copy: torch takes no read-only arrays
        return torch.from_numpy(row).view(self.dtype), text_input, text_output, image_id

    def __getstate__(self):
        # A worker started by pickling maps the file itself instead of receiving a copy of all of it.
        return {**self.__dict__, "rows": None}


def image_paths(dataset):
    """The image file of each image id of a CaptionDataset: [path of id 0, path of id 1, ...]."""
    paths = {}
    for entry in dataset.entries:
        first = paths.setdefault(entry["image_id"], entry["image"])
        if first != entry["image"]:
            raise InputError(f"captions of one image id name two files, {first} and {entry['image']}, but the "
                             "feature cache keeps one row per image id: give them different 'image_id' values in "
                             "the annotation file, or remove data.vit_feature_cache")
    return [paths[image_id] for image_id in range(dataset.num_images)]


def fingerprint(encoder, paths, image_size, amp):
    """What the cached tokens depend on: each image file ([path, size, modification time in ns]), the resize, the
    autocast and the encoder's weights."""
    stats = [os.stat(path) for path in paths]
    files = [[path, stat.st_size, stat.st_mtime_ns] for path, stat in zip(paths, stats)]
    return {"images": files, "image_size": image_size, "amp": amp, "encoder_sha256": weights_sha256(encoder)}


def weights_sha256(module):
    """SHA-256 over the name, dtype, shape and bytes of every tensor of `module.state_dict()`, in its order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {_dtype_name(tensor.dtype)} {list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def stale_reason(cache_dir, meta):
    """None when `cache_dir` holds the complete cache that `meta` describes, else why it must be (re)built."""
    try:
        with open(os.path.join(cache_dir, META)) as f:
            found = json.load(f)
    except FileNotFoundError:
        return f"no complete cache in {cache_dir} yet"
    except ValueError:
        return f"{META} is unreadable"
    changed = [key for key in ("shape", "dtype") if found.get(key) != meta[key]]
    changed += [FINGERPRINT_NAMES[key] for key, value in meta["fingerprint"].items()
                if found.get("fingerprint", {}).get(key) != value]
    if changed:
        return f"the cache there was made for other {', '.join(changed)}"
    tokens = os.path.join(cache_dir, TOKENS)
    if not os.path.exists(tokens) or os.path.getsize(tokens) != _nbytes(meta):
        return f"{TOKENS} is missing or has the wrong size"
    return None


class _ImageFiles(Dataset):
    """Items: (transformed image [3, S, S], index) of a list of image paths."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(load_image(self.paths[index], index)), index


def _weights_from_main(module):
    """Give every rank rank 0's weights of `module`, as DDP does when it wraps the model: the cache is built before,
    and ranks seeded apart initialise an encoder without pretrained weights differently."""
    if dist.is_initialized():
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=0)


def _create_tokens_file(cache_dir, meta):
    """An empty tokens.bin of the cache `meta` describes, the old cache removed; returns a message if the disk is too
    small (writing to a memory map on a full disk would kill the process with SIGBUS, not an error)."""
    os.makedirs(cache_dir, exist_ok=True)
    for name in (META, TOKENS):  # meta.json first: from now until the end of the build the cache is incomplete
        if os.path.exists(os.path.join(cache_dir, name)):
            os.remove(os.path.join(cache_dir, name))
    free = shutil.disk_usage(cache_dir).free
    if free < _nbytes(meta):
        return (f"data.vit_feature_cache {cache_dir} needs {_nbytes(meta) / 1e9:.1f} GB for {meta['shape'][0]} "
                f"images but its disk has {free / 1e9:.1f} GB free; point it to a larger disk")
    _open_tokens(cache_dir, meta, "w+").flush()
    return None


def _open_tokens(cache_dir, meta, mode):
    """tokens.bin as a uint8 memory map [num_images, N, Dv * bytes per value]."""
    num_images, tokens, width = meta["shape"]
    return np.memmap(os.path.join(cache_dir, TOKENS), np.uint8, mode,
                     shape=(num_images, tokens, width * _itemsize(meta)))


def _write_json(obj, path):
    """Write to a temporary file, then rename: meta.json is either absent or complete."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f)
    os.replace(f"{path}.tmp", path)


def _nbytes(meta):
    return int(np.prod(meta["shape"])) * _itemsize(meta)


def _itemsize(meta):
    return getattr(torch, meta["dtype"]).itemsize


def _dtype_name(dtype):
    """torch.bfloat16 -> "bfloat16" (and back with getattr(torch, name))."""
    return str(dtype).removeprefix("torch.")
