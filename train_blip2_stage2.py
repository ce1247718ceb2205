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
from typing import Literal, Optional

import torch

from data.caption import CaptionSource, RetrievalDataset, caption_train_set
from data.loader import eval_loader, train_loader
from data.transforms import eval_transform
from eval_caption import (agg_metric, caption_metrics, evaluate_captions, ground_truth_from_annotation,
                          ground_truth_from_coco)
from models.blip2_opt import Blip2OPT, load_checkpoint, load_opt
from models.eva_vit import load_vision_weights
from utils import (TrainConfig, append_log, autocast, broadcast_from_main, end_epoch, is_main_process,
                   load_best_weights, load_checkpoint_file, log, parse_args, run_main, start_run, start_training,
                   train_epoch, weights_to_evaluate, wrap_ddp, write_evaluation)


@dataclass
class ModelConfig:
    vision: Literal["eva_vit_g", "clip_vit_L", "eva_tiny"] = "eva_vit_g"
    image_size: int = 224
    patch_size: Optional[int] = None          # null: the encoder's own (14 for EVA ViT-g and CLIP ViT-L)
    vit_pretrained: Optional[str] = None      # image-encoder weights (eva_vit_g.pth): path or URL; or from `pretrained`
    freeze_vit: bool = True
    vit_precision: Literal["fp16", "bf16", "fp32"] = "fp16"   # weights of the frozen encoder
    drop_path_rate: float = 0.0
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: int = 0                   # with vit_grad_ckpt: checkpoint the last N blocks (trainable ViT only)
    qformer: Literal["tiny", "base"] = "base"
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    opt_model: str = "facebook/opt-2.7b"      # hub name or local directory (model and tokenizer)
    opt_precision: Literal["fp16", "bf16", "fp32"] = "fp16"   # weights of the frozen OPT
    prompt: str = ""                          # precedes every caption (caption fine-tuning: "a photo of")
    max_txt_len: int = 32                     # OPT tokens of `</s>` + prompt + caption + "\n"
    pretrained: Optional[str] = None          # stage-1 checkpoint to start from, or a stage-2 one (LAVIS/ours/HF)


@dataclass
class DataConfig:
    train: list[CaptionSource]
    val_file: str                             # Karpathy format: [{"image", "caption": [...]}]
    test_file: Optional[str] = None
    val_gt_file: Optional[str] = None         # COCO-format ground truth (coco_karpathy_val_gt.json); null: val_file's
    test_gt_file: Optional[str] = None
    image_root: str = "."                     # of the val and test images
    max_words: int = 50
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    num_workers: int = 4
    skip_missing_images: bool = False         # drop training pairs whose image is missing instead of stopping


@dataclass
class EvalConfig:
    batch_size: int = 64                      # images per generate call
    num_beams: int = 5
    max_new_tokens: int = 30
    min_new_tokens: int = 8
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    text_only_baseline: bool = True           # also score the OPT prompted without images on the test split


@dataclass
class Stage2Config:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def build_model(cfg):
    """The model at initialisation: frozen parts from their files (model.opt_model, model.vit_pretrained, the image
    encoder of model.pretrained), trainable parts from model.pretrained when given."""
    opt_model, opt_tokenizer = load_opt(cfg.opt_model, cfg.opt_precision)
    model = Blip2OPT(opt_model, opt_tokenizer, vision=cfg.vision, image_size=cfg.image_size, patch_size=cfg.patch_size,
                     freeze_vit=cfg.freeze_vit, vit_precision=cfg.vit_precision, drop_path_rate=cfg.drop_path_rate,
                     vit_grad_ckpt_layers=cfg.vit_ckpt_layer if cfg.vit_grad_ckpt else 0, qformer=cfg.qformer,
                     num_query_tokens=cfg.num_query_tokens, cross_attention_freq=cfg.cross_attention_freq,
                     prompt=cfg.prompt, max_txt_len=cfg.max_txt_len)
    if cfg.vit_pretrained:
        state = load_checkpoint_file(cfg.vit_pretrained)
        load_vision_weights(model.visual_encoder, state.get("model", state))
        model.vit_source = cfg.vit_pretrained
    if cfg.pretrained:
        load_checkpoint(model, cfg.pretrained)
    return model


def build_eval_sets(cfg, splits):
    """{split: (dataset, ground truth)} for the splits that have an annotation file."""
    files = {"val": (cfg.data.val_file, cfg.data.val_gt_file), "test": (cfg.data.test_file, cfg.data.test_gt_file)}
    sets = {}
    for split in splits:
        ann_file, gt_file = files[split]
        if ann_file:
            dataset = RetrievalDataset(ann_file, cfg.data.image_root, eval_transform(cfg.model.image_size),
                                       cfg.data.max_words)
            truth = ground_truth_from_coco(gt_file) if gt_file else ground_truth_from_annotation(ann_file)
            sets[split] = (dataset, truth)
    return sets


def stage2_loss(model, batch, device):
    images, captions, _ = batch
    return model(images.to(device, non_blocking=True), list(captions))


def generation_options(e):
    return dict(num_beams=e.num_beams, max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens,
                repetition_penalty=e.repetition_penalty, length_penalty=e.length_penalty)


def text_only_baseline(model, ground_truth, options):
    """Caption metrics of the frozen OPT prompted without images: the same caption (`</s>` + prompt, beam search)
    for every image; what the soft prompt adds is the difference to the model's scores."""
    prompt_ids = model.opt_tokenizer([model.prompt], return_tensors="pt").input_ids.to(model.opt_proj.weight.device)
    with torch.no_grad():
        ids = model.opt_model.generate(input_ids=prompt_ids, eos_token_id=model.eos_token_id,
                                       pad_token_id=model.opt_tokenizer.pad_token_id, **options)
    caption = model.opt_tokenizer.decode(ids[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()
    log(f"text-only caption: {caption!r}")
    return broadcast_from_main(lambda: caption_metrics({image_id: caption for image_id in ground_truth}, ground_truth))


def main(argv=None):
    args = parse_args(__doc__, argv)
    cfg, device = start_run(args, Stage2Config)

    model = build_model(cfg.model).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"Blip2OPT: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{trainable / 1e6:.1f} M trainable")
    pin = device.type == "cuda"
    eval_sets = build_eval_sets(cfg, ("val", "test"))
    loaders = {split: eval_loader(dataset, cfg.eval.batch_size, cfg.data.num_workers, pin)
               for split, (dataset, _) in eval_sets.items()}
    options = generation_options(cfg.eval)

    def evaluate(split, header):
        def caption_fn(images):
            with autocast(device, cfg.train.amp):
                return model.caption(images.to(device, non_blocking=True), **options)
        results_path = os.path.join(args.output_dir, f"{header.lower().replace(' ', '_')}_captions.json")
        metrics, _ = evaluate_captions(caption_fn, loaders[split], eval_sets[split][1], header, results_path)
        return {**metrics, "agg_metric": agg_metric(metrics)}

    if args.evaluate:
        load_checkpoint(model, weights_to_evaluate(args, cfg.model.pretrained))
        model.eval()
        write_evaluation(args.output_dir, {f"{split}_{k}": v for split in loaders
                                           for k, v in evaluate(split, split).items()})
        return

    train_set = caption_train_set(cfg.data, cfg.model.image_size)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, pin)
    accum, optimizer, scheduler, scaler, start_epoch, best_metric = start_training(args, model, loader, cfg.train,
                                                                                   device)
    ddp_model = wrap_ddp(model, device)
    loss_fn = partial(stage2_loss, device=device)

    for epoch in range(start_epoch, cfg.train.epochs):
        train_stats = train_epoch(ddp_model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg.train, device,
                                  accum, args.output_dir)
        model.eval()
        val = evaluate("val", f"Val epoch {epoch}")
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"val_{k}": v for k, v in val.items()}}
        improved = val["agg_metric"] > best_metric
        best_metric = max(best_metric, val["agg_metric"])
        end_epoch(args.output_dir, stats, improved, {"val_agg_metric": val["agg_metric"]}, model, optimizer,
                  scheduler, scaler, epoch, best_metric, cfg)

    if "test" in loaders:
        best_epoch = load_best_weights(args.output_dir, model)
        model.eval()
        stats = {"best_epoch": best_epoch, **{f"test_{k}": v for k, v in evaluate("test", "Test").items()}}
        if cfg.eval.text_only_baseline:
            baseline = text_only_baseline(model, eval_sets["test"][1], options)
            stats.update({f"test_text_only_{k}": v for k, v in baseline.items()})
        if is_main_process():
            append_log(args.output_dir, stats)
        log(json.dumps(stats))
    log(f"best val CIDEr + BLEU-4 {best_metric:.4f}")


if __name__ == "__main__":
    run_main(main)
