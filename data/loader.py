"""Samplers and data loaders for one or many processes."""

from dataclasses import dataclass

from torch.utils.data import DataLoader, DistributedSampler, Sampler

from utils import get_rank, get_world_size


@dataclass(kw_only=True)
class LoaderConfig:
    """The data-loading keys of every `data:` section."""
    num_workers: int = 4
    pin_memory: bool = True                   # page-locked batches, copied to the GPU asynchronously (CUDA only)
    # Keep the worker processes from epoch to epoch. Their random state then runs on through the epochs, so a
    # resumed run augments differently from an unbroken one (fresh workers are seeded from the restored RNG).
    persistent_workers: bool = False
    prefetch_factor: int = 2                  # batches each worker prepares ahead

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


def train_loader(dataset, batch_size, seed, collate_fn=None, **loader_kwargs):
    """Shuffled per epoch (call `loader.sampler.set_epoch(epoch)`) and sharded over ranks; incomplete batches
    are dropped. `loader_kwargs`: LoaderConfig.loader_kwargs or DataLoader's own."""
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                      **loader_kwargs)


def eval_loader(dataset, batch_size, collate_fn=None, **loader_kwargs):
    sampler = ShardSampler(dataset, get_rank(), get_world_size())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, collate_fn=collate_fn,
                      **loader_kwargs)
