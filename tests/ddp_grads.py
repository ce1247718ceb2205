"""Loss and gradients of the first training batch, with one process or under torchrun (see test_distributed.py).

Runs the code the trainer runs (config, process group, sampler, loss, DDP) with the model in eval mode, so that
dropout does not make the two launches compute different functions.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.loader import train_loader  # noqa: E402
from data.nlvr import NLVRDataset  # noqa: E402
from data.transforms import eval_transform  # noqa: E402
from models.blip_nlvr import create_model  # noqa: E402
from train_nlvr import NLVRConfig, nlvr_loss  # noqa: E402
from utils import (all_reduce_sum, cleanup_distributed, get_world_size, init_distributed, is_main_process,  # noqa: E402
                   load_config, wrap_ddp)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cfg = load_config(args.config, NLVRConfig)
    device = init_distributed("cpu")
    torch.manual_seed(0)
    model, tokenizer = create_model(cfg.model)
    model.eval()
    dataset = NLVRDataset(cfg.data.train_file, cfg.data.image_root, eval_transform(cfg.model.image_size))
    loader = train_loader(dataset, args.batch_size, num_workers=0, seed=cfg.train.seed)
    loader.batch_sampler.set_position(0)
    ddp_model = wrap_ddp(model, device, cfg.train)  # kept referenced: its reducer averages the gradients in backward
    loss = nlvr_loss(ddp_model, next(iter(loader)), tokenizer, device)["loss"]
    loss.backward()
    mean_loss = all_reduce_sum(loss.detach().clone()) / get_world_size()
    if is_main_process():
        torch.save({"loss": mean_loss, "grads": {n: p.grad for n, p in model.named_parameters()}}, args.out)


if __name__ == "__main__":
    main()
    # Only after main() has returned: the DDP reducer and the gloo work objects it held are freed by then. Destroying
    # the group while module-level globals still held them let gloo threads outlive it (SIGABRT at exit, ~1 run in 10).
    cleanup_distributed()
