"""BLIP-2 stage 2: teach the Q-Former to prompt a frozen OPT with images (captioning loss), and caption fine-tuning.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage2.py --config configs/blip2_stage2.yaml --output_dir out
    python train_blip2_stage2.py --config configs/blip2_caption_coco.yaml --output_dir out --evaluate --checkpoint blip2_caption_opt2.7b.pth

Captions of the val split are generated and scored (BLEU, METEOR, ROUGE-L, CIDEr) after every epoch and the best
checkpoint kept by CIDEr + BLEU-4, as the original did; the test split is evaluated at the end with the best weights,
together with the same frozen OPT prompted without images (the text-only baseline).
"""

import os
from dataclasses import dataclass, field
from functools import partial

from data.caption import CaptionDataConfig, caption_train_set
from data.feature_cache import cached_train_set
from data.loader import train_loader
from eval_caption import (CaptionEvalConfig, caption_eval_sets, caption_function, evaluate_split, evaluate_splits,
                          generation_options)
from models.blip2_opt import Blip2OPTConfig, create_model, load_checkpoint
from utils import (TrainConfig, evaluation_weights, fit, flat_metrics, log, parse_args, run_main, start_run,
                   start_training, test_best, write_evaluation)


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
    with start_run(args, Stage2Config) as run:
        cfg = run.cfg
        model, tokenizer = create_model(cfg.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"Blip2OPT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
            f"{trainable / 1e6:.1f} M trainable")
        eval_sets = caption_eval_sets(cfg, run.device)
        if args.evaluate:
            load_checkpoint(model.to(run.device), evaluation_weights(run))
            write_evaluation(run, evaluate_splits(model, tokenizer, eval_sets, run))
            return

        train_set = caption_train_set(cfg.data, cfg.model.image_size)
        state = start_training(run, model, load_checkpoint)
        if cfg.data.vit_feature_cache:  # after the weights are final: the cache holds the encoder's outputs
            train_set = cached_train_set(run, model, train_set)
        loader = train_loader(train_set, cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(run.device))
        caption_fn = caption_function(model, tokenizer, generation_options(cfg.eval), run)

        def validate(at):
            model.eval()
            val_loader, ground_truth = eval_sets["val"]
            results_path = os.path.join(run.output_dir, f"val_{at.replace(' ', '_')}_captions.json")
            return {f"val_{k}": v for k, v in evaluate_split(caption_fn, val_loader, ground_truth, f"Val {at}",
                                                             results_path).items()}

        fit(state, loader, partial(stage2_loss, device=run.device), validate, "val_agg_metric")
        if "test" in eval_sets:
            test_best(state, lambda: flat_metrics(evaluate_splits(model, tokenizer, {"test": eval_sets["test"]}, run)))


if __name__ == "__main__":
    run_main(main)
