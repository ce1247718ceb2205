"""BLIP-2's vision encoders, key-compatible with LAVIS's `eva_vit_g.pth`, `clip_vit_L.pth` and `visual_encoder.*` of
the BLIP-2 checkpoints.

- `EvaViT` (EVA ViT-g/14): pre-norm blocks whose attention has a bias-free fused `qkv` plus learned `q_bias` and
  `v_bias`; LayerNorm eps 1e-6, exact GELU, no final norm.
- `ClipViT` (OpenAI CLIP ViT-L/14): `ln_pre` after the position embeddings, pre-norm blocks with QuickGELU, LayerNorm
  eps 1e-5, no `ln_post`.
Both return every token; BLIP-2 drops the last block of the released encoders (EVA-CLIP-g has 40, CLIP-L 24).
Attention runs through `scaled_dot_product_attention`. `freeze_vision_encoder` gives the frozen, low-precision mode
BLIP-2 trains with.
"""

from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from models.families import describe
from models.vit import init_vit_weights, interpolate_pos_embed
from utils import Count, InputError, UnitInterval, Workers, check_patches, load_checkpoint_file, log

_LAVIS_BLIP2 = "https://storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2"
VISION_WEIGHT_URLS = {"eva_vit_g": f"{_LAVIS_BLIP2}/eva_vit_g.pth", "clip_vit_L": f"{_LAVIS_BLIP2}/clip_vit_L.pth"}


@dataclass
class VisionConfig:
    """The image-encoder keys of the BLIP-2 `model:` config sections."""
    vision: Literal["eva_vit_g", "clip_vit_L", "eva_tiny"] = "eva_vit_g"
    image_size: Count = 224
    patch_size: Optional[Count] = None        # null: the encoder's own (14 for EVA ViT-g and CLIP ViT-L)
    vit_pretrained: Optional[str] = None      # image-encoder weights (eva_vit_g.pth, clip_vit_L.pth): path or URL
    freeze_vit: bool = True
    vit_precision: Literal["fp16", "bf16", "fp32"] = "fp16"   # weights of the frozen encoder
    drop_path_rate: UnitInterval = 0.0
    vit_grad_ckpt: bool = False
    vit_ckpt_layer: Workers = 0               # with vit_grad_ckpt: checkpoint the last N blocks (trainable ViT only)

    def validate(self):
        return check_patches(self.image_size, self.patch_size or VISION_ENCODERS[self.vision][1]["patch_size"])

    def encoder_kwargs(self):
        """The image-encoder arguments of Blip2Qformer and Blip2OPT."""
        return dict(vision=self.vision, image_size=self.image_size, patch_size=self.patch_size,
                    freeze_vit=self.freeze_vit, vit_precision=self.vit_precision, drop_path_rate=self.drop_path_rate,
                    vit_grad_ckpt_layers=self.vit_ckpt_layer if self.vit_grad_ckpt else 0)


def _self_attention(x, weight, bias, num_heads):
    """Multi-head self-attention up to (not including) the output projection: x [B, L, D] -> [B, L, D]."""
    B, L, D = x.shape
    q, k, v = F.linear(x, weight, bias).view(B, L, 3, num_heads, D // num_heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D)


class _VisionEncoder(nn.Module):
    """What both encoders share: activation checkpointing of the last `grad_ckpt_layers` blocks (non-reentrant
    `torch.utils.checkpoint`, as in `models.vit`) and the frozen mode set by `freeze_vision_encoder`."""

    frozen = False

    def forward(self, images):
        """images [B, 3, S, S] -> tokens [B, 1 + (S / patch_size)^2, embed_dim], the class token first."""
        if not self.frozen:
            return self.encode(images)
        with torch.no_grad():
            return self.encode(images.to(next(self.parameters()).dtype))

    def train(self, mode=True):
        # a frozen encoder stays in eval mode (no dropout or drop-path) whatever its parent model asks
        return super().train(mode and not self.frozen)

    def run_blocks(self, x, blocks):
        first_checkpointed = len(blocks) - self.grad_ckpt_layers
        for i, block in enumerate(blocks):
            if i >= first_checkpointed and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class EvaAttention(nn.Module):
    """EVA's attention. The key bias is fixed at zero, which loses nothing: q·b_k adds the same constant to every
    logit of a query's row, and softmax ignores that."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        return self.proj(_self_attention(x, self.qkv.weight, bias, self.num_heads))


class EvaBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_dim, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EvaAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)  # fc1, exact GELU, fc2
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class EvaViT(_VisionEncoder):
    """EVA ViT as BLIP-2 uses it: images [B, 3, S, S] -> tokens [B, 1 + (S / patch_size)^2, embed_dim], no final
    norm (BLIP-2's `ln_vision` follows, outside the encoder). Stochastic depth grows linearly to `drop_path_rate`."""

    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, mlp_dim, drop_path_rate=0.0,
                 grad_ckpt_layers=0):
        super().__init__()
        self.num_features = embed_dim
        self.grad_ckpt_layers = grad_ckpt_layers
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans=3, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList(EvaBlock(embed_dim, num_heads, mlp_dim, drop_path[i]) for i in range(depth))

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_vit_weights)
        # EVA's (BEiT's) depth scaling of the residual branches' output layers keeps the stream's variance bounded
        for i, block in enumerate(self.blocks):
            block.attn.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
            block.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)

    def encode(self, images):
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.run_blocks(x, self.blocks)


class ClipAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameter names (`in_proj_weight`, `in_proj_bias`, `out_proj`) over batch-first SDPA,
    so CLIP shares EVA's attention code instead of MultiheadAttention's sequence-first interface."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        return self.out_proj(_self_attention(x, self.in_proj_weight, self.in_proj_bias, self.num_heads))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ClipBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_dim, drop_path):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = ClipAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(dim, mlp_dim), gelu=QuickGELU(),
                                             c_proj=nn.Linear(mlp_dim, dim)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.ln_1(x)))
        return x + self.drop_path(self.mlp(self.ln_2(x)))


class ClipViT(_VisionEncoder):
    """LAVIS's CLIP ViT: images [B, 3, S, S] -> tokens [B, 1 + (S / patch_size)^2, embed_dim], no `ln_post`.
    (The original has no stochastic depth; `drop_path_rate` 0 reproduces it.)"""

    def __init__(self, image_size, patch_size, embed_dim, depth, num_heads, mlp_dim, drop_path_rate=0.0,
                 grad_ckpt_layers=0):
        super().__init__()
        self.num_features = embed_dim
        self.grad_ckpt_layers = grad_ckpt_layers
        self.conv1 = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = embed_dim ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(embed_dim))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + (image_size // patch_size) ** 2, embed_dim))
        self.ln_pre = nn.LayerNorm(embed_dim)
        drop_path = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # also under a meta device
        self.transformer = nn.ModuleDict({"resblocks": nn.ModuleList(
            ClipBlock(embed_dim, num_heads, mlp_dim, drop_path[i]) for i in range(depth))})

    def encode(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        return self.run_blocks(self.ln_pre(x), self.transformer.resblocks)


VISION_ENCODERS = {
    "eva_vit_g": (EvaViT, dict(patch_size=14, embed_dim=1408, depth=39, num_heads=16, mlp_dim=6144)),
    "clip_vit_L": (ClipViT, dict(patch_size=14, embed_dim=1024, depth=23, num_heads=16, mlp_dim=4096)),
    "eva_tiny": (EvaViT, dict(patch_size=16, embed_dim=128, depth=4, num_heads=4, mlp_dim=512)),  # CPU demos, tests
}


def create_vision_encoder(name, image_size, drop_path_rate=0.0, grad_ckpt_layers=0, patch_size=None):
    """A vision encoder of a named size (`VISION_ENCODERS`); `patch_size` None keeps the size's own."""
    if name not in VISION_ENCODERS:
        raise InputError(f"unknown vision encoder {name!r}: valid ones are {', '.join(VISION_ENCODERS)}")
    cls, size = VISION_ENCODERS[name]
    if patch_size is not None:
        size = {**size, "patch_size": patch_size}
    return cls(image_size=image_size, drop_path_rate=drop_path_rate, grad_ckpt_layers=grad_ckpt_layers, **size)


FROZEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def freeze_vision_encoder(encoder, dtype):
    """Freeze `encoder` in place as BLIP-2 does, and return it: no parameter requires grad, the weights are cast to
    `dtype`, the encoder stays in eval mode through any `train()` call, and its forward runs under `torch.no_grad()`
    on images cast to `dtype`, returning tokens in `dtype` (the trainable fp32 `ln_vision` after it upcasts).

    The original casts only Linear/Conv weights to fp16 and relies on autocast; casting everything halves the memory
    of the norms and embeddings too. Parameter names, hence `state_dict()` keys, are unchanged.
    """
    if dtype not in FROZEN_DTYPES:
        raise InputError(f"a frozen vision encoder runs in float32, bfloat16 or float16, not {dtype}")
    encoder.requires_grad_(False)
    encoder.to(dtype)
    encoder.frozen = True
    return encoder.eval()


def load_vision_file(encoder, url_or_path):
    """load_vision_weights from a checkpoint file (path or URL): an encoder's own (eva_vit_g.pth) or a model's."""
    state = load_checkpoint_file(url_or_path)
    load_vision_weights(encoder, state.get("model", state), url_or_path)


def load_vision_weights(encoder, state_dict, source="the checkpoint"):
    """Load vision weights into `encoder`; returns the checkpoint keys it dropped.

    `state_dict` is flat: either the encoder's own keys (`eva_vit_g.pth`, `clip_vit_L.pth`) or a full BLIP-2
    checkpoint, whose `visual_encoder.*` keys are used and the rest ignored. Position embeddings made at another image
    size are resampled bicubically: EVA's as `models.vit.interpolate_pos_embed` does (align_corners=False), CLIP's
    with align_corners=True, as LAVIS does for each. Tensors the encoder has no place for (the released files' last
    block, CLIP's `ln_post` and `proj`) are dropped and logged; a missing tensor or a shape mismatch raises InputError.
    """
    prefix = "visual_encoder."
    if any(key.startswith(prefix) for key in state_dict):
        state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    expected = encoder.state_dict()
    state = {k: v for k, v in state_dict.items() if k in expected}
    dropped = sorted(set(state_dict) - set(state))
    _resample_positions(state, expected)
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"the vision weights of {source} ({describe(state_dict)}) do not fit this "
                         f"{type(encoder).__name__}: {missing[0]} is missing (missing in all: {_by_block(missing)}); "
                         "pick the vision encoder (model.vision) they were made for")
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise InputError(f"{source}: vision weight {key} has shape {list(value.shape)} but the encoder expects "
                             f"{list(expected[key].shape)}: the weights were made for another width, depth or "
                             f"patch size; pick the vision encoder (and patch_size) they were made for")
    encoder.load_state_dict(state)
    if dropped:
        log(f"vision weights: dropped tensors the encoder has no place for: {_by_block(dropped)}")
    return dropped


def _resample_positions(state, expected):
    if "pos_embed" in state:  # EVA, [1, 1 + N, D]
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], expected["pos_embed"].shape[1] - 1)
    if "positional_embedding" in state:  # CLIP, [1 + N, D]
        state["positional_embedding"] = _resample_clip_positions(
            state["positional_embedding"], expected["positional_embedding"].shape[0] - 1)


def _resample_clip_positions(pos, num_patches):
    """LAVIS's CLIP resampling: like `interpolate_pos_embed` on [1 + N, D], but align_corners=True."""
    old_side, new_side = int((pos.shape[0] - 1) ** 0.5), int(num_patches ** 0.5)
    if old_side == new_side:
        return pos
    grid = pos[1:].reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=True)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1).to(pos.dtype)])


def _by_block(keys):
    """'blocks.39.* (13), norm.* (2)': keys counted by their first component, or up to their layer index."""
    def group(key):
        parts = key.split(".")
        end = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 1)
        return ".".join(parts[:end]) + (".*" if end < len(parts) else "")
    return ", ".join(f"{name} ({n})" for name, n in sorted(Counter(map(group, keys)).items()))
