"""Stage-1 losses and gradients of one fixed global batch, with one process or under torchrun (test_blip2_qformer.py).

Rank r takes rows r*B:(r+1)*B of the global batch, so that the gathered batch has the single process's order, and
every rank seeds the sampling RNG alike (the hard-negative sampler draws the noise of all ranks' rows). The model
is in eval mode so that dropout does not make the two launches compute different functions.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.blip2_qformer import Blip2Qformer  # noqa: E402
from train_blip2_stage1 import global_padding  # noqa: E402
from utils import (all_reduce_sum, cleanup_distributed, get_rank, get_world_size, init_distributed,  # noqa: E402
                   is_main_process, TrainConfig, wrap_ddp)

GLOBAL_BATCH = 8


def tiny_stage1_model():
    torch.manual_seed(0)
    return Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, qformer="tiny",
                        vocab_size=41, num_query_tokens=4, embed_dim=32, vit_precision="fp32")


def global_batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    ids = torch.randint(4, 40, (GLOBAL_BATCH, 12), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for row, length in enumerate([12, 9, 7, 12, 5, 10, 9, 8]):  # the longest: 12 in rows 0-3, 10 in rows 4-7
        ids[row, length:], mask[row, length:] = 0, 0
    image_ids = torch.tensor([0, 1, 2, 3, 0, 5, 6, 1])  # images 0 and 1 have a caption on each rank
    return images, ids, mask, image_ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--no_image_ids", action="store_true")
    parser.add_argument("--static_graph", action="store_true", help="train.ddp_static_graph")
    parser.add_argument("--no_bucket_view", action="store_true", help="train.ddp_bucket_view false")
    parser.add_argument("--trim", action="store_true", help="each rank's texts cut to their longest, then padded "
                        "by train_blip2_stage1.global_padding")
    args = parser.parse_args()

    device = init_distributed("cpu")
    model = tiny_stage1_model().eval()
    ddp_model = wrap_ddp(model, device, TrainConfig(ddp_static_graph=args.static_graph,
                                                    ddp_bucket_view=not args.no_bucket_view))
    per_rank = GLOBAL_BATCH // get_world_size()
    rows = slice(get_rank() * per_rank, (get_rank() + 1) * per_rank)
    images, ids, mask, image_ids = (t[rows] for t in global_batch())
    if args.trim:
        longest = int(mask.sum(1).max())
        ids, mask = global_padding(ids[:, :longest], mask[:, :longest], pad_id=0)
    torch.manual_seed(2)
    losses = ddp_model(images, ids, mask, None if args.no_image_ids else image_ids)
    losses["loss"].backward()
    mean = {k: all_reduce_sum(v.detach().clone()) / get_world_size() for k, v in losses.items()}
    if is_main_process():
        torch.save({"losses": mean, "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}},
                   args.out)


if __name__ == "__main__":
    main()
    cleanup_distributed()  # after main() has freed DDP (see ddp_grads.py)
