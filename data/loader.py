"""Samplers and data loaders for one or many processes.

Training data order and augmentation are functions of (train.seed, epoch, example) alone: each epoch is one
seeded shuffle of the whole dataset, cut into global batches of batch_size x processes, of which rank r takes the
r-th slice; each example is loaded with the random generators seeded from (seed, epoch, index). So a run resumed in
the middle of an epoch, from any number of loader workers, persistent or not, sees the batches and augmentations of
the unbroken run, and N processes see, together, the batches one process sees with an N times larger batch.
"""

import random
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from utils import Count, Workers, get_rank, get_world_size


@dataclass(kw_only=True)
class LoaderConfig:
    """The data-loading keys of every `data:` section."""
    num_workers: Workers = 4
    pin_memory: bool = True                   # page-locked batches, copied to the GPU asynchronously (CUDA only)
    persistent_workers: bool = False          # keep the worker processes from epoch to epoch
    prefetch_factor: Count = 2                # batches each worker prepares ahead

    def loader_kwargs(self, device):
        """DataLoader arguments on `device` (a torch.device)."""
        workers = self.num_workers > 0
        return dict(num_workers=self.num_workers, pin_memory=self.pin_memory and device.type == "cuda",
                    persistent_workers=self.persistent_workers and workers,
                    prefetch_factor=self.prefetch_factor if workers else None)


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ...: over all ranks every example exactly once, with no padding, so that
    evaluation metrics count each example once (ranks may get one example more than others)."""

    def __init__(self, dataset, rank, world_size):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


class TrainBatchSampler(Sampler):
    """This rank's batches of an epoch: the dataset shuffled by torch.randperm seeded with seed + epoch, cut into
    global batches of batch_size x world_size examples (the last incomplete one dropped), of which this rank takes
    examples [rank x batch_size, (rank + 1) x batch_size). Each item is (index, sample seed) for SeededSamples.

    `set_position(epoch, batch)` picks the epoch and the first batch to yield (a resumed epoch starts mid-way)."""

    def __init__(self, num_examples, batch_size, seed, rank, world_size):
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_examples // (batch_size * world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch, batch=0):
        self.epoch, self.start = epoch, batch

    def __iter__(self):
        order = torch.randperm(self.num_examples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.world_size
        for batch in range(self.start, self.batches_per_epoch):
            first = batch * global_batch + self.rank * self.batch_size
            indices = order[first:first + self.batch_size].tolist()
            yield [(index, sample_seed(self.seed, self.epoch, index)) for index in indices]

    def __len__(self):
        return self.batches_per_epoch - self.start


def sample_seed(seed, epoch, index):
    """The seed of example `index`'s randomness in `epoch`: independent streams for every (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """`dataset` read with (index, seed) keys: item `index`, loaded with torch's, numpy's and Python's generators
    seeded by `seed` for that item only (their states are restored after it, so the process's own streams, e.g.
    dropout's in a loader without workers, do not depend on the data)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with seeded_generators(seed):
            return self.dataset[index]


@contextmanager
def seeded_generators(seed):
    """torch's CPU generator, numpy's and Python's global ones seeded by `seed` in the block, restored after."""
    states = torch.random.default_generator.get_state(), np.random.get_state(), random.getstate()
    torch.random.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.random.default_generator.set_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


def train_loader(dataset, batch_size, seed, collate_fn=None, **loader_kwargs):
    """Batches of `dataset` for training, sharded over ranks, in the order and with the augmentation that
    (seed, epoch, example) fix (see the module docstring); the position is set with
    `loader.batch_sampler.set_position(epoch, batch)`. `loader_kwargs`: LoaderConfig.loader_kwargs or
    DataLoader's own."""
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, get_rank(), get_world_size())
    # Its own generator: the workers' base seed must not be drawn from (and so shift) the process's torch stream.
    return DataLoader(SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(seed), **loader_kwargs)


def eval_loader(dataset, batch_size, collate_fn=None, **loader_kwargs):
    """Batches of `dataset` in order, sharded over ranks (ShardSampler), every example once."""
    sampler = ShardSampler(dataset, get_rank(), get_world_size())
    loader_kwargs.setdefault("generator", torch.Generator())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, collate_fn=collate_fn,
                      **loader_kwargs)
