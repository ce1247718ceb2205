"""Retrieval metrics of a tiny seeded BLIP-2 stage-1 model, with one process or under torchrun (see
test_retrieval.py): writes the metrics (JSON) and the candidate scores handed to candidate_metrics (.pt) from rank 0.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import eval_retrieval  # noqa: E402
from data.caption import RetrievalDataset  # noqa: E402
from data.loader import eval_loader  # noqa: E402
from data.transforms import eval_transform  # noqa: E402
from models.blip2_qformer import Blip2Qformer  # noqa: E402
from models.tokenizer import init_tokenizer  # noqa: E402
from utils import cleanup_distributed, init_distributed, is_main_process  # noqa: E402

IMAGE_SIZE = 32


def build_model(tokenizer, seed=0):
    """A tiny random stage-1 model, the same for the same seed."""
    torch.manual_seed(seed)
    token_ids = {"bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id, "eos": tokenizer.sep_token_id}
    model = Blip2Qformer(token_ids, vision="eva_tiny", image_size=IMAGE_SIZE, patch_size=16, qformer="tiny",
                         num_query_tokens=4, embed_dim=32, vit_precision="fp32", vocab_size=len(tokenizer)).eval()
    # Freshly initialised (std 0.02), the Q-Former gives every pair nearly the same ITC and ITM score (neighbours
    # in a row ~1e-6 apart); larger weights spread the scores, so that float error cannot reorder them.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and not name.startswith("visual_encoder."):
                param.mul_(5.0)
    return model


def build_dataset(data_dir, ann_file):
    return RetrievalDataset(str(ann_file), str(data_dir), eval_transform(IMAGE_SIZE))


def evaluate(model, dataset, tokenizer, device, score, k_test, batch_size=3, text_batch_size=4, itm_batch_size=5):
    """(metrics, {"i2t" [I, T], "t2i" [T, I]}: the candidate scores evaluate_retrieval hands to candidate_metrics,
    as dense matrices with -inf off the candidates)."""
    captured = {}
    original = eval_retrieval.candidate_metrics

    def capture(texts_of_image, scores_i2t, images_of_text, scores_t2i, txt2img):
        num_images, num_texts = len(texts_of_image), len(images_of_text)
        captured["i2t"] = torch.full((num_images, num_texts), float("-inf")).scatter_(1, texts_of_image, scores_i2t)
        captured["t2i"] = torch.full((num_texts, num_images), float("-inf")).scatter_(1, images_of_text, scores_t2i)
        return original(texts_of_image, scores_i2t, images_of_text, scores_t2i, txt2img)

    eval_retrieval.candidate_metrics = capture
    try:
        loader = eval_loader(dataset, batch_size, num_workers=0)
        metrics = eval_retrieval.evaluate_retrieval(model, loader, tokenizer, device, k_test=k_test, score=score,
                                                    text_batch_size=text_batch_size, itm_batch_size=itm_batch_size)
    finally:
        eval_retrieval.candidate_metrics = original
    return metrics, captured


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--ann_file", required=True)
    parser.add_argument("--score", default="itm+itc")
    parser.add_argument("--k_test", type=int, default=3)
    parser.add_argument("--out", required=True, help="metrics JSON; the score matrices go to the same name + .pt")
    args = parser.parse_args()

    device = init_distributed("cpu")
    tokenizer = init_tokenizer(os.path.join(args.data, "tokenizer"), enc_token=False)
    model = build_model(tokenizer)
    metrics, scores = evaluate(model, build_dataset(args.data, args.ann_file), tokenizer, device, args.score,
                               args.k_test)
    if is_main_process():
        with open(args.out, "w") as f:
            json.dump(metrics, f)
        torch.save(scores, args.out + ".pt")


if __name__ == "__main__":
    main()
    cleanup_distributed()
