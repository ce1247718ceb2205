"""Fine-tune BLIP on NLVR2: does a sentence hold for a pair of images?

    python -m torch.distributed.run --nproc_per_node=8 train_nlvr.py --config configs/nlvr.yaml --output_dir out
    python train_nlvr.py --config configs/nlvr.yaml --output_dir out --evaluate --checkpoint model_base_nlvr.pth
"""

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from data.loader import LoaderConfig, eval_loader, train_loader
from data.nlvr import NLVRDataset
from data.transforms import eval_transform, train_transform
from models.blip_nlvr import BlipNLVRConfig, create_model, load_checkpoint
from utils import (MetricLogger, TrainConfig, all_reduce_sum, autocast, end_epoch, log, parse_args, run_main,
                   start_run, start_training, train_epoch, unwrap, weights_to_evaluate, wrap_ddp, write_evaluation)


@dataclass
class DataConfig(LoaderConfig):
    train_file: str
    val_file: str
    test_file: str
    image_root: str = "."
    max_words: int = 40
    crop_scale: tuple[float, float] = (0.5, 1.0)
    randaugment: bool = True
    skip_missing_images: bool = False        # drop examples whose images are missing instead of stopping


@dataclass
class EvalConfig:
    batch_size: int = 64


@dataclass
class NLVRConfig:
    data: DataConfig
    model: BlipNLVRConfig = field(default_factory=BlipNLVRConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def build_datasets(cfg, splits=("train", "val", "test")):
    d = cfg.data
    files = {"train": d.train_file, "val": d.val_file, "test": d.test_file}
    transforms = {"train": train_transform(cfg.model.image_size, d.crop_scale, d.randaugment),
                  "val": eval_transform(cfg.model.image_size), "test": eval_transform(cfg.model.image_size)}
    return {split: NLVRDataset(files[split], d.image_root, transforms[split], d.max_words, train=split == "train",
                               skip_missing_images=d.skip_missing_images) for split in splits}


def logits_and_labels(model, batch, tokenizer, device):
    image0, image1, sentences, labels = batch
    max_len = unwrap(model).text_encoder.config.max_position_embeddings
    text = tokenizer(list(sentences), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    logits = model(image0.to(device, non_blocking=True), image1.to(device, non_blocking=True),
                   text.input_ids.to(device), text.attention_mask.to(device))
    return logits, labels.to(device)


def nlvr_loss(model, batch, tokenizer, device):
    logits, labels = logits_and_labels(model, batch, tokenizer, device)
    return {"loss": F.cross_entropy(logits.float(), labels)}


@torch.no_grad()
def evaluate(model, loader, tokenizer, device, amp, header):
    """{"acc", "n"} over the whole split: each rank scores its shard, the counts are summed."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in MetricLogger().log_every(loader, 50, header):
        with autocast(device, amp):
            logits, labels = logits_and_labels(model, batch, tokenizer, device)
        counts += torch.stack([(logits.argmax(1) == labels).sum(), torch.tensor(len(labels), device=device)])
    correct, total = all_reduce_sum(counts).tolist()
    return {"acc": correct / total, "n": int(total)}


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg, device = start_run(args, NLVRConfig)

    model, tokenizer = create_model(cfg.model)
    model.to(device)
    log(f"BlipNLVR: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
    datasets = build_datasets(cfg, ("val", "test") if args.evaluate else ("train", "val", "test"))
    loaders = {split: eval_loader(datasets[split], cfg.eval.batch_size, **cfg.data.loader_kwargs(device))
               for split in ("val", "test")}
    evaluate_split = partial(evaluate, tokenizer=tokenizer, device=device, amp=cfg.train.amp)

    if args.evaluate:
        load_checkpoint(model, weights_to_evaluate(args, cfg.model.pretrained))
        write_evaluation(args.output_dir, {split: evaluate_split(model, loader, header=split)
                                           for split, loader in loaders.items()})
        return

    loader = train_loader(datasets["train"], cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(device))
    accum, optimizer, scheduler, scaler, start_epoch, best_acc = start_training(args, model, loader, cfg.train, device)
    if cfg.model.pretrained and not args.resume:
        load_checkpoint(model, cfg.model.pretrained)
    ddp_model = wrap_ddp(model, device, cfg.train)
    loss_fn = partial(nlvr_loss, tokenizer=tokenizer, device=device)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_stats = train_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg.train, device,
                                  accum, args.output_dir)
        val_acc = evaluate_split(model, loaders["val"], header=f"Val epoch {epoch}")["acc"]
        test_acc = evaluate_split(model, loaders["test"], header=f"Test epoch {epoch}")["acc"]
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()}, "val_acc": val_acc,
                 "test_acc": test_acc}
        improved = val_acc > best_acc
        best_acc = max(best_acc, val_acc)
        end_epoch(args.output_dir, stats, improved, {"val_acc": val_acc}, model, optimizer, scheduler, scaler, epoch,
                  best_acc, cfg)
    log(f"best val_acc {best_acc:.4f}")


if __name__ == "__main__":
    run_main(main)
