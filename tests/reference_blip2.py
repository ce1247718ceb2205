"""An independent re-implementation of LAVIS's Blip2Qformer.forward (one process), for parity tests.

Written from the original's semantics on a plain state dict: BERT attention with additive -10000 masks built as
LAVIS's `get_extended_attention_mask` builds them, key/value caching, and the hard negatives drawn per row with
`torch.multinomial` in the original's order (a negative image for every text, then a negative text for every image).
"""

import math

import torch
import torch.nn.functional as F


def _ln(x, sd, p, eps=1e-12):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def _attention(x, context, sd, p, heads, additive_mask, past=None):
    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)

    q = split(_lin(x, sd, p + ".query"))
    k, v = split(_lin(context, sd, p + ".key")), split(_lin(context, sd, p + ".value"))
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + additive_mask
    ctx = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).flatten(2)
    return ctx, (k, v)


def extended_mask(attention_mask, text_length, is_decoder, has_query):
    """LAVIS's get_extended_attention_mask, additive."""
    if is_decoder:
        batch = attention_mask.shape[0]
        seq = torch.arange(text_length)
        causal = (seq[None, None, :].repeat(batch, text_length, 1) <= seq[None, :, None]).float()
        if causal.shape[1] < attention_mask.shape[1]:
            prefix = attention_mask.shape[1] - causal.shape[1]
            if has_query:
                causal = torch.cat([torch.zeros(batch, prefix, text_length), causal], 1)
            causal = torch.cat([torch.ones(batch, causal.shape[1], prefix), causal], -1)
        ext = causal[:, None, :, :] * attention_mask[:, None, None, :].float()
    else:
        ext = attention_mask[:, None, None, :].float()
    return (1.0 - ext) * -10000.0


def qformer(sd, cfg, input_ids=None, query_embeds=None, attention_mask=None, image_embeds=None, past=None,
            is_decoder=False):
    """Qformer.bert forward: (hidden [B, Q + L, H], per-layer (keys, values))."""
    p = "Qformer.bert."
    parts = [] if query_embeds is None else [query_embeds]
    if input_ids is not None:
        positions = torch.arange(input_ids.shape[1])
        parts.append(sd[p + "embeddings.word_embeddings.weight"][input_ids]
                     + sd[p + "embeddings.position_embeddings.weight"][positions])
    x = _ln(torch.cat(parts, 1), sd, p + "embeddings.LayerNorm")
    query_length = 0 if query_embeds is None else query_embeds.shape[1]
    text_length = 0 if input_ids is None else input_ids.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones(x.shape[0], x.shape[1] + (past[0][0].shape[2] if past else 0))
    mask = extended_mask(attention_mask, text_length if is_decoder else x.shape[1], is_decoder,
                         query_embeds is not None)
    presents = []
    for i in range(cfg["layers"]):
        lp = f"{p}encoder.layer.{i}."
        layer_past = None if past is None else past[i]
        ctx, present = _attention(x, x, sd, lp + "attention.self", cfg["heads"], mask, layer_past)
        presents.append(present)
        x = _ln(_lin(ctx, sd, lp + "attention.output.dense") + x, sd, lp + "attention.output.LayerNorm")
        if query_length > 0:
            q = x[:, :query_length]
            if lp + "crossattention.self.query.weight" in sd:
                ctx, _ = _attention(q, image_embeds, sd, lp + "crossattention.self", cfg["heads"], 0.0)
                q = _ln(_lin(ctx, sd, lp + "crossattention.output.dense") + q, sd,
                        lp + "crossattention.output.LayerNorm")
            q = _ln(_lin(F.gelu(_lin(q, sd, lp + "intermediate_query.dense")), sd, lp + "output_query.dense") + q,
                    sd, lp + "output_query.LayerNorm")
            t = x[:, query_length:]
            if t.shape[1] > 0:
                t = _ln(_lin(F.gelu(_lin(t, sd, lp + "intermediate.dense")), sd, lp + "output.dense") + t, sd,
                        lp + "output.LayerNorm")
                x = torch.cat([q, t], 1)
            else:
                x = q
        else:
            x = _ln(_lin(F.gelu(_lin(x, sd, lp + "intermediate.dense")), sd, lp + "output.dense") + x, sd,
                    lp + "output.LayerNorm")
    return x, presents


def lm_logits(sd, hidden):
    p = "Qformer.cls.predictions."
    h = _ln(F.gelu(_lin(hidden, sd, p + "transform.dense")), sd, p + "transform.LayerNorm")
    return F.linear(h, sd[p + "decoder.weight"], sd[p + "bias"])


def blip2_losses(sd, cfg, vit_tokens, input_ids, attention_mask, image_ids=None, bos_id=30522, pad_id=0,
                 distributed=False):
    """LAVIS Blip2Qformer.forward for one process: {"loss_itc", "loss_itm", "loss_itg"} and the features. With
    `distributed`, ITC's gradients as LAVIS's under DDP, where concat_all_gather's copies carry none (one process:
    the gathered tensor is the input itself, and the similarities pass gradients both ways)."""
    image_embeds = F.layer_norm(vit_tokens, (vit_tokens.shape[-1],), sd["ln_vision.weight"], sd["ln_vision.bias"],
                                cfg["ln_vision_eps"])
    bs = image_embeds.shape[0]
    query_tokens = sd["query_tokens"].expand(bs, -1, -1)
    query_output, past = qformer(sd, cfg, query_embeds=query_tokens, image_embeds=image_embeds)
    image_feats = F.normalize(_lin(query_output, sd, "vision_proj"), dim=-1)
    text_output, _ = qformer(sd, cfg, input_ids, attention_mask=attention_mask)
    text_feat = F.normalize(_lin(text_output[:, 0, :], sd, "text_proj"), dim=-1)

    temp = sd["temp"]
    image_feats_all, text_feat_all = (image_feats.detach(), text_feat.detach()) if distributed else (image_feats,
                                                                                                     text_feat)
    sim_q2t = torch.matmul(image_feats.unsqueeze(1), text_feat_all.unsqueeze(-1)).squeeze(-1)
    sim_i2t = sim_q2t.max(-1)[0] / temp
    sim_t2q = torch.matmul(text_feat.unsqueeze(1).unsqueeze(1), image_feats_all.permute(0, 2, 1)).squeeze(-2)
    sim_t2i = sim_t2q.max(-1)[0] / temp
    targets = torch.arange(bs)
    if image_ids is not None:
        pos_idx = torch.eq(image_ids.view(-1, 1), image_ids.view(1, -1)).float()
        sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
        sim_targets = 0.9 * sim_targets + 0.1 * torch.ones_like(sim_targets) / sim_targets.size(1)
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_targets, dim=1).mean()
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_targets, dim=1).mean()
        loss_itc = (loss_t2i + loss_i2t) / 2
    else:
        loss_itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
                    + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2

    with torch.no_grad():
        sim_t2i, sim_i2t = sim_t2i.clone(), sim_i2t.clone()
        if image_ids is not None:
            mask = torch.eq(image_ids.view(-1, 1), image_ids.view(1, -1))
            sim_t2i.masked_fill_(mask, -10000)
            sim_i2t.masked_fill_(mask, -10000)
        else:
            sim_t2i.fill_diagonal_(-10000)
            sim_i2t.fill_diagonal_(-10000)
        weights_t2i, weights_i2t = F.softmax(sim_t2i, dim=1), F.softmax(sim_i2t, dim=1)
    neg_images = [torch.multinomial(weights_t2i[b], 1).item() for b in range(bs)]
    neg_texts = [torch.multinomial(weights_i2t[b], 1).item() for b in range(bs)]
    image_embeds_neg = image_embeds[neg_images]
    text_ids_all = torch.cat([input_ids, input_ids, input_ids[neg_texts]], 0)
    text_atts_all = torch.cat([attention_mask, attention_mask, attention_mask[neg_texts]], 0)
    query_tokens_itm = sd["query_tokens"].expand(3 * bs, -1, -1)
    attention_mask_all = torch.cat([torch.ones(3 * bs, query_tokens_itm.shape[1]), text_atts_all.float()], 1)
    image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds], 0)
    output_itm, _ = qformer(sd, cfg, text_ids_all, query_tokens_itm, attention_mask_all, image_embeds_all)
    logits = _lin(output_itm[:, :query_tokens_itm.shape[1]], sd, "itm_head").mean(1)
    itm_labels = torch.cat([torch.ones(bs), torch.zeros(2 * bs)]).long()
    loss_itm = F.cross_entropy(logits, itm_labels)

    decoder_input_ids = input_ids.clone()
    decoder_input_ids[:, 0] = bos_id
    labels = decoder_input_ids.masked_fill(decoder_input_ids == pad_id, -100)
    attention_mask_itg = torch.cat([torch.ones(bs, query_tokens.shape[1]), attention_mask.float()], 1)
    hidden, _ = qformer(sd, cfg, decoder_input_ids, attention_mask=attention_mask_itg, past=past, is_decoder=True)
    scores = lm_logits(sd, hidden)
    loss_itg = F.cross_entropy(scores[:, :-1].reshape(-1, scores.shape[-1]), labels[:, 1:].reshape(-1),
                               label_smoothing=0.1)
    return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg, "image_feats": image_feats,
            "text_feat": text_feat, "neg_images": neg_images, "neg_texts": neg_texts}
