"""Image-text retrieval with a BLIP-2 stage-1 model: ITC similarity for all pairs, the top k re-ranked by ITM.

    python -m torch.distributed.run --nproc_per_node=8 eval_retrieval.py --config configs/retrieval_coco.yaml --output_dir out
    python eval_retrieval.py --config configs/blip2_stage1_demo.yaml --output_dir out --checkpoint output/blip2_stage1_demo/checkpoint_best.pth

The protocol of the original: sim(i, t) = max over queries of the cosine of query and text features (no
temperature); for each image its top `k_test` texts, and for each text its top `k_test` images, are re-scored by the
ITM "match" logit; final score ITM + ITC (or ITM only, or ITC only). Recall@1/5/10 in both directions, in percent,
for data.val_file and data.test_file, printed as a table and written to output_dir/evaluate.txt (JSON). Any stage-1
training config is also an evaluation config (its data.train and training settings are not used, train.amp is).
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch

from data.caption import CaptionDataConfig, eval_sets
from data.loader import eval_loader
from models.blip2_qformer import Blip2QformerConfig, itc_similarity
from models.inference import load_model
from utils import (AMP_DTYPES, InputError, MetricLogger, TrainConfig, all_gather_no_grad, all_reduce_sum, autocast,
                   get_rank, get_world_size, parse_args, run_main, start_run, unwrap, weights_to_evaluate,
                   write_evaluation)


@dataclass
class RetrievalEvalConfig:
    """The `eval:` section of stage-1 and retrieval configs."""
    batch_size: int = 64                      # images per forward
    k_test: int = 256                         # candidates re-ranked by ITM (the original: 256 COCO, 128 Flickr30k)
    score: Literal["itm+itc", "itm", "itc"] = "itm+itc"
    text_batch_size: int = 256
    itm_batch_size: int = 128                 # image-text pairs per ITM forward
    max_txt_len: int = 35


@dataclass
class RetrievalConfig:
    data: CaptionDataConfig
    model: Blip2QformerConfig = field(default_factory=Blip2QformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)


def retrieval_loaders(cfg, device):
    """{split: loader} of the evaluation splits of a stage-1 config (data.val_file, data.test_file)."""
    return {split: eval_loader(dataset, cfg.eval.batch_size, cfg.data.num_workers, device.type == "cuda")
            for split, dataset in eval_sets(cfg.data, cfg.model.image_size).items()}


def retrieval_evaluator(cfg, tokenizer, device):
    """evaluate(model, loader, header) -> metrics with the options of a stage-1 config's `eval` section."""
    e = cfg.eval
    return partial(evaluate_retrieval, tokenizer=tokenizer, device=device, amp=cfg.train.amp, k_test=e.k_test,
                   score=e.score, text_batch_size=e.text_batch_size, itm_batch_size=e.itm_batch_size,
                   max_length=e.max_txt_len)


def main(argv=None):
    args = parse_args(__doc__, argv, training=False)
    cfg, device = start_run(args, RetrievalConfig)
    loaders = retrieval_loaders(cfg, device)
    if not loaders:
        raise InputError(f"{args.config}: nothing to evaluate; set data.val_file and/or data.test_file")
    model, tokenizer = load_model(cfg.model, weights_to_evaluate(args, cfg.model.pretrained))
    model.to(device)
    evaluate = retrieval_evaluator(cfg, tokenizer, device)
    write_evaluation(args.output_dir, {split: evaluate(model, loader, header=split)
                                       for split, loader in loaders.items()})


def retrieval_metrics(scores_i2t, scores_t2i, img2txt, txt2img):
    """Recall@K (percent) from score matrices scores_i2t [I, T] and scores_t2i [T, I]: an image counts as found at K
    when any of its ground-truth texts `img2txt[i]` ranks within the top K; a text when its image `txt2img[t]`
    does (a -inf score is never a hit). Also the means per direction and overall (`r_mean`)."""
    scores_i2t, scores_t2i = torch.as_tensor(scores_i2t), torch.as_tensor(scores_t2i)
    order_i2t = scores_i2t.argsort(dim=1, descending=True, stable=True)
    order_t2i = scores_t2i.argsort(dim=1, descending=True, stable=True)
    text_rank = torch.tensor([_first_position(order_i2t[i], img2txt[i], scores_i2t[i]) for i in range(len(img2txt))])
    image_rank = torch.tensor([_first_position(order_t2i[t], [txt2img[t]], scores_t2i[t])
                               for t in range(len(txt2img))])
    metrics = {}
    for name, ranks in (("txt", text_rank), ("img", image_rank)):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100.0 * (ranks < k).sum().item() / len(ranks)
        metrics[f"{name}_r_mean"] = sum(metrics[f"{name}_r{k}"] for k in (1, 5, 10)) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _first_position(order, targets, scores):
    """The best (smallest) position in `order` of any of `targets` that has a score; unscored (-inf) candidates,
    those left out of re-ranking, are never found, whatever their index."""
    targets = [t for t in targets if scores[t] > float("-inf")]
    hits = torch.isin(order, torch.as_tensor(targets, dtype=order.dtype)).nonzero()
    return int(hits[0, 0]) if len(hits) else len(order)


@torch.no_grad()
def encode_texts(model, texts, tokenizer, device, batch_size, max_length):
    """Every rank encodes its shard (rank::world) of `texts`; returns (features [T, E], ids [T, L], mask [T, L]) of
    all texts, in order, on every rank."""
    tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    shard = torch.arange(get_rank(), len(texts), get_world_size(), device=device)
    feats = [model.text_features(ids[chunk], mask[chunk]).float() for chunk in shard.split(batch_size)]
    feats = torch.cat(feats) if feats else torch.empty(0, model.text_proj.out_features, device=device)
    return _unshard(feats, len(texts)), ids, mask


@torch.no_grad()
def evaluate_retrieval(model, loader, tokenizer, device, amp="off", k_test=256, score="itm+itc", text_batch_size=256,
                       itm_batch_size=128, max_length=35, header="Retrieval"):
    """Retrieval metrics of `model` on `loader.dataset` (a data.caption.RetrievalDataset whose loader shards the
    images over ranks). Each rank keeps the ln_vision image tokens of its own images only (in the autocast dtype),
    and re-ranks the pairs whose image it holds. Returns retrieval_metrics(...)."""
    if score not in ("itm+itc", "itm", "itc"):
        raise ValueError(f"score must be itm+itc, itm or itc; got {score!r}")
    model = unwrap(model)
    model.eval()
    dataset = loader.dataset
    if len(dataset) < get_world_size():
        raise InputError(f"{len(dataset)} evaluation images for {get_world_size()} processes: every process needs "
                         "at least one; use fewer processes")
    with autocast(device, amp):
        text_feats, text_ids, text_mask = encode_texts(model, dataset.text, tokenizer, device, text_batch_size,
                                                       max_length)
        local_index, local_embeds, local_feats = [], [], []
        for images, index in MetricLogger().log_every(loader, 50, f"{header} images"):
            embeds = model.image_embeddings(images.to(device, non_blocking=True))
            local_feats.append(model.image_features(embeds).float())
            local_embeds.append(embeds.to(AMP_DTYPES[amp] or embeds.dtype))
            local_index.append(index.to(device))
    local_index, local_embeds = torch.cat(local_index), torch.cat(local_embeds)
    image_feats = _unshard(torch.cat(local_feats), len(dataset))
    sim_i2t = itc_similarity(image_feats, text_feats)  # [I, T]
    if score == "itc":
        return retrieval_metrics(sim_i2t, sim_i2t.t(), dataset.img2txt, dataset.txt2img)

    k_texts, k_images = min(k_test, sim_i2t.shape[1]), min(k_test, sim_i2t.shape[0])
    chosen_i2t = torch.zeros_like(sim_i2t, dtype=torch.bool).scatter_(1, sim_i2t.topk(k_texts, dim=1).indices, True)
    chosen_t2i = torch.zeros_like(sim_i2t.t(), dtype=torch.bool).scatter_(
        1, sim_i2t.t().topk(k_images, dim=1).indices, True)
    itm = _itm_for_pairs(model, chosen_i2t | chosen_t2i.t(), local_index, local_embeds, text_ids, text_mask,
                         itm_batch_size, device, amp, header)
    total = itm + (sim_i2t if score == "itm+itc" else 0)
    scores_i2t = torch.where(chosen_i2t, total, float("-inf"))
    scores_t2i = torch.where(chosen_t2i, total.t(), float("-inf"))
    return retrieval_metrics(scores_i2t.cpu(), scores_t2i.cpu(), dataset.img2txt, dataset.txt2img)


def _itm_for_pairs(model, pairs, local_index, local_embeds, text_ids, text_mask, batch_size, device, amp, header):
    """ITM scores [I, T] for the True entries of `pairs` [I, T]: each rank scores the pairs of the images it holds;
    entries elsewhere are 0."""
    scores = torch.zeros(pairs.shape, device=device)
    image, text = pairs[local_index].nonzero(as_tuple=True)  # image: position in this rank's embeddings
    chunks = list(zip(image.split(batch_size), text.split(batch_size)))
    for image_chunk, text_chunk in MetricLogger().log_every(chunks, 50, f"{header} ITM re-ranking"):
        with autocast(device, amp):
            itm = model.itm_scores(local_embeds[image_chunk].float(), text_ids[text_chunk], text_mask[text_chunk])
        scores[local_index[image_chunk], text_chunk] = itm.float()
    return all_reduce_sum(scores)


def _unshard(local, total):
    """Rows rank::world of every rank -> all `total` rows in order (on every rank)."""
    world = get_world_size()
    per_rank = -(-total // world)
    padded = torch.cat([local, local.new_zeros(per_rank - len(local), *local.shape[1:])])
    gathered = all_gather_no_grad(padded).view(world, per_rank, *local.shape[1:])
    return gathered.transpose(0, 1).reshape(world * per_rank, *local.shape[1:])[:total]


if __name__ == "__main__":
    run_main(main)
