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
from models.qformer import select_image_keys
from models.inference import evaluation_model
from utils import (Autocast, Count, InputError, MetricLogger, TrainConfig, all_gather_no_grad, all_reduce_sum, get_rank,
                   get_world_size, parse_args, run_main, start_run, unwrap, write_evaluation)


# Images whose Q-Former keys and values ITM re-ranking holds at once (at ViT-g, 32 images: 0.3 GB in fp32).
KEYED_IMAGES = 32
# What the retrieval protocol does not run: the ITC temperature (scores are cosines) and the ITG head.
RETRIEVAL_UNUSED = ("temp", "Qformer.cls.")


@dataclass
class RetrievalEvalConfig:
    """The `eval:` section of stage-1 and retrieval configs."""
    batch_size: Count = 64                    # images per forward
    k_test: Count = 256                       # candidates re-ranked by ITM (the original: 256 COCO, 128 Flickr30k)
    score: Literal["itm+itc", "itm", "itc"] = "itm+itc"
    text_batch_size: Count = 256
    itm_batch_size: Count = 128               # image-text pairs per ITM forward
    max_txt_len: Count = 35


@dataclass
class RetrievalConfig:
    data: CaptionDataConfig
    model: Blip2QformerConfig = field(default_factory=Blip2QformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)


def retrieval_loaders(cfg, device):
    """{split: loader} of the evaluation splits of a stage-1 config (data.val_file, data.test_file)."""
    return {split: eval_loader(dataset, cfg.eval.batch_size, **cfg.data.loader_kwargs(device))
            for split, dataset in eval_sets(cfg.data, cfg.model.image_size).items()}


def retrieval_evaluator(tokenizer, run):
    """evaluate(model, loader, header) -> metrics with the options of a stage-1 config's `eval` section, on the
    run's device and under its autocast."""
    e = run.cfg.eval
    return partial(evaluate_retrieval, tokenizer=tokenizer, device=run.device, autocast=run.autocast,
                   k_test=e.k_test, score=e.score, text_batch_size=e.text_batch_size, itm_batch_size=e.itm_batch_size,
                   max_length=e.max_txt_len)


def main(argv=None):
    args = parse_args(__doc__, argv, training=False)
    with start_run(args, RetrievalConfig) as run:
        loaders = retrieval_loaders(run.cfg, run.device)
        if not loaders:
            raise InputError(f"{args.config}: nothing to evaluate; set data.val_file and/or data.test_file")
        model, tokenizer = evaluation_model(run, RETRIEVAL_UNUSED)
        evaluate = retrieval_evaluator(tokenizer, run)
        write_evaluation(run, {split: evaluate(model, loader, header=split) for split, loader in loaders.items()})


def candidate_metrics(texts_of_image, scores_i2t, images_of_text, scores_t2i, txt2img):
    """Recall@K (percent) from each image's candidate texts texts_of_image [I, K] with their scores [I, K] and each
    text's candidate images images_of_text [T, K'] with scores [T, K']: an image counts as found at K when one of
    its texts ranks within the top K of its candidates, a text when its image does. Candidates are ranked by score,
    ties by index; a -inf score (left out of re-ranking) is never a hit, nor is a text missing from the
    candidates. Also the means per direction and overall (`r_mean`)."""
    txt2img = torch.as_tensor(txt2img)
    hit_i2t = (txt2img[texts_of_image] == torch.arange(len(texts_of_image))[:, None]) & (scores_i2t > float("-inf"))
    hit_t2i = (images_of_text == txt2img[:, None]) & (scores_t2i > float("-inf"))
    metrics = {}
    # A miss ranks after every text (image), as if all were scored: R@K counts it only when K exceeds them all.
    for name, ranks in (("txt", _first_hit(texts_of_image, scores_i2t, hit_i2t, len(txt2img))),
                        ("img", _first_hit(images_of_text, scores_t2i, hit_t2i, len(texts_of_image)))):
        for k in (1, 5, 10):
            metrics[f"{name}_r{k}"] = 100.0 * (ranks < k).sum().item() / len(ranks)
        metrics[f"{name}_r_mean"] = sum(metrics[f"{name}_r{k}"] for k in (1, 5, 10)) / 3
    metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    return metrics


def _first_hit(candidates, scores, hits, miss):
    """Per row, the position of the first hit once the candidates are sorted by score (descending, ties by
    candidate index); `miss` when there is none."""
    by_index = candidates.argsort(dim=1, stable=True)
    scores, hits = scores.gather(1, by_index), hits.gather(1, by_index)
    ranked_hits = hits.gather(1, scores.argsort(dim=1, descending=True, stable=True))
    return torch.where(ranked_hits.any(1), ranked_hits.int().argmax(1), miss)


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
def evaluate_retrieval(model, loader, tokenizer, device, autocast=None, k_test=256, score="itm+itc",
                       text_batch_size=256, itm_batch_size=128, max_length=35, header="Retrieval"):
    """Retrieval metrics of `model` on `loader.dataset` (a data.caption.RetrievalDataset whose loader shards the
    images over ranks), under `autocast` (a utils.Autocast; None: fp32). Each rank keeps the ln_vision image tokens
    of its own images only (in the autocast dtype),
    and re-ranks the pairs whose image it holds; the scores are kept for the top-k_test candidates of each image and
    each text only, so memory grows with (I + T) x k_test, not I x T. Returns candidate_metrics(...)."""
    if score not in ("itm+itc", "itm", "itc"):
        raise ValueError(f"score must be itm+itc, itm or itc; got {score!r}")
    model = unwrap(model)
    model.eval()
    autocast = autocast or Autocast(device, "fp32")
    dataset = loader.dataset
    if len(dataset) < get_world_size():
        raise InputError(f"{len(dataset)} evaluation images for {get_world_size()} processes: every process needs "
                         "at least one; use fewer processes")
    with autocast():
        text_feats, text_ids, text_mask = encode_texts(model, dataset.text, tokenizer, device, text_batch_size,
                                                       max_length)
        local_index, local_embeds, local_feats = [], [], []
        for images, index in MetricLogger().log_every(loader, 50, f"{header} images"):
            embeds = model.image_embeddings(images.to(device, non_blocking=True))
            local_feats.append(model.image_features(embeds).float())
            local_embeds.append(embeds.to(autocast.dtype))
            local_index.append(index.to(device))
    local_index, local_embeds = torch.cat(local_index), torch.cat(local_embeds)
    image_feats = _unshard(torch.cat(local_feats), len(dataset))
    num_texts = len(dataset.text)
    if score == "itc":  # R@10 needs only the best 10 of each row
        itc_i2t, texts_of_image, itc_t2i, images_of_text = itc_candidates(image_feats, text_feats, 10)
        return candidate_metrics(texts_of_image.cpu(), itc_i2t.cpu(), images_of_text.cpu(), itc_t2i.cpu(),
                                 dataset.txt2img)

    itc_i2t, texts_of_image, itc_t2i, images_of_text = itc_candidates(image_feats, text_feats, k_test)
    # Each pair re-ranked once, whether one direction or both chose it.
    keys = torch.cat([(torch.arange(len(image_feats), device=device)[:, None] * num_texts + texts_of_image).flatten(),
                      (images_of_text * num_texts + torch.arange(num_texts, device=device)[:, None]).flatten()])
    pairs, where = keys.unique(return_inverse=True)
    itm = _itm_for_pairs(model, pairs // num_texts, pairs % num_texts, len(dataset), local_index, local_embeds,
                         text_ids, text_mask, itm_batch_size, autocast, header)[where]
    itm_i2t, itm_t2i = itm[:texts_of_image.numel()].view_as(itc_i2t), itm[texts_of_image.numel():].view_as(itc_t2i)
    if score == "itm+itc":
        itm_i2t, itm_t2i = itm_i2t + itc_i2t, itm_t2i + itc_t2i
    return candidate_metrics(texts_of_image.cpu(), itm_i2t.cpu(), images_of_text.cpu(), itm_t2i.cpu(),
                             dataset.txt2img)


def itc_candidates(image_feats, text_feats, k, chunk=256):
    """The top-k ITC candidates in both directions, a chunk of images at a time so that no [I, T] matrix is held:
    (scores [I, k], text indices [I, k], scores [T, k], image indices [T, k])."""
    k_texts, k_images = min(k, len(text_feats)), min(k, len(image_feats))
    i2t_scores, i2t_index = [], []
    t2i_scores = text_feats.new_empty(len(text_feats), 0)
    t2i_index = torch.empty(len(text_feats), 0, dtype=torch.long, device=text_feats.device)
    for start in range(0, len(image_feats), chunk):
        sim = itc_similarity(image_feats[start:start + chunk], text_feats)  # [chunk, T]
        best = sim.topk(k_texts, dim=1)
        i2t_scores.append(best.values)
        i2t_index.append(best.indices)
        scores = torch.cat([t2i_scores, sim.t()], 1)
        index = torch.cat([t2i_index, torch.arange(start, start + len(sim), device=sim.device).expand_as(sim.t())], 1)
        best = scores.topk(min(k_images, scores.shape[1]), dim=1)
        t2i_scores, t2i_index = best.values, index.gather(1, best.indices)
    return torch.cat(i2t_scores), torch.cat(i2t_index), t2i_scores, t2i_index


def _itm_for_pairs(model, images, texts, num_images, local_index, local_embeds, text_ids, text_mask, batch_size,
                   autocast, header):
    """ITM scores [P] of the pairs (images[p], texts[p]), summed over ranks: each rank scores the pairs of the images
    it holds (0 elsewhere). The images go in groups of KEYED_IMAGES, whose cross-attention keys and values are
    computed once for all their pairs; a group's pairs go in order of text length and each batch is cut to its
    longest text, so that padding costs nothing."""
    device = local_embeds.device
    position = torch.full((num_images,), -1, device=device)  # of each image in this rank's local_embeds
    position[local_index] = torch.arange(len(local_index), device=device)
    mine = (position[images] >= 0).nonzero().squeeze(1)
    lengths = text_mask.sum(1)
    group = position[images[mine]] // KEYED_IMAGES
    mine = mine[(group * (text_mask.shape[1] + 1) + lengths[texts[mine]]).argsort(stable=True)]
    batches = [chunk for part in mine.split(torch.bincount(group).tolist()) for chunk in part.split(batch_size)]
    scores = torch.zeros(len(images), device=device)
    keyed = None
    for chunk in MetricLogger().log_every(batches, 50, f"{header} ITM re-ranking"):
        first = int(position[images[chunk[0]]]) // KEYED_IMAGES * KEYED_IMAGES
        text, longest = texts[chunk], int(lengths[texts[chunk]].max())
        with autocast():
            if keyed is None or keyed[0] != first:
                keyed = first, model.image_keys(local_embeds[first:first + KEYED_IMAGES])
            itm = model.itm_scores(select_image_keys(keyed[1], position[images[chunk]] - first),
                                   text_ids[text, :longest], text_mask[text, :longest])
        scores[chunk] = itm.float()
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
