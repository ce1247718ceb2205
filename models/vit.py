"""BLIP's Vision Transformer (ViT-B/16, ViT-L/16), key-compatible with `visual_encoder.*` of the original checkpoints.

Blocks are timm's pre-norm `Block` (attention through `scaled_dot_product_attention`, stochastic depth), whose
parameter names (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`) are the original's.
"""

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

VIT_SIZES = {
    "tiny": dict(embed_dim=128, depth=4, num_heads=4),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}


class VisionTransformer(nn.Module):
    """Pre-norm ViT that returns every token after the final LayerNorm.

    images [B, 3, S, S] -> tokens [B, 1 + (S / patch_size)^2, embed_dim], the class token first.

    `grad_ckpt_layers`: the last N blocks recompute their activations in the backward pass. We use non-reentrant
    `torch.utils.checkpoint` rather than fairscale's wrapper (the original's choice): it needs no extra package,
    works with DDP, autocast and inputs that do not require grad, and leaves parameter names unchanged.
    """

    def __init__(self, image_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
                 drop_path_rate=0.0, grad_ckpt_layers=0):
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        drop_path = torch.linspace(0, drop_path_rate, depth).tolist()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(depth))
        self.norm = norm_layer(embed_dim)
        self.grad_ckpt_layers = grad_ckpt_layers

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)

    def forward(self, images):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        first_checkpointed = len(self.blocks) - self.grad_ckpt_layers
        for i, block in enumerate(self.blocks):
            if i >= first_checkpointed and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)


def init_vit_weights(module):
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def create_vit(size, image_size, patch_size=16, drop_path_rate=0.0, grad_ckpt_layers=0):
    """A ViT of a named size (`tiny`, `base`, `large`)."""
    return VisionTransformer(image_size=image_size, patch_size=patch_size, drop_path_rate=drop_path_rate,
                             grad_ckpt_layers=grad_ckpt_layers, **VIT_SIZES[size])


def interpolate_pos_embed(pos_embed, num_patches):
    """Resample a checkpoint's position embeddings [1, 1 + N, D] to `num_patches` patches.

    The class-token embedding is kept; the patch embeddings are resized bicubically (align_corners=False, no
    antialiasing) on their square grid, as the original did when fine-tuning at another image size.
    """
    old_side, new_side = int((pos_embed.shape[1] - 1) ** 0.5), int(num_patches ** 0.5)
    if old_side == new_side:
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    grid = patch_pos.reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, dim).to(pos_embed.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)
