"""BLIP for NLVR2: does a sentence hold for a pair of images?

Layout of `model_base_nlvr.pth`: `visual_encoder.*` (ViT), `text_encoder.*` (BERT whose every layer cross-attends to
both images with `self0`/`self1` and `dense0`/`dense1`, sharing one LayerNorm), `cls_head.*` (Linear, ReLU, Linear).
"""

from collections import Counter
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

from models.families import refuse_other_families
from models.med import TEXT_SIZES, BertModel, BertSelfAttention, TextConfig
from models.tokenizer import init_tokenizer
from models.vit import create_vit, interpolate_pos_embed
from utils import Count, InputError, UnitInterval, Workers, check_patches, load_checkpoint_file, log


@dataclass
class BlipNLVRConfig:
    """The `model:` section of an NLVR config."""
    arch: Literal["blip_nlvr"] = "blip_nlvr"
    vit: Literal["tiny", "base", "large"] = "base"
    image_size: Count = 384
    patch_size: Count = 16
    drop_path_rate: UnitInterval = 0.1
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: Workers = 0              # with vit_grad_ckpt: checkpoint the last N ViT blocks
    text_encoder: Literal["tiny", "base"] = "base"
    tokenizer: str = "bert-base-uncased"     # hub name or local directory with vocab.txt
    pretrained: Optional[str] = None         # path or URL: BLIP pre-trained or NLVR fine-tuned checkpoint

    def validate(self):
        return check_patches(self.image_size, self.patch_size)


# The original (BLIP models/nlvr_encoder.py: `merge=(is_cross_attention and layer_num>=6)`) merges the two image
# attentions with a learned layer from text layer 6 on, whatever the depth: BERT-base's 12 layers split in halves,
# a 4-layer encoder has no merge layer.
MERGE_FROM_LAYER = 6


class TwinSelfOutput(nn.Module):
    """Joins the two image attentions: (dense0(ctx0) + dense1(ctx1)) / 2 in layers before MERGE_FROM_LAYER,
    merge_layer(cat[dense0(ctx0), dense1(ctx1)]) from it on; then dropout, residual, the shared LayerNorm."""

    def __init__(self, config, merge):
        super().__init__()
        self.dense0 = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense1 = nn.Linear(config.hidden_size, config.hidden_size)
        self.merge_layer = nn.Linear(2 * config.hidden_size, config.hidden_size) if merge else None
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context0, context1, residual):
        h0, h1 = self.dense0(context0), self.dense1(context1)
        h = self.merge_layer(torch.cat([h0, h1], dim=-1)) if self.merge_layer is not None else (h0 + h1) / 2
        return self.LayerNorm(self.dropout(h) + residual)


class TwinCrossAttention(nn.Module):
    """Cross-attention of text x [B, L, H] to each of two images (image0 [B, N, W], image1 [B, N, W])."""

    def __init__(self, config, merge):
        super().__init__()
        self.self0 = BertSelfAttention(config, config.encoder_width)
        self.self1 = BertSelfAttention(config, config.encoder_width)
        self.output = TwinSelfOutput(config, merge)

    def forward(self, x, images):
        image0, image1 = images
        return self.output(self.self0(x, image0), self.self1(x, image1), x)


class BlipNLVR(nn.Module):
    """image0, image1 [B, 3, S, S], input_ids/attention_mask [B, L] (BERT tokens, `[CLS]` first) -> logits [B, 2]
    (index 1 = "True")."""

    def __init__(self, vit="base", image_size=384, patch_size=16, drop_path_rate=0.1, grad_ckpt_layers=0,
                 text_size="base", vocab_size=30524, enc_token_id=30523):
        super().__init__()
        self.visual_encoder = create_vit(vit, image_size, patch_size, drop_path_rate, grad_ckpt_layers)
        config = TextConfig(vocab_size=vocab_size, encoder_width=self.visual_encoder.embed_dim,
                            **TEXT_SIZES[text_size])
        self.text_encoder = BertModel(
            config, lambda cfg, i: TwinCrossAttention(cfg, merge=i >= MERGE_FROM_LAYER))
        hidden = config.hidden_size
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.enc_token_id = enc_token_id

    def forward(self, image0, image1, input_ids, attention_mask):
        image_embeds = self.visual_encoder(torch.cat([image0, image1]))
        input_ids = torch.cat([torch.full_like(input_ids[:, :1], self.enc_token_id), input_ids[:, 1:]], dim=1)
        hidden = self.text_encoder(input_ids, attention_mask, image_embeds=image_embeds.chunk(2))
        return self.cls_head(hidden[:, 0])


def create_model(cfg):
    """(BlipNLVR at its initialisation, its tokenizer) for a BlipNLVRConfig; weights come from load_checkpoint."""
    tokenizer = init_tokenizer(cfg.tokenizer)
    model = BlipNLVR(vit=cfg.vit, image_size=cfg.image_size, patch_size=cfg.patch_size,
                     drop_path_rate=cfg.drop_path_rate, grad_ckpt_layers=cfg.vit_ckpt_layer if cfg.vit_grad_ckpt else 0,
                     text_size=cfg.text_encoder, vocab_size=len(tokenizer), enc_token_id=tokenizer.enc_token_id)
    return model, tokenizer


def load_checkpoint(model, url_or_path):
    """Load weights into a BlipNLVR from a local path or URL; returns the model's keys left at their
    initialisation (merge_layer and cls_head after a pre-trained checkpoint; evaluation refuses them).

    - NLVR layout (`model_base_nlvr.pth`, this project's checkpoints): loaded strictly.
    - BLIP pre-trained layout (`model_base.pth`): each `crossattention.self.*` is copied to `self0` and `self1`,
      each `crossattention.output.dense.*` to `dense0` and `dense1`; then exactly the `merge_layer` and `cls_head`
      tensors must be missing (they start from their initialisation).
    In both, position embeddings made at another image size are resampled.
    """
    state = load_checkpoint_file(url_or_path)
    state = {k.removeprefix("module."): v for k, v in state.get("model", state).items()}
    refuse_other_families(state, url_or_path, ("nlvr", "blip"), "train_nlvr.py loads BLIP's pre-trained "
                          "(model_base.pth) or NLVR fine-tuned (model_base_nlvr.pth) checkpoints, or its own")
    if "visual_encoder.pos_embed" in state:
        state["visual_encoder.pos_embed"] = interpolate_pos_embed(state["visual_encoder.pos_embed"],
                                                                  model.visual_encoder.patch_embed.num_patches)
    state.setdefault("text_encoder.embeddings.position_ids", model.text_encoder.embeddings.position_ids)
    pretrained_layout = not any(".crossattention.self0." in k for k in state)
    if pretrained_layout:
        state = remap_pretrained(state)
    try:
        missing, unused = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise InputError(f"checkpoint {url_or_path} does not fit this model (check model.vit, model.text_encoder, "
                         f"model.tokenizer): {e}") from None
    allowed = {k for k in model.state_dict() if ".merge_layer." in k or k.startswith("cls_head.")}
    allowed = allowed if pretrained_layout else set()
    if set(missing) != allowed or (unused and not pretrained_layout):
        raise InputError(f"checkpoint {url_or_path} ({'BLIP pre-trained' if pretrained_layout else 'NLVR'} layout) "
                         f"does not match the model: missing {_by_prefix(set(missing) - allowed) or 'nothing'}, "
                         f"not initialised from it but expected: {_by_prefix(allowed - set(missing)) or 'none'}, "
                         f"unexpected {_by_prefix(unused) or 'nothing'}")
    log(f"loaded {url_or_path} ({'BLIP pre-trained' if pretrained_layout else 'NLVR'} layout)")
    if missing:
        log(f"  newly initialised: {_by_prefix(missing)}")
    if unused:
        log(f"  unused checkpoint tensors: {_by_prefix(unused)}")
    return missing


def remap_pretrained(state):
    """BLIP pre-trained text encoder -> NLVR text encoder: duplicate the cross-attention for the second image."""
    remapped = {}
    for key, value in state.items():
        if key.startswith("text_encoder.") and ".crossattention.self." in key:
            for i in (0, 1):
                remapped[key.replace(".crossattention.self.", f".crossattention.self{i}.")] = value
        elif key.startswith("text_encoder.") and ".crossattention.output.dense." in key:
            for i in (0, 1):
                remapped[key.replace(".crossattention.output.dense.", f".crossattention.output.dense{i}.")] = value
        else:
            remapped[key] = value
    return remapped


def _by_prefix(keys):
    """'text_decoder.* (151), temp (1)': keys counted by their first component."""
    counts = Counter(key.split(".")[0] for key in keys)
    return ", ".join(f"{name}{'.*' if any(k.startswith(name + '.') for k in keys) else ''} ({n})"
                     for name, n in sorted(counts.items()))
