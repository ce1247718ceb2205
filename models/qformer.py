"""BLIP-2's Q-Former: a BERT whose learned query tokens cross-attend to image features.

Key names follow `Qformer.*` of LAVIS's checkpoints (`bert.embeddings`, `bert.encoder.layer.{i}.attention`,
`.crossattention`, `.intermediate`/`.output` for text, `.intermediate_query`/`.output_query` for queries,
`cls.predictions`). Attention runs through `F.scaled_dot_product_attention` with boolean masks (True = attend),
built by the three mask functions below.

Queries [B, Q, H] are concatenated before the text embeddings (queries take no position embedding) and the
sequence goes through the embedding LayerNorm. In every layer all positions self-attend (as the mask allows);
query positions then cross-attend to the image (every `cross_attention_freq`-th layer) and take the query FFN,
text positions take the text FFN.
"""

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertForMaskedLM

from models.med import (TEXT_SIZES, BertAttention, BertIntermediate, BertOutput, BertSelfAttention,
                        TextConfig, init_bert_weights)
from models.tokenizer import local_dir_or_hub_id
from utils import InputError, log


@dataclass
class QformerConfig(TextConfig):
    vocab_size: int = 30523            # bert-base-uncased + [DEC]
    encoder_width: int = 1408          # width of the image features (EVA ViT-g)
    cross_attention_freq: int = 2      # layers 0, freq, 2 freq, ... cross-attend to the image
    text_input: bool = True            # False: queries only (stage 2): no word/position embeddings, text FFN, LM head
    lm_head: bool = True               # with text_input; False: no `cls` head (InstructBLIP's Q-Former)


QFORMER_SIZES = TEXT_SIZES


# ----------------------------------------------------------------------------------------------------- masks

def padding_mask(attention_mask):
    """Bidirectional attention over the non-padding keys: [B, L] (1 = token) -> [B, 1, 1, L]."""
    return attention_mask.bool()[:, None, None, :]


def causal_mask_with_query_prefix(text_mask, num_query):
    """ITG decoding over cached query keys: text row i attends every query and the text tokens j <= i that are not
    padding. text_mask [B, L] -> [B, 1, L, num_query + L] (keys: the queries, then the text)."""
    batch, length = text_mask.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=text_mask.device).tril()
    keys = torch.cat([torch.ones(batch, num_query, dtype=torch.bool, device=text_mask.device), text_mask.bool()], 1)
    prefix = torch.ones(length, num_query, dtype=torch.bool, device=text_mask.device)
    return torch.cat([prefix, causal], 1)[None, None] & keys[:, None, None, :]


def unilm_mask(num_query, text_mask):
    """Queries and text in one pass (UniLM): query rows attend the queries only; text rows attend every query and
    the text tokens j <= i that are not padding. text_mask [B, L] -> [B, 1, num_query + L, num_query + L]."""
    batch = text_mask.shape[0]
    text_rows = causal_mask_with_query_prefix(text_mask, num_query)
    query_rows = torch.zeros(batch, 1, num_query, num_query + text_mask.shape[1], dtype=torch.bool,
                             device=text_mask.device)
    query_rows[..., :num_query] = True
    return torch.cat([query_rows, text_rows], 2)


# ---------------------------------------------------------------------------------------------------- layers

class CachedSelfAttention(BertSelfAttention):
    """Self-attention of x [B, L, H] whose keys/values may be prefixed by cached ones `past` ([B, h, P, d] each);
    returns (output [B, K, H] of the first K = `keep` positions (None: all L), (keys, values) including the
    cache)."""

    def forward(self, x, mask=None, past=None, keep=None):
        k, v = self.keys_values(x)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        if keep is not None:
            x, mask = x[:, :keep], mask if mask is None else mask[..., :keep, :]
        return self.attend(x, k, v, mask), (k, v)


class QformerAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self = CachedSelfAttention(config, config.hidden_size)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, x, mask=None, past=None, keep=None):
        out, present = self.self(x, mask, past, keep)
        return self.output(out, x[:, :keep]), present


class QformerLayer(nn.Module):
    """Self-attention over queries and text -> [queries: cross-attention, query FFN | text: text FFN].

    `text_ffn=False` drops the text FFN (the stage-2 model has no text input)."""

    def __init__(self, config, cross_attention, text_ffn=True):
        super().__init__()
        self.attention = QformerAttention(config)
        self.crossattention = BertAttention(config, config.encoder_width) if cross_attention else None
        if text_ffn:
            self.intermediate = BertIntermediate(config)
            self.output = BertOutput(config, config.intermediate_size)
        self.intermediate_query = BertIntermediate(config)
        self.output_query = BertOutput(config, config.intermediate_size)

    def image_keys(self, image_embeds):
        """The cross-attention's keys and values of image_embeds [B, N, Dv] ([B, h, N, d] each); None in a layer
        that does not cross-attend."""
        return None if self.crossattention is None else self.crossattention.self.keys_values(image_embeds)

    def forward(self, x, mask, num_query, image_keys=None, past=None, keep=None):
        """x [B, Q + L, H] -> the outputs of its first `keep` positions (None: all), and this layer's keys and
        values; `image_keys`: this layer's (image_keys), with queries in a cross-attending layer."""
        x, present = self.attention(x, mask, past, keep)
        if num_query == 0:
            return self.output(self.intermediate(x), x), present
        queries, text = x[:, :num_query], x[:, num_query:]
        if self.crossattention is not None:
            queries = self.crossattention.attend(queries, image_keys)
        queries = self.output_query(self.intermediate_query(queries), queries)
        if text.shape[1] == 0:
            return queries, present
        return torch.cat([queries, self.output(self.intermediate(text), text)], 1), present


class QformerEmbeddings(nn.Module):
    """[queries [B, Q, H]; word + position embeddings of input_ids [B, L] from position `position_offset`]
    -> LayerNorm -> dropout: [B, Q + L, H]. Either part may be absent; without `text_input` there are no word and
    position embeddings (LAVIS's stage-2 Q-Former)."""

    def __init__(self, config):
        super().__init__()
        if config.text_input:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            # A persistent buffer only because the original checkpoints store it.
            self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0))
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, query_embeds=None, position_offset=0):
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            positions = self.position_ids[:, position_offset:position_offset + input_ids.shape[1]]
            parts.append(self.word_embeddings(input_ids) + self.position_embeddings(positions))
        return self.dropout(self.LayerNorm(torch.cat(parts, 1) if len(parts) > 1 else parts[0]))


class QformerModel(nn.Module):
    """The Q-Former's BERT (`Qformer.bert`).

    forward(input_ids [B, L] or None, query_embeds [B, Q, H] or None, mask (boolean, broadcastable to
    [B, 1, Q + L, P + Q + L]) or None, image_embeds (needed with queries: [B, N, encoder_width], or their
    `image_keys`), past (per-layer cached keys/values of P earlier positions) or None, position_offset (position of
    the first text token), keep) -> (hidden states [B, Q + L, H], per-layer (keys, values) including `past`).
    With `keep` the last layer computes the outputs of the first `keep` positions only (hidden [B, keep, H]): what
    ITM (the queries) and the text features ([CLS]) read; the others' last-layer outputs are never used.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = QformerEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(QformerLayer(config, i % config.cross_attention_freq == 0,
                                                        config.text_input) for i in range(config.num_hidden_layers))

    def image_keys(self, image_embeds):
        """Every layer's cross-attention keys and values of image_embeds [B, N, Dv] (QformerLayer.image_keys): to
        compute them once for several passes over the same images."""
        return [layer.image_keys(image_embeds) for layer in self.encoder.layer]

    def forward(self, input_ids=None, query_embeds=None, mask=None, image_embeds=None, past=None, position_offset=0,
                keep=None):
        x = self.embeddings(input_ids, query_embeds, position_offset)
        num_query = 0 if query_embeds is None else query_embeds.shape[1]
        keys = self.image_keys(image_embeds) if torch.is_tensor(image_embeds) else image_embeds
        presents = []
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            x, present = layer(x, mask, num_query, None if keys is None else keys[i],
                               None if past is None else past[i], keep if i == last else None)
            presents.append(present)
        return x, presents


def cat_image_keys(parts):
    """image_keys outputs of several batches of images concatenated along the batch, layer by layer."""
    return [None if layer[0] is None else tuple(torch.cat(tensors) for tensors in zip(*layer))
            for layer in zip(*parts)]


def image_batch_size(image_embeds):
    """B of image_embeds [B, N, Dv] or of their image_keys."""
    if torch.is_tensor(image_embeds):
        return image_embeds.shape[0]
    return next(layer[0].shape[0] for layer in image_embeds if layer is not None)


def select_image_keys(keys, index):
    """image_keys of the images `index` (indices into their batch)."""
    return [None if layer is None else (layer[0][index], layer[1][index]) for layer in keys]


class BertLMPredictionHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder (weights tied to the word embeddings): [B, L, H] -> [B, L, V]."""

    def __init__(self, config, word_embeddings):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.decoder.weight = word_embeddings.weight
        # BERT stores the output bias twice (`bias` and `decoder.bias`): one tensor under both names.
        self.bias = self.decoder.bias

    def forward(self, x):
        x = self.transform.LayerNorm(F.gelu(self.transform.dense(x)))
        return self.decoder(x)


class Qformer(nn.Module):
    """`Qformer.bert` (the encoder) and, with `text_input` and `lm_head`, `Qformer.cls.predictions` (the LM head used
    for ITG and captioning)."""

    def __init__(self, config):
        super().__init__()
        self.bert = QformerModel(config)
        with_head = config.text_input and config.lm_head
        if with_head:
            self.cls = nn.Module()
            self.cls.predictions = BertLMPredictionHead(config, self.bert.embeddings.word_embeddings)
        self.apply(init_bert_weights)
        if with_head:
            nn.init.zeros_(self.cls.predictions.bias)
        if config.text_input:
            copy_text_ffn_to_query_ffn(self)

    def lm_logits(self, hidden):
        return self.cls.predictions(hidden)


def copy_text_ffn_to_query_ffn(qformer):
    """BLIP-2 starts the query FFN of every layer as a copy of the (BERT-initialised) text FFN."""
    with torch.no_grad():
        for layer in qformer.bert.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())


def build_qformer(size, vocab_size, encoder_width, cross_attention_freq=2, **overrides):
    """A Q-Former of a named size (`tiny`, `base`) with BERT's initialisation."""
    config = QformerConfig(vocab_size=vocab_size, encoder_width=encoder_width,
                           cross_attention_freq=cross_attention_freq, **{**QFORMER_SIZES[size], **overrides})
    return Qformer(config)


def load_bert_weights(qformer, name_or_dir):
    """Initialise the Q-Former from a BERT masked-LM checkpoint (hub name such as bert-base-uncased, or a local
    directory in transformers' format), as BLIP-2 does: embeddings, self-attention, text FFN and LM head from BERT
    (word embeddings and LM bias keep their extra rows, e.g. `[DEC]`, at their own initialisation), query FFN copied
    from the text FFN, cross-attention left at its random initialisation. BERT's token-type embeddings and pooler
    are not used."""
    name_or_dir = local_dir_or_hub_id(name_or_dir, "model.bert")
    try:
        bert = BertForMaskedLM.from_pretrained(name_or_dir)
    except OSError as e:
        raise InputError(f"cannot load BERT weights '{name_or_dir}' ({e}). Offline, run `hf download {name_or_dir} "
                         f"--local-dir /path/to/{os.path.basename(name_or_dir)}` on a machine with internet and set "
                         "model.bert to that directory") from None
    theirs = bert.state_dict()
    ours = qformer.state_dict()
    loaded = []
    tied = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")
    with torch.no_grad():
        for key, value in theirs.items():
            if key not in ours or "_query" in key or key in tied:
                continue
            target = ours[key]
            vocabulary_rows = key in ("bert.embeddings.word_embeddings.weight", "cls.predictions.bias")
            if value.shape[1:] != target.shape[1:] or (value.shape[0] != target.shape[0] and not vocabulary_rows):
                raise InputError(f"BERT '{name_or_dir}': {key} has shape {tuple(value.shape)}, the Q-Former "
                                 f"{tuple(target.shape)}; set model.qformer to the size of that BERT")
            if value.shape[0] > target.shape[0]:
                raise InputError(f"BERT '{name_or_dir}' has {value.shape[0]} rows in {key}, the tokenizer only "
                                 f"{target.shape[0]}: the tokenizer and BERT do not match")
            target[:value.shape[0]].copy_(value)  # extra vocabulary rows ([DEC]) keep their initialisation
            loaded.append(key)
    copy_text_ffn_to_query_ffn(qformer)
    missing = [k for k, _ in qformer.named_parameters(remove_duplicate=False) if k not in loaded
               and "crossattention" not in k and "_query" not in k and k not in tied]
    if missing:
        raise InputError(f"BERT '{name_or_dir}' lacks {len(missing)} Q-Former tensors, e.g. {missing[:3]}")
    log(f"Q-Former initialised from BERT '{name_or_dir}' ({len(loaded)} tensors)")
