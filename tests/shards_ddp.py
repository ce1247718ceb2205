"""The captions each loader worker of each process reads from a MixtureStream of one ShardSource, with one process
or under torchrun (test_shards.py): rank r writes OUT/rank{r}.json, [[worker, pass, caption], ...] in the order
read.

Every slot holds `--samples_per_slot` samples per pass, so with batches of `--batch_size` its pass p is its batches
p x k .. (p + 1) x k - 1 (k = samples_per_slot / batch_size); the loader takes batches from the workers in turn.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.shards import MixtureStream, ShardSource, stream_train_loader  # noqa: E402
from data.transforms import eval_transform  # noqa: E402
from utils import cleanup_distributed, get_rank, init_distributed  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=3)
    parser.add_argument("--samples_per_slot", type=int, required=True)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()

    init_distributed("cpu")
    stream = MixtureStream([ShardSource(args.pattern)], eval_transform(8), seed=0)
    loader = stream_train_loader(stream, args.batch_size, num_workers=args.workers)
    batches_per_pass = args.samples_per_slot // args.batch_size
    seen = []
    for number, (_, _, captions, _) in zip(range(args.workers * batches_per_pass * args.passes), loader):
        worker, pass_number = number % args.workers, number // (args.workers * batches_per_pass)
        seen += [[worker, pass_number, caption] for caption in captions]
    with open(os.path.join(args.out, f"rank{get_rank()}.json"), "w") as f:
        json.dump(seen, f)
    cleanup_distributed()


if __name__ == "__main__":
    main()
