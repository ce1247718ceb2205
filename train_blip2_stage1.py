"""BLIP-2 stage 1: pre-train the Q-Former against a frozen image encoder with ITC + ITM + ITG.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out
    python train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out --evaluate --checkpoint blip2_pretrained.pth

Image-text retrieval on the val split is evaluated after every epoch (the best checkpoint is kept by its r_mean);
the test split is evaluated at the end with the best weights.
"""

from dataclasses import dataclass, field
from functools import partial

from data.caption import CaptionDataConfig, caption_train_set
from data.feature_cache import cached_train_set
from data.loader import train_loader
from eval_retrieval import RetrievalEvalConfig, retrieval_evaluator, retrieval_loaders
from models.blip2_qformer import Blip2QformerConfig, create_model, init_from_bert, load_checkpoint
from utils import (TrainConfig, evaluation_weights, fit, log, parse_args, run_main, start_run, start_training,
                   test_best, write_evaluation)


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
    with start_run(args, Stage1Config) as run:
        cfg = run.cfg
        model, tokenizer = create_model(cfg.model)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"Blip2Qformer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
            f"{trainable / 1e6:.1f} M trainable")
        loaders = retrieval_loaders(cfg, run.device)
        evaluate = retrieval_evaluator(tokenizer, run)
        if args.evaluate:
            load_checkpoint(model.to(run.device), evaluation_weights(run))
            write_evaluation(run, {split: evaluate(model, loader, header=split) for split, loader in loaders.items()})
            return

        train_set = caption_train_set(cfg.data, cfg.model.image_size)
        state = start_training(run, model, load_checkpoint, init_from_bert(cfg.model))
        if cfg.data.vit_feature_cache:  # after the weights are final: the cache holds the encoder's outputs
            train_set = cached_train_set(run, model, train_set)
        loader = train_loader(train_set, cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(run.device))
        loss_fn = partial(stage1_loss, tokenizer=tokenizer, max_txt_len=cfg.model.max_txt_len,
                          same_image_positives=cfg.model.same_image_positives, device=run.device)

        def validate(at):
            return {f"val_{k}": v for k, v in evaluate(model, loaders["val"], header=f"Val {at}").items()}

        fit(state, loader, loss_fn, validate, "val_r_mean")
        if "test" in loaders:
            test_best(state, lambda: {f"test_{k}": v for k, v in evaluate(model, loaders["test"], header="Test").items()})


if __name__ == "__main__":
    run_main(main)
