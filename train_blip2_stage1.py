"""BLIP-2 stage 1: pre-train the Q-Former against a frozen image encoder with ITC + ITM + ITG.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out
    python train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out --evaluate --checkpoint blip2_pretrained.pth

Image-text retrieval on the val split is evaluated after every epoch (the best checkpoint is kept by its r_mean);
the test split is evaluated at the end with the best weights.
"""

import json
from dataclasses import dataclass, field
from functools import partial

from data.caption import CaptionDataConfig, caption_train_set
from data.feature_cache import cached_train_set
from data.loader import train_loader
from eval_retrieval import RetrievalEvalConfig, retrieval_evaluator, retrieval_loaders
from models.blip2_qformer import Blip2QformerConfig, create_model, load_checkpoint
from utils import (TrainConfig, append_log, end_epoch, is_main_process, load_best_weights, log, parse_args, run_main,
                   start_run, start_training, train_epoch, weights_to_evaluate, wrap_ddp, write_evaluation)


@dataclass
class Stage1Config:
    data: CaptionDataConfig
    model: Blip2QformerConfig = field(default_factory=Blip2QformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)


def stage1_loss(model, batch, tokenizer, max_txt_len, same_image_positives, device):
    images, captions, image_ids = batch
    # Padding to a fixed length lets ITM gather the texts of every rank as one tensor.
    text = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_txt_len,
                     return_tensors="pt")
    return model(images.to(device, non_blocking=True), text.input_ids.to(device), text.attention_mask.to(device),
                 image_ids.to(device) if same_image_positives else None)


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg, device = start_run(args, Stage1Config)

    model, tokenizer = create_model(cfg.model, load_bert=not args.evaluate)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"Blip2Qformer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{trainable / 1e6:.1f} M trainable")
    loaders = retrieval_loaders(cfg, device)
    evaluate = retrieval_evaluator(cfg, tokenizer, device)
    if args.evaluate:
        load_checkpoint(model, weights_to_evaluate(args, cfg.model.pretrained))
        write_evaluation(args.output_dir, {split: evaluate(model, loader, header=split)
                                           for split, loader in loaders.items()})
        return

    train_set = caption_train_set(cfg.data, cfg.model.image_size)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(device))
    accum, optimizer, scheduler, scaler, start_epoch, best_r_mean = start_training(args, model, loader, cfg.train,
                                                                                   device)
    if cfg.model.pretrained and not args.resume:
        load_checkpoint(model, cfg.model.pretrained)
    if cfg.data.vit_feature_cache:  # not earlier: model.pretrained and --resume may set the encoder's weights
        train_set = cached_train_set(cfg, model, train_set, device)
        loader = train_loader(train_set, cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(device))
    ddp_model = wrap_ddp(model, device, cfg.train)
    loss_fn = partial(stage1_loss, tokenizer=tokenizer, max_txt_len=cfg.model.max_txt_len,
                      same_image_positives=cfg.model.same_image_positives, device=device)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_stats = train_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg.train, device,
                                  accum, args.output_dir)
        val = evaluate(model, loaders["val"], header=f"Val epoch {epoch}")
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"val_{k}": v for k, v in val.items()}}
        improved = val["r_mean"] > best_r_mean
        best_r_mean = max(best_r_mean, val["r_mean"])
        end_epoch(args.output_dir, stats, improved, {"val_r_mean": val["r_mean"]}, model, optimizer, scheduler,
                  scaler, epoch, best_r_mean, cfg)

    if "test" in loaders:
        best_epoch = load_best_weights(args.output_dir, model)
        test = {f"test_{k}": v for k, v in evaluate(model, loaders["test"], header="Test").items()}
        stats = {"best_epoch": best_epoch, **test}
        if is_main_process():
            append_log(args.output_dir, stats)
        log(json.dumps(stats))
    log(f"best val r_mean {best_r_mean:.2f}")


if __name__ == "__main__":
    run_main(main)
