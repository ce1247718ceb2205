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
from data.utils import InputChecks
from models.blip_nlvr import BlipNLVRConfig, create_model, load_checkpoint
from models.inference import load_for_evaluation
from models.tokenizer import check_unknown_tokens
from utils import (Count, MetricLogger, TrainConfig, UnitRange, all_reduce_sum, evaluation_weights, fit, log_parameters,
                   parse_args, run_main, start_run, start_training, unwrap, write_evaluation)


@dataclass
class DataConfig(LoaderConfig, InputChecks):
    train_file: str
    val_file: str
    test_file: str
    image_root: str = "."
    max_words: Count = 40
    crop_scale: UnitRange = (0.5, 1.0)
    randaugment: bool = True


@dataclass
class EvalConfig:
    batch_size: Count = 64


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
                               skip_missing_images=d.skip_missing_images, skip_empty_text=d.skip_empty_text,
                               image_check=d.image_check) for split in splits}


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
def evaluate(model, loader, tokenizer, run, header):
    """{"acc", "n"} over the whole split: each rank scores its shard, the counts are summed."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=run.device)
    for batch in MetricLogger().log_every(loader, 50, header):
        with run.autocast():
            logits, labels = logits_and_labels(model, batch, tokenizer, run.device)
        counts += torch.stack([(logits.argmax(1) == labels).sum(), torch.tensor(len(labels), device=run.device)])
    correct, total = all_reduce_sum(counts).tolist()
    return {"acc": correct / total, "n": int(total)}


def main(argv=None):
    args = parse_args(__doc__, argv)
    with start_run(args, NLVRConfig) as run:
        cfg, device = run.cfg, run.device
        model, tokenizer = create_model(cfg.model)
        log_parameters(model, "BlipNLVR")
        datasets = build_datasets(cfg, ("val", "test") if args.evaluate else ("train", "val", "test"))
        loaders = {split: eval_loader(datasets[split], cfg.eval.batch_size, **cfg.data.loader_kwargs(device))
                   for split in ("val", "test")}

        def evaluate_split(split, header=None):
            return evaluate(model, loaders[split], tokenizer, run, header or split)

        if args.evaluate:
            load_for_evaluation(load_checkpoint, model.to(device), evaluation_weights(run))
            write_evaluation(run, {split: evaluate_split(split) for split in loaders})
            return

        # The original evaluates val and test after every epoch and keeps the best epoch by val accuracy.
        def validate(at):
            return {"val_acc": evaluate_split("val", f"Val {at}")["acc"],
                    "test_acc": evaluate_split("test", f"Test {at}")["acc"]}

        check_unknown_tokens(tokenizer, [e["sentence"] for e in datasets["train"].entries],
                             cfg.data.allow_unknown_tokens)
        state = start_training(run, model, load_checkpoint)
        loader = train_loader(datasets["train"], cfg.train.batch_size, cfg.train.seed, **cfg.data.loader_kwargs(device))
        fit(state, loader, partial(nlvr_loss, tokenizer=tokenizer, device=device), validate, "val_acc")


if __name__ == "__main__":
    run_main(main)
