"""BLIP's text encoder (the "MED" BERT): BERT without token types or pooler, optionally cross-attending to images.

Key names follow `text_encoder.*` of the original checkpoints. Attention runs through
`F.scaled_dot_product_attention`; nothing from transformers' BERT internals is used.

Two modes, chosen per call: *text* (no image given; self-attention and FFN only) and *multimodal* (every layer
cross-attends to the image tokens between self-attention and FFN). Which cross-attention module a layer holds is
up to the model that builds the encoder (one image for retrieval-style models, two for NLVR).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    encoder_width: int = 768


TEXT_SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                 max_position_embeddings=64),
    "base": dict(),
}


class BertEmbeddings(nn.Module):
    """Word + absolute position embeddings, LayerNorm, dropout: ids [B, L] -> [B, L, H]."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # A persistent buffer only because the original checkpoints store it.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0))

    def forward(self, input_ids):
        positions = self.position_ids[:, :input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention of x [B, L, H] over `context` [B, M, kv_width] -> [B, L, H].

    `mask` is a boolean [B, 1, 1 or L, M] (True = attend) or None.
    """

    def __init__(self, config, kv_width):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def split_heads(self, x):
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def keys_values(self, context):
        """Keys and values [B, heads, M, H / heads] of context [B, M, kv_width]."""
        return self.split_heads(self.key(context)), self.split_heads(self.value(context))

    def attend(self, x, keys, values, mask=None):
        """x [B, L, H] attending to keys_values' output -> [B, L, H]."""
        out = F.scaled_dot_product_attention(self.split_heads(self.query(x)), keys, values, attn_mask=mask,
                                             dropout_p=self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).flatten(2)

    def forward(self, x, context, mask=None):
        return self.attend(x, *self.keys_values(context), mask)


class BertOutput(nn.Module):
    """dense (in_features -> H), dropout, residual, post-LayerNorm: the output block of attention and of the FFN."""

    def __init__(self, config, in_features):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden, residual):
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    """Self-attention (context None) or cross-attention to `context`, with its output block."""

    def __init__(self, config, kv_width=None):
        super().__init__()
        self.self = BertSelfAttention(config, kv_width or config.hidden_size)
        self.output = BertOutput(config, config.hidden_size)

    def forward(self, x, context=None, mask=None):
        return self.output(self.self(x, x if context is None else context, mask), x)

    def attend(self, x, keys_values):
        """Cross-attention to keys and values computed before (`self.self.keys_values(context)`)."""
        return self.output(self.self.attend(x, *keys_values), x)


class BertIntermediate(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    """Self-attention -> cross-attention (multimodal mode) -> FFN, each with residual and post-LayerNorm."""

    def __init__(self, config, crossattention=None):
        super().__init__()
        self.attention = BertAttention(config)
        self.crossattention = crossattention
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config, config.intermediate_size)

    def forward(self, x, mask, image_embeds=None):
        x = self.attention(x, mask=mask)
        if image_embeds is not None:
            x = self.crossattention(x, image_embeds)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config, crossattention_factory=None):
        super().__init__()
        self.layer = nn.ModuleList(
            BertLayer(config, crossattention_factory(config, i) if crossattention_factory else None)
            for i in range(config.num_hidden_layers))

    def forward(self, x, mask, image_embeds=None):
        for layer in self.layer:
            x = layer(x, mask, image_embeds)
        return x


def init_bert_weights(module):
    """BERT's initialisation: N(0, 0.02) weights and embeddings, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class BertModel(nn.Module):
    """input_ids [B, L], attention_mask [B, L] (1 = token, 0 = padding) -> hidden states [B, L, H].

    With `image_embeds` the encoder runs in multimodal mode; each layer's cross-attention module receives
    `image_embeds` as given (a tensor [B, N, encoder_width], or whatever that module expects).
    `crossattention_factory(config, layer_index)` builds each layer's cross-attention module; without it the
    encoder is text-only.
    """

    def __init__(self, config, crossattention_factory=None):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config, crossattention_factory)
        self.apply(init_bert_weights)

    def forward(self, input_ids, attention_mask, image_embeds=None):
        mask = attention_mask.bool()[:, None, None, :]
        return self.encoder(self.embeddings(input_ids), mask, image_embeds)
