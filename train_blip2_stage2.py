"""BLIP-2 stage 2: teach the Q-Former to prompt a frozen OPT with images (captioning loss), and caption fine-tuning.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage2.py --config configs/blip2_stage2.yaml --output_dir out
    python train_blip2_stage2.py --config configs/blip2_caption_coco.yaml --output_dir out --evaluate --checkpoint blip2_caption_opt2.7b.pth

Captions of the val split are generated and scored (BLEU, METEOR, ROUGE-L, CIDEr) after every epoch and the best
checkpoint kept by CIDEr + BLEU-4, as the original did; the test split is evaluated at the end with the best weights,
together with the same frozen OPT prompted without images (the text-only baseline).
"""

import json
import os
from dataclasses import dataclass, field
from functools import partial

from data.caption import CaptionDataConfig, caption_train_set
from data.feature_cache import cached_train_set
from data.loader import train_loader
from eval_caption import (CaptionEvalConfig, caption_eval_sets, caption_function, evaluate_split, evaluate_splits,
                          generation_options)
from models.blip2_opt import Blip2OPTConfig, create_model, load_checkpoint
from utils import (TrainConfig, append_log, end_epoch, flat_metrics, is_main_process, load_best_weights, log,
                   parse_args, run_main, start_run, start_training, train_epoch, weights_to_evaluate, wrap_ddp,
                   write_evaluation)


@dataclass
class Stage2Config:
    data: CaptionDataConfig
    model: Blip2OPTConfig = field(default_factory=Blip2OPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: CaptionEvalConfig = field(default_factory=CaptionEvalConfig)


def stage2_loss(model, batch, device):
    images, captions, _ = batch
    return model(images.to(device, non_blocking=True), list(captions))


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg, device = start_run(args, Stage2Config)

    model, tokenizer = create_model(cfg.model)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"Blip2OPT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{trainable / 1e6:.1f} M trainable")
    eval_sets = caption_eval_sets(cfg, device)
    caption_fn = caption_function(model, tokenizer, generation_options(cfg.eval), device, cfg.train.amp)

    def evaluate_val(epoch):
        model.eval()
        loader, ground_truth = eval_sets["val"]
        results_path = os.path.join(args.output_dir, f"val_epoch_{epoch}_captions.json")
        return evaluate_split(caption_fn, loader, ground_truth, f"Val epoch {epoch}", results_path)

    if args.evaluate:
        load_checkpoint(model, weights_to_evaluate(args, cfg.model.pretrained))
        write_evaluation(args.output_dir, evaluate_splits(model, tokenizer, cfg, eval_sets, device, args.output_dir))
        return

    train_set = caption_train_set(cfg.data, cfg.model.image_size)
    if cfg.data.vit_feature_cache:
        train_set = cached_train_set(cfg, model, train_set, device)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(device))
    accum, optimizer, scheduler, scaler, start_epoch, best_metric = start_training(args, model, loader, cfg.train,
                                                                                   device)
    ddp_model = wrap_ddp(model, device, cfg.train)
    loss_fn = partial(stage2_loss, device=device)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_stats = train_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg.train, device,
                                  accum, args.output_dir)
        val = evaluate_val(epoch)
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"val_{k}": v for k, v in val.items()}}
        improved = val["agg_metric"] > best_metric
        best_metric = max(best_metric, val["agg_metric"])
        end_epoch(args.output_dir, stats, improved, {"val_agg_metric": val["agg_metric"]}, model, optimizer,
                  scheduler, scaler, epoch, best_metric, cfg)

    if "test" in eval_sets:
        best_epoch = load_best_weights(args.output_dir, model)
        test = evaluate_splits(model, tokenizer, cfg, {"test": eval_sets["test"]}, device, args.output_dir)
        stats = {"best_epoch": best_epoch, **flat_metrics(test)}
        if is_main_process():
            append_log(args.output_dir, stats)
        log(json.dumps(stats))
    log(f"best val CIDEr + BLEU-4 {best_metric:.4f}")


if __name__ == "__main__":
    run_main(main)
