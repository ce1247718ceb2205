from functools import partial

import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

from models.vit import VisionTransformer, interpolate_pos_embed
from tests.reference_nlvr import vit_forward


def small_vit(**kw):
    torch.manual_seed(0)
    return VisionTransformer(image_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, **kw).eval()


def test_matches_timm_and_the_functional_reference():
    vit = small_vit()
    timm_vit = TimmViT(img_size=48, patch_size=16, embed_dim=64, depth=3, num_heads=4, num_classes=0,
                       global_pool="", norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    timm_vit.load_state_dict(vit.state_dict(), strict=True)  # same key layout as BLIP's visual_encoder
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = vit(images)
        assert ours.shape == (2, 1 + 9, 64)
        torch.testing.assert_close(ours, timm_vit.forward_features(images), atol=1e-5, rtol=1e-5)
        sd = {f"visual_encoder.{k}": v for k, v in vit.state_dict().items()}
        torch.testing.assert_close(ours, vit_forward(sd, images, heads=4), atol=1e-5, rtol=1e-5)


def test_checkpoint_keys_are_blips():
    keys = set(small_vit().state_dict())
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
            "norm.bias"} <= keys
    assert {k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")} == {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
        "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}


def test_pos_embed_resampling_matches_timm_bicubic_without_antialias():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    ours = interpolate_pos_embed(pos, 24 * 24)
    theirs = resample_abs_pos_embed(pos, [24, 24], num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    assert ours.shape == (1, 1 + 24 * 24, 32)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours[:, 0], pos[:, 0])
    assert interpolate_pos_embed(pos, 14 * 14) is pos


def counted(forward, calls, i):
    def wrapper(x):
        calls[i] += 1
        return forward(x)
    return wrapper


@pytest.mark.parametrize("layers", [1, 3])
def test_activation_checkpointing_keeps_names_and_gradients(layers):
    plain, ckpt = small_vit(), small_vit(grad_ckpt_layers=layers)
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    calls = [0] * 3
    for i, block in enumerate(ckpt.blocks):
        block.forward = counted(block.forward, calls, i)
    images = torch.randn(2, 3, 48, 48)
    for model in (plain, ckpt):
        model.train()
        model(images).square().mean().backward()
    # checkpointed blocks run their forward a second time in the backward pass
    assert calls == [1] * (3 - layers) + [2] * layers
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_stochastic_depth_only_in_training():
    vit = small_vit(drop_path_rate=0.5)
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    images = torch.randn(4, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(vit(images), vit(images))
        vit.train()
        torch.manual_seed(1)
        a = vit(images)
        torch.manual_seed(2)
        assert not torch.allclose(a, vit(images))
