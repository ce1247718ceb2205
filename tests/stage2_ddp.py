"""The stage-2 loss and gradients of one fixed global batch, with one process or under torchrun (test_blip2_opt.py,
test_blip2_lm.py), for the OPT, T5 and InstructBLIP (LLaMA, T5) bridges.

Rank r takes rows r*B:(r+1)*B of the global batch. The texts differ in length, so each rank pads differently and
holds a different number of labelled tokens: the loss must average over the tokens of the global batch to match.
"""

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.blip2_lm import Blip2CausalLM, Blip2T5  # noqa: E402
from tests.reference_lm import (bert_tokenizer, llama_tokenizer, opt_tokenizer, t5_tokenizer,  # noqa: E402
                                transformers_model)
from utils import (all_reduce_sum, cleanup_distributed, get_rank, get_world_size, init_distributed,  # noqa: E402
                   is_main_process, TrainConfig, wrap_ddp)

INSTRUCTIONS = ["", "a photo of", "what is in the image?", "describe the picture.", "a photo of",
                "question: how many shapes are there? answer:", "", "what is in the image?"]
TEXTS = ["a red circle", "there is a blue square in the bottom right corner and a red circle at the top left",
         "a green triangle at the top", "the top left has a red square and the bottom left has a blue circle",
         "a yellow circle", "two", "a dark picture with a red square", "a blue triangle on the bottom left"]
TOKENIZERS = {"opt": opt_tokenizer, "llama": llama_tokenizer, "t5": t5_tokenizer}


def tiny_stage2_model(lm, tokenizer_dir, instruct):
    """A stage-2 model over a tiny random `lm` ("opt", "llama", "t5") with the tokenizer saved in `tokenizer_dir`
    (made once for all ranks: the tokenizers library's trainers are not deterministic), InstructBLIP's Q-Former with
    `instruct`."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    qformer_tokenizer = bert_tokenizer(Path(tempfile.mkdtemp())) if instruct else None
    language_model = transformers_model(lm, tokenizer, len(qformer_tokenizer) if instruct else None).language_model
    torch.manual_seed(0)
    model_class = Blip2T5 if lm == "t5" else Blip2CausalLM
    return model_class(copy.deepcopy(language_model), tokenizer, qformer_tokenizer=qformer_tokenizer,
                       vision="eva_tiny", image_size=32, qformer="tiny", num_query_tokens=4, vit_precision="fp32",
                       max_txt_len=64)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--lm", choices=list(TOKENIZERS), default="opt")
    parser.add_argument("--tokenizer", required=True, help="a directory TOKENIZERS[lm]() was saved to")
    parser.add_argument("--instruct", action="store_true")
    args = parser.parse_args()

    device = init_distributed("cpu")
    model = tiny_stage2_model(args.lm, args.tokenizer, args.instruct).eval()
    ddp_model = wrap_ddp(model, device, TrainConfig())
    per_rank = len(TEXTS) // get_world_size()
    rows = slice(get_rank() * per_rank, (get_rank() + 1) * per_rank)
    images = torch.randn(len(TEXTS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = ddp_model(images[rows], INSTRUCTIONS[rows], TEXTS[rows])["loss"]
    loss.backward()
    mean = all_reduce_sum(loss.detach().clone()) / get_world_size()
    if is_main_process():
        torch.save({"loss": mean, "grads": {n: p.grad for n, p in model.named_parameters() if p.requires_grad}},
                   args.out)


if __name__ == "__main__":
    main()
    cleanup_distributed()  # after main() has freed DDP (see ddp_grads.py)
