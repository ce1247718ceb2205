"""BLIP-2 stage 1: the Q-Former trained against a frozen image encoder with ITC, ITM and ITG.

State-dict keys are those of LAVIS's `Blip2Qformer` (`blip2_pretrained.pth`): `visual_encoder.*`, `ln_vision.*`,
`query_tokens`, `Qformer.*`, `vision_proj.*`, `text_proj.*`, `itm_head.*`, `temp`. `to_hf_retrieval` and
`from_hf_retrieval` convert to and from transformers' `Blip2ForImageTextRetrieval` layout.

Shapes: images [B, 3, S, S]; text ids and attention mask [B, L] starting with [CLS]; image tokens [B, N, Dv]
(after ln_vision); query outputs [B, Q, H]; features [B, Q, E] (image) and [B, E] (text), L2-normalised.
"""

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from models.eva_vit import (VisionConfig, create_vision_encoder, freeze_vision_encoder, load_vision_file,
                            load_vision_weights)
from models.families import refuse_other_families
from models.generation import beam_search, nucleus_sampling
from models.qformer import (build_qformer, cat_image_keys, causal_mask_with_query_prefix, image_batch_size,
                            load_bert_weights, padding_mask, unilm_mask)
from models.tokenizer import init_tokenizer
from utils import (DTYPES, InputError, all_gather_no_grad, all_gather_with_grad, all_reduce_sum, get_rank,
                   get_world_size, load_checkpoint_file, log)

CHECKPOINT_URLS = {
    "pretrain": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_pretrained.pth",
    "coco": "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/blip2_finetune_coco.pth",
}
# What transformers' Blip2ForImageTextRetrieval layout has no place for (kept in a side file).
HF_SIDE_KEYS = ("temp", "Qformer.cls.")


@dataclass
class Blip2QformerConfig(VisionConfig):
    """The `model:` section of a stage-1 config."""
    arch: Literal["blip2_qformer"] = "blip2_qformer"
    qformer: Literal["tiny", "base"] = "base"
    bert: Optional[str] = "bert-base-uncased"  # BERT weights for the Q-Former (hub name or local dir); null: random
    tokenizer: str = "bert-base-uncased"      # hub name or local directory with vocab.txt
    num_query_tokens: int = 32
    cross_attention_freq: int = 2
    embed_dim: int = 256
    max_txt_len: int = 32
    clamp_temp: bool = False                  # BLIP clamped the ITC temperature to [0.001, 0.5]; BLIP-2 does not
    same_image_positives: bool = True         # captions of one image are ITC positives, never ITM negatives
    itg_attention: Literal["causal", "masked"] = "causal"  # see Blip2Qformer.itg_loss
    pretrained: Optional[str] = None          # stage-1 checkpoint to start from (LAVIS or transformers layout)


def create_model(cfg):
    """(Blip2Qformer, its tokenizer) for a Blip2QformerConfig: the architecture, with the image encoder's weights
    from `vit_pretrained`. The rest comes from a checkpoint (load_checkpoint) or, training from scratch, from
    `init_from_bert`."""
    tokenizer = init_tokenizer(cfg.tokenizer, enc_token=False)
    token_ids = {"bos": tokenizer.bos_token_id, "pad": tokenizer.pad_token_id, "eos": tokenizer.sep_token_id}
    model = Blip2Qformer(token_ids, **cfg.encoder_kwargs(), qformer=cfg.qformer,
                         vocab_size=len(tokenizer), num_query_tokens=cfg.num_query_tokens,
                         cross_attention_freq=cfg.cross_attention_freq, embed_dim=cfg.embed_dim,
                         clamp_temp=cfg.clamp_temp, itg_attention=cfg.itg_attention)
    if cfg.vit_pretrained:
        load_vision_file(model.visual_encoder, cfg.vit_pretrained)
    return model, tokenizer


def init_from_bert(cfg):
    """The Q-Former's own initialisation from the BERT that `cfg.bert` names (None: keep the random one), as a
    function of the model for utils.start_training."""
    return (lambda model: load_bert_weights(model.Qformer, cfg.bert)) if cfg.bert else None


def decode_captions(tokenizer, ids):
    """Token ids from Blip2Qformer.generate [B, T] -> B caption strings."""
    return [caption.strip() for caption in tokenizer.batch_decode(ids, skip_special_tokens=True)]


class Blip2Qformer(nn.Module):
    """Frozen image encoder -> ln_vision -> Q-Former with learned queries; ITC/ITM/ITG heads.

    `token_ids`: {"bos": [DEC], "pad": [PAD], "eos": [SEP]} of the tokenizer.
    """

    def __init__(self, token_ids, vision="eva_vit_g", image_size=224, patch_size=None, freeze_vit=True,
                 vit_precision="fp16", drop_path_rate=0.0, vit_grad_ckpt_layers=0, qformer="base", vocab_size=30523,
                 num_query_tokens=32, cross_attention_freq=2, embed_dim=256, clamp_temp=False, ln_vision_eps=1e-5,
                 itg_attention="causal"):
        super().__init__()
        self.token_ids = token_ids
        self.visual_encoder = create_vision_encoder(vision, image_size, drop_path_rate, vit_grad_ckpt_layers,
                                                    patch_size)
        if freeze_vit:
            freeze_vision_encoder(self.visual_encoder, DTYPES[vit_precision])
        width = self.visual_encoder.num_features
        self.ln_vision = nn.LayerNorm(width, eps=ln_vision_eps)
        self.Qformer = build_qformer(qformer, vocab_size, width, cross_attention_freq)
        hidden = self.Qformer.bert.config.hidden_size
        self.query_tokens = nn.Parameter(torch.randn(1, num_query_tokens, hidden) * 0.02)
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.clamp_temp = clamp_temp
        self.itg_attention = itg_attention

    # ------------------------------------------------------------------------------------------------ encoders

    def image_embeddings(self, images):
        """images [B, 3, S, S] -> ln_vision(ViT tokens) [B, N, Dv] in fp32. `images` may also be the frozen
        encoder's own tokens [B, N, Dv] (data/feature_cache.py), which skip the encoder."""
        tokens = images if images.dim() == 3 else self.visual_encoder(images)
        return self.ln_vision(tokens.float())

    def image_keys(self, image_embeds):
        """The Q-Former's cross-attention keys and values of image_embeds [B, N, Dv], per layer: computed once,
        they serve every pass over these images (query_outputs, itm_logits; select_image_keys picks rows)."""
        return self.Qformer.bert.image_keys(image_embeds)

    def query_outputs(self, image_embeds):
        """The queries after the Q-Former over the image (image_embeds [B, N, Dv] or their image_keys):
        ([B, Q, H], per-layer (keys, values) for ITG)."""
        queries = self.query_tokens.expand(image_batch_size(image_embeds), -1, -1)
        return self.Qformer.bert(query_embeds=queries, image_embeds=image_embeds)

    def image_features(self, image_embeds):
        """[B, N, Dv] -> L2-normalised query features [B, Q, E]."""
        return F.normalize(self.vision_proj(self.query_outputs(image_embeds)[0]), dim=-1)

    def text_features(self, input_ids, attention_mask):
        """[B, L] -> L2-normalised [CLS] features [B, E] (text-only pass)."""
        hidden, _ = self.Qformer.bert(input_ids, mask=padding_mask(attention_mask), keep=1)
        return F.normalize(self.text_proj(hidden[:, 0]), dim=-1)

    def itm_logits(self, image_embeds, input_ids, attention_mask):
        """Image-text matching logits [B, 2] (no match, match): queries and text bidirectionally, the queries
        cross-attending to image_embeds [B, N, Dv] (or their image_keys); the head's output averaged
        over the queries."""
        queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
        mask = padding_mask(torch.cat([attention_mask.new_ones(queries.shape[:2]), attention_mask], 1))
        hidden, _ = self.Qformer.bert(input_ids, queries, mask, image_embeds, keep=queries.shape[1])
        return self.itm_head(hidden).mean(1)

    def itm_scores(self, image_embeds, input_ids, attention_mask):
        """The retrieval re-ranking score [B]: the "match" logit averaged over queries (LAVIS's compute_itm)."""
        return self.itm_logits(image_embeds, input_ids, attention_mask)[:, 1]

    # -------------------------------------------------------------------------------------------------- losses

    def forward(self, images, input_ids, attention_mask, image_ids=None):
        """Pre-training losses {"loss", "loss_itc", "loss_itm", "loss_itg"} for a batch of image-text pairs.

        `images` [B, 3, S, S], or the frozen encoder's tokens [B, N, Dv] (see image_embeddings). input_ids and
        attention_mask must have the same length on every rank (train_blip2_stage1 pads to the longest caption of
        the global batch). With `image_ids` [B], pairs of the same image are positives in ITC and never drawn as
        ITM negatives.
        """
        if self.clamp_temp:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        image_embeds = self.image_embeddings(images)
        image_keys = self.image_keys(image_embeds)  # for ITC's queries and for ITM
        query_hidden, query_cache = self.query_outputs(image_keys)
        image_feats = F.normalize(self.vision_proj(query_hidden), dim=-1)
        text_feat = self.text_features(input_ids, attention_mask)

        sim_i2t, sim_t2i = itc_similarities(image_feats, text_feat, all_gather_no_grad(image_feats),
                                            all_gather_no_grad(text_feat), self.temp)
        positives = positive_pairs(image_ids, input_ids.shape[0], images.device)
        loss_itc = (itc_loss(sim_i2t, positives) + itc_loss(sim_t2i, positives)) / 2
        loss_itm = self.itm_loss((image_embeds, image_keys), (input_ids, attention_mask),
                                 (sim_i2t.detach(), sim_t2i.detach()), positives)
        loss_itg = self.itg_loss(input_ids, attention_mask, query_cache)
        return {"loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_itg": loss_itg}

    def itm_loss(self, images, texts, similarities, positives):
        """Cross-entropy of (image, text) match over 3B pairs: positives, (hard-negative image, text),
        (image, hard-negative text). `images`: (image_embeds [B, N, Dv], their image_keys), `texts`:
        (input_ids, attention_mask) [B, L], `similarities`: ITC's (sim_i2t, sim_t2i). Negatives come from every
        rank; their images keep their gradient. The positives and the negative texts go with this rank's images,
        whose keys and values ITC's pass computed: only the negative images' are computed here."""
        (image_embeds, image_keys), (input_ids, attention_mask), (sim_i2t, sim_t2i) = images, texts, similarities
        batch = input_ids.shape[0]
        neg_image = sample_hard_negatives(sim_t2i, positives)  # a negative image for each text
        neg_text = sample_hard_negatives(sim_i2t, positives)   # a negative text for each image
        neg_image_keys = self.image_keys(all_gather_with_grad(image_embeds)[neg_image])
        ids_world, mask_world = all_gather_no_grad(input_ids), all_gather_no_grad(attention_mask)
        logits = self.itm_logits(cat_image_keys([image_keys, neg_image_keys, image_keys]),
                                 torch.cat([input_ids, input_ids, ids_world[neg_text]]),
                                 torch.cat([attention_mask, attention_mask, mask_world[neg_text]]))
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        return F.cross_entropy(logits.float(), labels)

    def itg_loss(self, input_ids, attention_mask, query_cache):
        """Captioning loss: text from [DEC] decoded causally, attending to the cached query keys/values;
        label smoothing 0.1, padding ignored, averaged over the tokens of the global batch.

        `itg_attention` "causal" gives SDPA the bottom-right causal mask (text row i sees the queries and text
        j <= i) and no padding mask, which lets the flash kernel run: with right padding no real token ever sees a
        padding key, and the padding positions' outputs carry no loss. "masked" builds the full boolean mask of
        `causal_mask_with_query_prefix` (the original's), which only the memory-efficient and math kernels take.
        """
        decoder_ids = input_ids.clone()
        decoder_ids[:, 0] = self.token_ids["bos"]
        labels = decoder_ids.masked_fill(decoder_ids == self.token_ids["pad"], -100)
        num_query, length = self.query_tokens.shape[1], input_ids.shape[1]
        if self.itg_attention == "causal":
            mask = causal_lower_right(length, num_query + length)
        else:
            mask = causal_mask_with_query_prefix(attention_mask, num_query)
        hidden, _ = self.Qformer.bert(decoder_ids, mask=mask, past=query_cache)
        logits = self.Qformer.lm_logits(hidden[:, :-1]).float()
        targets = labels[:, 1:].flatten()
        # The mean over the tokens of the global batch (DDP then averages over ranks), not of each rank's batch:
        # ranks with more padding would otherwise weigh their tokens more than one process would.
        global_tokens = all_reduce_sum((targets != -100).sum()).clamp(min=1)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), targets, label_smoothing=0.1, reduction="sum")
        return loss_sum * get_world_size() / global_tokens

    # ---------------------------------------------------------------------------------------------- captioning

    @torch.no_grad()
    def generate(self, images, num_beams=3, max_new_tokens=30, min_new_tokens=10, top_p=0.9,
                 repetition_penalty=1.0, length_penalty=1.0, use_nucleus_sampling=False):
        """Captions from the ITG decoder: token ids [B, T] after [DEC] (eos and padding included). Beam search, or
        nucleus sampling with `top_p` (one sample per image)."""
        image_embeds = self.image_embeddings(images)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        bos = torch.full((images.shape[0], 1), self.token_ids["bos"], device=images.device)
        # First step: queries and [DEC] in one pass under the UniLM mask; later steps reuse the cached keys.
        hidden, cache = self.Qformer.bert(bos, queries, unilm_mask(queries.shape[1], torch.ones_like(bos)),
                                          image_embeds)
        num_query = queries.shape[1]

        def step(last_tokens, cache, num_generated):  # [DEC] holds position 0
            hidden, cache = self.Qformer.bert(last_tokens[:, None], past=cache, position_offset=num_generated)
            return self.Qformer.lm_logits(hidden[:, -1]).float(), cache

        first_logits = self.Qformer.lm_logits(hidden[:, num_query]).float()
        search = dict(first_logits=first_logits, cache=cache, step=step, eos_id=self.token_ids["eos"],
                      pad_id=self.token_ids["pad"], max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                      repetition_penalty=repetition_penalty)
        if use_nucleus_sampling:
            return nucleus_sampling(top_p=top_p, **search)
        return beam_search(num_beams=num_beams, length_penalty=length_penalty, **search)


# ------------------------------------------------------------------------------------------------ loss pieces

def itc_similarities(image_feats, text_feat, image_feats_all, text_feat_all, temp):
    """sim_i2t [B, W*B]: for each local image, the max over its queries of query . text, for every text of every
    rank; sim_t2i [B, W*B] likewise for each local text against every image. Divided by `temp`, in fp32."""
    sim_i2t = torch.einsum("bqe,te->btq", image_feats.float(), text_feat_all.float()).amax(-1)
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat.float(), image_feats_all.float()).amax(-1)
    return sim_i2t / temp, sim_t2i / temp


def itc_similarity(image_feats, text_feats, chunk=256):
    """The retrieval similarity (no temperature): max over queries of image_feats [I, Q, E] . text_feats [T, E]
    -> [I, T] in fp32, a chunk of images at a time so that the [I, T, Q] products are never held at once."""
    text_feats = text_feats.float()
    parts = image_feats.split(chunk)
    return torch.cat([torch.einsum("iqe,te->itq", part.float(), text_feats).amax(-1) for part in parts])


def positive_pairs(image_ids, batch, device):
    """Boolean [B, W*B]: which gathered pairs are positives for this rank's rows. Without image ids, only the
    pair itself (column rank * B + row); with ids [B], every pair of the same image."""
    if image_ids is None:
        columns = torch.arange(get_world_size() * batch, device=device)
        return columns[None, :] == (get_rank() * batch + torch.arange(batch, device=device))[:, None]
    return image_ids[:, None] == all_gather_no_grad(image_ids)[None, :]


def itc_loss(sim, positives):
    """Cross-entropy against targets spread evenly over the positives, label smoothing 0.1: equal to
    F.cross_entropy(sim, target, label_smoothing=0.1) when each row has one positive."""
    targets = positives.float() / positives.sum(1, keepdim=True)
    targets = 0.9 * targets + 0.1 / sim.shape[1]
    return -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()


def sample_hard_negatives(sim, positives):
    """For each row of sim [B, N], one column drawn with probability softmax(sim) over the non-positive columns.

    Vectorised multinomial sampling by the exponential race (argmax of p / E, E ~ Exp(1)), which draws what
    per-row `torch.multinomial(p, 1)` draws from the same RNG state (the original's loop). The noise is drawn for
    the rows of every rank, so that one process with a batch of W*B draws what W processes with B draw when their
    generators are seeded alike. A row without any negative (a batch of one image) is an error.
    """
    if not (~positives).any(1).all():
        raise ValueError("ITM: a row of the batch has no negative (all pairs of the batch show the same image); "
                         "shuffle the data or enlarge the batch")
    weights = F.softmax(sim.float().masked_fill(positives, float("-inf")), dim=1)
    rank, batch = get_rank(), sim.shape[0]
    noise = torch.empty(get_world_size() * batch, sim.shape[1], device=sim.device).exponential_()
    return (weights / noise[rank * batch:(rank + 1) * batch]).argmax(1)


# ------------------------------------------------------------------------------------------------ checkpoints

def load_checkpoint(model, url_or_path):
    """Load a stage-1 checkpoint (path or URL) into `model`: LAVIS's layout (`blip2_pretrained.pth`, this project's
    checkpoints) or transformers' Blip2ForImageTextRetrieval layout, in which `temp` and the ITG head's transform
    and bias are absent and keep their values. Image-encoder position embeddings are resampled to the model's
    image size; a checkpoint without image-encoder weights leaves the encoder as it is. Returns the model's keys
    left at their initialisation (`temp` and the ITG head after a transformers file)."""
    state = load_checkpoint_file(url_or_path)
    state = state.get("model", state)
    refuse_other_families(state, url_or_path, ("stage1", "hf_retrieval"), "a stage-1 model loads LAVIS's "
                          "blip2_pretrained.pth, a transformers Blip2ForImageTextRetrieval or its own checkpoints")
    if any(k.startswith("vision_model.") for k in state):
        state = from_hf_retrieval(state)
    vision = {k[len("visual_encoder."):]: v for k, v in state.items() if k.startswith("visual_encoder.")}
    if vision:
        load_vision_weights(model.visual_encoder, vision, url_or_path)
    else:
        log(f"{url_or_path} holds no image-encoder weights; the encoder keeps its own (model.vit_pretrained)")

    def rest(items):
        return {k: v for k, v in items if not k.startswith("visual_encoder.") and not k.endswith("position_ids")}

    theirs, ours = rest(state.items()), rest(model.state_dict().items())
    problems = [f"unexpected {k}" for k in theirs if k not in ours]
    problems += [f"{k} is {tuple(v.shape)}, the model's {tuple(ours[k].shape)}" for k, v in theirs.items()
                 if k in ours and v.shape != ours[k].shape]
    absent = [k for k in ours if k not in theirs]
    problems += [f"missing {k}" for k in absent if not k.startswith(HF_SIDE_KEYS)]
    if problems:
        raise InputError(f"{url_or_path} does not fit the stage-1 model ({len(problems)} problems: "
                         f"{'; '.join(problems[:4])}). Check model.vision, model.qformer and model.num_query_tokens")
    if absent:
        log(f"{url_or_path} has no {', '.join(sorted(absent)[:3])}...: they keep their initial values")
    model.load_state_dict(theirs, strict=False)
    return absent


def to_hf_retrieval(state):
    """LAVIS stage-1 state dict -> (transformers Blip2ForImageTextRetrieval state dict, side dict).

    The side dict holds what that layout has no place for: `temp` and the ITG LM head `Qformer.cls.*`."""
    side = {k: v for k, v in state.items() if k.startswith(HF_SIDE_KEYS)}
    return lavis_to_hf({k: v for k, v in state.items() if k not in side}), side


def from_hf_retrieval(hf, side=None):
    """Inverse of `to_hf_retrieval`; `side` (temp, Qformer.cls.*) is merged in when given."""
    return {**hf_to_lavis(hf), **(side or {})}


def lavis_to_hf(state, instruct=False):
    """Rename a LAVIS BLIP-2 state dict (`blip2`, `blip2_opt`, `blip2_t5`, `blip2_vicuna_instruct`, ...) to
    transformers' BLIP-2 layout, or with `instruct` to its InstructBLIP layout (the Q-Former's embeddings under
    `qformer.embeddings.*`); EVA's q/v biases become one qkv bias with a zero key part. CHECKPOINTS.md and
    LANGUAGE_MODELS_VQA.md 2.1 list the renames."""
    if any(k.startswith("visual_encoder.transformer.") for k in state):
        raise InputError("transformers' BLIP-2 layout has no CLIP ViT-L image encoder; only EVA ViT-g converts")
    lm = next((name for name in LM_NAMES if any(k.startswith(f"{name}_") for k in state)), "opt")
    renames = _prefix_renames(lm, instruct)
    hf = {}
    for key, value in state.items():
        if key.endswith("position_ids") or key.endswith("attn.v_bias"):
            continue
        if key.endswith("attn.q_bias"):
            prefix = key[:-len("attn.q_bias")]
            q_bias, v_bias = value, state[prefix + "attn.v_bias"]
            hf[_lavis_to_hf_key(prefix + "attn.qkv.bias", renames)] = torch.cat(
                [q_bias, torch.zeros_like(q_bias), v_bias])
        else:
            hf[_lavis_to_hf_key(key, renames)] = value
    return hf


def hf_to_lavis(hf, lm="opt"):
    """Inverse of `lavis_to_hf` (either layout); `language_projection`/`language_model` become `{lm}_proj`/
    `{lm}_model` (`lm` one of LM_NAMES). A non-zero key bias (which EVA does not have) is an error."""
    renames = _prefix_renames(lm, instruct=any(k.startswith("qformer.embeddings.layernorm.") for k in hf))
    state = {}
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue
        lavis = _hf_to_lavis_key(key, renames)
        if lavis.endswith("attn.qkv.bias"):
            q_bias, k_bias, v_bias = value.chunk(3)
            if k_bias.abs().max() > 0:
                raise InputError(f"{key} has a non-zero key bias, which the EVA ViT cannot represent")
            prefix = lavis[:-len("qkv.bias")]
            state[prefix + "q_bias"], state[prefix + "v_bias"] = q_bias, v_bias
        else:
            state[lavis] = value
    return state


_VISION_RENAMES = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
                   ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
                   (".layer_norm1.", ".norm1."), (".layer_norm2.", ".norm2."),
                   (".self_attn.projection.", ".attn.proj."),
                   (".self_attn.qkv.", ".attn.qkv.")]
# LAVIS's names of the language model and its projection: `{name}_model.*`, `{name}_proj.*`.
LM_NAMES = ("opt", "t5", "llm")


def _prefix_renames(lm, instruct):
    """(transformers prefix, LAVIS prefix) of the parts outside the image encoder, most specific first. BLIP-2 puts
    the Q-Former's embedding LayerNorm at `qformer.layernorm` and the text embeddings (stage 1) at `embeddings`;
    InstructBLIP puts both under `qformer.embeddings` (`layernorm`, `word_embeddings`, `position_embeddings`)."""
    layernorm, text = ("qformer.embeddings.layernorm.", "qformer.embeddings.") if instruct else \
        ("qformer.layernorm.", "embeddings.")
    return [("vision_model.post_layernorm.", "ln_vision."), (layernorm, "Qformer.bert.embeddings.LayerNorm."),
            (text, "Qformer.bert.embeddings."), ("qformer.", "Qformer.bert."),
            ("vision_projection.", "vision_proj."), ("text_projection.", "text_proj."),
            ("language_projection.", f"{lm}_proj."), ("language_model.", f"{lm}_model.")]


def _lavis_to_hf_key(key, renames):
    if key.startswith("visual_encoder."):
        key = key[len("visual_encoder."):]
        for hf, lavis in _VISION_RENAMES:
            key = key.replace(lavis, hf)
        return "vision_model." + key
    for hf, lavis in renames:
        if key.startswith(lavis):
            key = hf + key[len(lavis):]
            return key.replace(".self.", ".attention.") if lavis == "Qformer.bert." else key
    return key


def _hf_to_lavis_key(key, renames):
    if key.startswith("vision_model.") and not key.startswith("vision_model.post_layernorm."):
        key = key[len("vision_model."):]
        for hf, lavis in _VISION_RENAMES:
            key = key.replace(hf, lavis)
        return "visual_encoder." + key
    for hf, lavis in renames:
        if key.startswith(hf):
            key = lavis + key[len(hf):]
            return key.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self.")
    return key
