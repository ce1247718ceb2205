"""BLIP-2 stage 1: pre-train the Q-Former against a frozen image encoder with ITC + ITM + ITG.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out
    python train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out --evaluate --checkpoint blip2_pretrained.pth

Image-text retrieval on the val split is evaluated after every epoch (the best checkpoint is kept by its r_mean);
the test split is evaluated at the end with the best weights.
"""

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from data.caption import CaptionDataConfig, CaptionSource, caption_train_set, training_texts
from data.feature_cache import caption_train_loader
from data.shards import ShardSource
from eval_retrieval import RETRIEVAL_UNUSED, RetrievalEvalConfig, retrieval_evaluator, retrieval_loaders
from models.blip2_qformer import Blip2QformerConfig, create_model, init_from_bert, load_checkpoint
from models.inference import load_for_evaluation
from models.tokenizer import check_unknown_tokens
from utils import (InputError, TrainConfig, all_reduce_max, evaluation_weights, fit, log_parameters, parse_args,
                   run_main, start_run, start_training, test_best, write_evaluation)


@dataclass
class Stage1Config:
    data: CaptionDataConfig
    model: Blip2QformerConfig = field(default_factory=Blip2QformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)


def stage1_loss(model, batch, tokenizer, max_txt_len, same_image_positives, device):
    images, _, captions, image_ids = batch  # (images, text_input, text_output, image_ids): captions are text_output
    text = tokenizer(list(captions), padding="longest", truncation=True, max_length=max_txt_len,
                     return_tensors="pt")
    input_ids, attention_mask = global_padding(text.input_ids.to(device), text.attention_mask.to(device),
                                               tokenizer.pad_token_id)
    return model(images.to(device, non_blocking=True), input_ids, attention_mask,
                 image_ids.to(device) if same_image_positives else None)


def global_padding(input_ids, attention_mask, pad_id):
    """input_ids and attention_mask [B, L] right-padded to the longest L of all ranks: ITM gathers the texts of
    every rank as one tensor. LAVIS pads to max_txt_len; padding is masked everywhere, so only the cost (and
    dropout's draws) differ."""
    length = int(all_reduce_max(torch.tensor(input_ids.shape[1], device=input_ids.device)))
    padding = (0, length - input_ids.shape[1])
    return F.pad(input_ids, padding, value=pad_id), F.pad(attention_mask, padding)


def main(argv=None):
    args = parse_args(__doc__, argv)
    with start_run(args, Stage1Config) as run:
        cfg = run.cfg
        model, tokenizer = create_model(cfg.model)
        log_parameters(model, "Blip2Qformer")
        loaders = retrieval_loaders(cfg, run.device)
        evaluate = retrieval_evaluator(tokenizer, run)
        if args.evaluate:
            load_for_evaluation(load_checkpoint, model.to(run.device), evaluation_weights(run), RETRIEVAL_UNUSED)
            write_evaluation(run, {split: evaluate(model, loader, header=split) for split, loader in loaders.items()})
            return

        if not cfg.data.val_file or any(not isinstance(s, (CaptionSource, ShardSource)) for s in cfg.data.train):
            raise InputError("stage 1 trains on captions and picks the best epoch by retrieval: data.train must list "
                             "caption files ({ann_file, image_root}) or shards ({url}), and data.val_file a "
                             "Karpathy-format split")
        train_set = caption_train_set(cfg.data, cfg.model.image_size, seed=cfg.train.seed)
        check_unknown_tokens(tokenizer, training_texts(train_set)[1], cfg.data.allow_unknown_tokens)
        state = start_training(run, model, load_checkpoint, init_from_bert(cfg.model))
        loader = caption_train_loader(state, train_set)
        loss_fn = partial(stage1_loss, tokenizer=tokenizer, max_txt_len=cfg.model.max_txt_len,
                          same_image_positives=cfg.model.same_image_positives, device=run.device)

        def validate(at):
            return {f"val_{k}": v for k, v in evaluate(model, loaders["val"], header=f"Val {at}").items()}

        fit(state, loader, loss_fn, validate, "val_r_mean")
        if "test" in loaders:
            test_best(state, lambda: {f"test_{k}": v for k, v in evaluate(model, loaders["test"], header="Test")
                                      .items()})


if __name__ == "__main__":
    run_main(main)
