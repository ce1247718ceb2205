"""BLIP-2 stage 1: pre-train the Q-Former against a frozen image encoder with ITC + ITM + ITG.

    python -m torch.distributed.run --nproc_per_node=8 train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out
    python train_blip2_stage1.py --config configs/blip2_stage1.yaml --output_dir out --evaluate --checkpoint blip2_pretrained.pth

Image-text retrieval on the val split is evaluated after every epoch (the best checkpoint is kept by its r_mean);
the test split is evaluated at the end with the best weights.
"""

import json
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Optional


from data.caption import CaptionSource, RetrievalDataset, caption_train_set
from data.loader import eval_loader, train_loader
from data.transforms import eval_transform
from eval_retrieval import evaluate_retrieval
from models.blip2_qformer import Blip2Qformer, load_checkpoint
from models.eva_vit import load_vision_weights
from models.qformer import load_bert_weights
from models.tokenizer import init_tokenizer
from utils import (TrainConfig, append_log, end_epoch, is_main_process, load_best_weights, load_checkpoint_file, log,
                   parse_args, run_main, start_run, start_training, train_epoch, weights_to_evaluate, wrap_ddp,
                   write_evaluation)


@dataclass
class ModelConfig:
    vision: Literal["eva_vit_g", "clip_vit_L", "eva_tiny"] = "eva_vit_g"
    image_size: int = 224
    patch_size: Optional[int] = None          # null: the encoder's own (14 for EVA ViT-g and CLIP ViT-L)
    vit_pretrained: Optional[str] = None      # image-encoder weights (eva_vit_g.pth, clip_vit_L.pth): path or URL
    freeze_vit: bool = True
    vit_precision: Literal["fp16", "bf16", "fp32"] = "fp16"   # weights of the frozen encoder
    drop_path_rate: float = 0.0
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: int = 0                   # with vit_grad_ckpt: checkpoint the last N blocks (trainable ViT only)
    qformer: Literal["tiny", "base"] = "base"
    bert: Optional[str] = "bert-base-uncased"  # BERT weights for the Q-Former (hub name or local dir); null: random
    tokenizer: str = "bert-base-uncased"      # hub name or local directory with vocab.txt
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    embed_dim: int = 256
    max_txt_len: int = 32
    clamp_temp: bool = False                  # BLIP clamped the ITC temperature to [0.001, 0.5]; BLIP-2 does not
    same_image_positives: bool = True         # captions of one image are ITC positives, never ITM negatives
    pretrained: Optional[str] = None          # stage-1 checkpoint to start from (LAVIS or transformers layout)


@dataclass
class DataConfig:
    train: list[CaptionSource]
    val_file: str                             # Karpathy format: [{"image", "caption": [...]}]
    test_file: Optional[str] = None
    image_root: str = "."                     # of the val and test images
    max_words: int = 50
    eval_max_words: int = 30
    crop_scale: tuple[float, float] = (0.5, 1.0)
    hflip: bool = True
    num_workers: int = 4
    skip_missing_images: bool = False         # drop training pairs whose image is missing instead of stopping


@dataclass
class EvalConfig:
    batch_size: int = 64                      # images per forward
    k_test: int = 256                         # candidates re-ranked by ITM (the original: 256 COCO, 128 Flickr30k)
    score: Literal["itm+itc", "itm", "itc"] = "itm+itc"
    text_batch_size: int = 256
    itm_batch_size: int = 128                 # image-text pairs per ITM forward
    max_txt_len: int = 35


@dataclass
class Stage1Config:
    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def build_model(cfg, tokenizer):
    token_ids = {"bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id, "eos": tokenizer.sep_token_id}
    model = Blip2Qformer(token_ids, vision=cfg.vision, image_size=cfg.image_size, patch_size=cfg.patch_size,
                         freeze_vit=cfg.freeze_vit, vit_precision=cfg.vit_precision, drop_path_rate=cfg.drop_path_rate,
                         vit_grad_ckpt_layers=cfg.vit_ckpt_layer if cfg.vit_grad_ckpt else 0, qformer=cfg.qformer,
                         vocab_size=len(tokenizer), num_query_tokens=cfg.num_query_tokens,
                         cross_attention_freq=cfg.cross_attention_freq, embed_dim=cfg.embed_dim,
                         clamp_temp=cfg.clamp_temp)
    if cfg.vit_pretrained:
        state = load_checkpoint_file(cfg.vit_pretrained)
        load_vision_weights(model.visual_encoder, state.get("model", state))
    if cfg.bert:
        load_bert_weights(model.Qformer, cfg.bert)
    return model


def build_eval_sets(cfg, splits):
    files = {"val": cfg.data.val_file, "test": cfg.data.test_file}
    return {split: RetrievalDataset(files[split], cfg.data.image_root, eval_transform(cfg.model.image_size),
                                    cfg.data.eval_max_words) for split in splits if files[split]}


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

    tokenizer = init_tokenizer(cfg.model.tokenizer, enc_token=False)
    model = build_model(cfg.model, tokenizer).to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"Blip2Qformer: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
        f"{trainable / 1e6:.1f} M trainable")
    pin = device.type == "cuda"
    eval_sets = build_eval_sets(cfg, ("val", "test"))
    loaders = {split: eval_loader(dataset, cfg.eval.batch_size, cfg.data.num_workers, pin)
               for split, dataset in eval_sets.items()}
    e = cfg.eval
    evaluate = partial(evaluate_retrieval, tokenizer=tokenizer, device=device, amp=cfg.train.amp, k_test=e.k_test,
                       score=e.score, text_batch_size=e.text_batch_size, itm_batch_size=e.itm_batch_size,
                       max_length=e.max_txt_len)
    if args.evaluate:
        load_checkpoint(model, weights_to_evaluate(args, cfg.model.pretrained))
        write_evaluation(args.output_dir, {f"{split}_{k}": v for split, loader in loaders.items()
                                           for k, v in evaluate(model, loader, header=split).items()})
        return

    train_set = caption_train_set(cfg.data, cfg.model.image_size)
    loader = train_loader(train_set, cfg.train.batch_size, cfg.data.num_workers, cfg.train.seed, pin)
    accum, optimizer, scheduler, scaler, start_epoch, best_r_mean = start_training(args, model, loader, cfg.train,
                                                                                   device)
    if cfg.model.pretrained and not args.resume:
        load_checkpoint(model, cfg.model.pretrained)
    ddp_model = wrap_ddp(model, device)
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
