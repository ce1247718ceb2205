"""The stage-2 loss and gradients of one fixed global batch, with one process or under torchrun (test_blip2_opt.py).

Rank r takes rows r*B:(r+1)*B of the global batch. The captions differ in length, so each rank pads differently and
holds a different number of labelled tokens: the loss must average over the tokens of the global batch to match.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.blip2_opt import Blip2OPT  # noqa: E402
from train_demo_lm import build_demo_opt, build_demo_tokenizer  # noqa: E402
from utils import (all_reduce_sum, cleanup_distributed, get_rank, get_world_size, init_distributed,  # noqa: E402
                   is_main_process, TrainConfig, wrap_ddp)

CAPTIONS = ["a red circle", "there is a blue square in the bottom right corner and a red circle at the top left",
            "a green triangle at the top", "the top left has a red square and the bottom left has a blue circle",
            "a yellow circle", "two shapes: a red circle (top left) and a blue square (bottom right)",
            "a dark picture with a green square", "a blue triangle on the bottom left"]


def tiny_stage2_model():
    tokenizer = build_demo_tokenizer([c + "\n" for c in CAPTIONS])
    torch.manual_seed(0)
    opt = build_demo_opt(tokenizer, hidden_size=32, num_layers=2, num_heads=2, ffn_dim=64)
    return Blip2OPT(opt, tokenizer, vision="eva_tiny", image_size=32, qformer="tiny", num_query_tokens=4,
                    vit_precision="fp32")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    device = init_distributed("cpu")
    model = tiny_stage2_model().eval()
    ddp_model = wrap_ddp(model, device, TrainConfig())
    per_rank = len(CAPTIONS) // get_world_size()
    rows = slice(get_rank() * per_rank, (get_rank() + 1) * per_rank)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = ddp_model(images[rows], CAPTIONS[rows])["loss"]
    loss.backward()
    mean = all_reduce_sum(loss.detach().clone()) / get_world_size()
    if is_main_process():
        torch.save({"loss": mean, "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}},
                   args.out)


if __name__ == "__main__":
    main()
    cleanup_distributed()  # after main() has freed DDP (see ddp_grads.py)
