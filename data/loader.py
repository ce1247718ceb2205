"""Samplers and data loaders for one or many processes."""

from torch.utils.data import DataLoader, DistributedSampler, Sampler

from utils import get_rank, get_world_size


class ShardSampler(Sampler):
    """Indices rank, rank + world_size, ...: over all ranks every example exactly once, with no padding, so that
    evaluation metrics count each example once (ranks may get one example more than others)."""

    def __init__(self, dataset, rank, world_size):
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def train_loader(dataset, batch_size, num_workers, seed, pin_memory=False, collate_fn=None):
    """Shuffled per epoch (call `loader.sampler.set_epoch(epoch)`) and sharded over ranks; incomplete batches
    are dropped."""
    sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=True, collate_fn=collate_fn)


def eval_loader(dataset, batch_size, num_workers, pin_memory=False, collate_fn=None):
    sampler = ShardSampler(dataset, get_rank(), get_world_size())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=False, collate_fn=collate_fn)
