"""An independent, functional re-statement of the original BLIP NLVR forward pass, straight from a state dict.

It follows the original's arithmetic (explicit softmax attention, additive -10000 padding mask, separate q/k/v,
post-LayerNorm BERT, pre-norm ViT) and shares no code with `models/`, so agreement with it is evidence that the
model reproduces the original checkpoints' outputs.
"""

import math

import torch
import torch.nn.functional as F


def _linear(x, sd, name):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def _layer_norm(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _attention(q, k, v, heads, additive_mask=None):
    b, lq, d = q.shape
    split = lambda t: t.reshape(b, -1, heads, d // heads).permute(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if additive_mask is not None:
        scores = scores + additive_mask
    probs = torch.softmax(scores, dim=-1)
    return (probs @ v).permute(0, 2, 1, 3).reshape(b, lq, d)


def vit_forward(sd, images, heads, patch_size=16, prefix="visual_encoder"):
    x = F.conv2d(images, sd[f"{prefix}.patch_embed.proj.weight"], sd[f"{prefix}.patch_embed.proj.bias"],
                 stride=patch_size).flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{prefix}.cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[f"{prefix}.pos_embed"]
    depth = len({k.split(".")[2] for k in sd if k.startswith(f"{prefix}.blocks.")})
    for i in range(depth):
        p = f"{prefix}.blocks.{i}"
        h = _layer_norm(x, sd, f"{p}.norm1", 1e-6)
        q, k, v = _linear(h, sd, f"{p}.attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attention(q, k, v, heads), sd, f"{p}.attn.proj")
        h = _layer_norm(x, sd, f"{p}.norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(h, sd, f"{p}.mlp.fc1")), sd, f"{p}.mlp.fc2")
    return _layer_norm(x, sd, f"{prefix}.norm", 1e-6)


def _bert_attention(x, context, sd, name, heads, additive_mask=None):
    q, k, v = (_linear(t, sd, f"{name}.{n}") for t, n in ((x, "query"), (context, "key"), (context, "value")))
    return _attention(q, k, v, heads, additive_mask)


def nlvr_forward(sd, image0, image1, input_ids, attention_mask, vit_heads, text_heads, enc_token_id, patch_size=16):
    """Logits [B, 2] of the original BLIP_NLVR.forward(train=False)."""
    image_embeds = vit_forward(sd, torch.cat([image0, image1]), vit_heads, patch_size)
    image0_embeds, image1_embeds = torch.split(image_embeds, image0.shape[0])

    ids = input_ids.clone()
    ids[:, 0] = enc_token_id
    t = "text_encoder"
    x = sd[f"{t}.embeddings.word_embeddings.weight"][ids] + \
        sd[f"{t}.embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = _layer_norm(x, sd, f"{t}.embeddings.LayerNorm", 1e-12)
    extended_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    layers = len({k.split(".")[3] for k in sd if k.startswith(f"{t}.encoder.layer.")})
    for i in range(layers):
        p = f"{t}.encoder.layer.{i}"
        h = _bert_attention(x, x, sd, f"{p}.attention.self", text_heads, extended_mask)
        x = _layer_norm(_linear(h, sd, f"{p}.attention.output.dense") + x, sd, f"{p}.attention.output.LayerNorm", 1e-12)
        h0 = _linear(_bert_attention(x, image0_embeds, sd, f"{p}.crossattention.self0", text_heads), sd,
                     f"{p}.crossattention.output.dense0")
        h1 = _linear(_bert_attention(x, image1_embeds, sd, f"{p}.crossattention.self1", text_heads), sd,
                     f"{p}.crossattention.output.dense1")
        # The original's rule (BLIP models/nlvr_encoder.py: merge=(is_cross_attention and layer_num>=6)), at any depth.
        if i >= 6:
            h = _linear(torch.cat([h0, h1], dim=-1), sd, f"{p}.crossattention.output.merge_layer")
        else:
            h = (h0 + h1) / 2
        x = _layer_norm(h + x, sd, f"{p}.crossattention.output.LayerNorm", 1e-12)
        h = _linear(F.gelu(_linear(x, sd, f"{p}.intermediate.dense")), sd, f"{p}.output.dense")
        x = _layer_norm(h + x, sd, f"{p}.output.LayerNorm", 1e-12)
    return _linear(F.relu(_linear(x[:, 0], sd, "cls_head.0")), sd, "cls_head.2")
