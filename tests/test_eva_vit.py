import pytest
import torch
import torch.nn as nn
from transformers import Blip2VisionConfig, Blip2VisionModel, CLIPVisionConfig, CLIPVisionModel

from models.eva_vit import ClipViT, EvaViT, create_vision_encoder, freeze_vision_encoder, load_vision_weights
from models.vit import interpolate_pos_embed
from utils import InputError

SMALL = dict(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=80)  # 16 patches, heads of 8


def small(cls, **kw):
    torch.manual_seed(0)
    return cls(**{**SMALL, **kw}).eval()


def perturbed(model):
    """`model` with every parameter moved off its initialisation (LayerNorms included), so parity tests see them."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hf_config(cls, depth, **kw):
    return cls(hidden_size=32, intermediate_size=80, num_hidden_layers=depth, num_attention_heads=4, image_size=32,
               patch_size=8, **kw)


def eva_from_hf(hf):
    """transformers' BLIP-2 vision weights in LAVIS's layout, as a BLIP-2 checkpoint: `visual_encoder.*`, and the
    final LayerNorm as `ln_vision` (the inverse of the conversion in CHECKPOINTS.md)."""
    renames = [("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding", "pos_embed"),
               ("embeddings.patch_embedding", "patch_embed.proj"), ("encoder.layers.", "blocks."),
               ("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
               ("self_attn.qkv", "attn.qkv")]
    state = {}
    for key, value in hf.state_dict().items():
        if key.startswith("post_layernorm."):
            state[key.replace("post_layernorm", "ln_vision")] = value
            continue
        for old, new in renames:
            key = key.replace(old, new)
        if key.endswith("attn.qkv.bias"):  # cat(q_bias, k_bias, v_bias); LAVIS has no k_bias
            attn = f"visual_encoder.{key.removesuffix('qkv.bias')}"
            state[f"{attn}q_bias"], _, state[f"{attn}v_bias"] = value.chunk(3)
        else:
            state[f"visual_encoder.{key}"] = value
    return state


def clip_from_hf(hf):
    """transformers' CLIP vision weights in the layout of LAVIS's `clip_vit_L.pth` (with `ln_post`)."""
    renames = [("embeddings.class_embedding", "class_embedding"),
               ("embeddings.position_embedding.weight", "positional_embedding"),
               ("embeddings.patch_embedding", "conv1"), ("pre_layrnorm", "ln_pre"), ("post_layernorm", "ln_post"),
               ("encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")]
    state = {}
    for key, value in hf.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        if ".self_attn." not in key:
            state[key] = value
    for i, layer in enumerate(hf.encoder.layers):
        attn = layer.self_attn
        for kind in ("weight", "bias"):  # q, k, v projections -> one in_proj, in that order
            state[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [getattr(proj, kind) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]).detach()
    return state


def test_eva_matches_transformers_blip2_vision_model_before_its_post_layernorm():
    hf = perturbed(Blip2VisionModel(hf_config(Blip2VisionConfig, 2, layer_norm_eps=1e-6, qkv_bias=True)))
    with torch.no_grad():
        for layer in hf.encoder.layers:
            layer.self_attn.qkv.bias[32:64] = 0  # as converted from LAVIS, whose key bias is zero
    ours = small(EvaViT)
    # given as a BLIP-2 checkpoint: `ln_vision` and the other parts are ignored, not dropped
    assert load_vision_weights(ours, {**eva_from_hf(hf), "query_tokens": torch.zeros(1, 4, 8)}) == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        raw = hf.encoder(hf.embeddings(images)).last_hidden_state  # before post_layernorm
        torch.testing.assert_close(hf(images, output_hidden_states=True).hidden_states[-1], raw)
        torch.testing.assert_close(ours(images), raw, atol=1e-5, rtol=1e-5)
        # a key bias would change nothing: it adds the same q·b_k to every logit of a query's row
        for layer in hf.encoder.layers:
            layer.self_attn.qkv.bias[32:64] = torch.randn(32)
        torch.testing.assert_close(ours(images), hf.encoder(hf.embeddings(images)).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_clip_matches_transformers_clip_vision_model_after_as_many_layers(capsys):
    hf = perturbed(CLIPVisionModel(hf_config(CLIPVisionConfig, 3, hidden_act="quick_gelu")))
    images = torch.randn(2, 3, 32, 32)
    ours = small(ClipViT)
    dropped = load_vision_weights(ours, clip_from_hf(hf))  # 3 blocks + ln_post into a 2-block encoder
    assert len(dropped) == 14 and all(k.startswith(("transformer.resblocks.2.", "ln_post.")) for k in dropped)
    assert capsys.readouterr().out.strip().endswith("ln_post.* (2), transformer.resblocks.2.* (12)")
    with torch.no_grad():
        torch.testing.assert_close(ours(images), hf(images, output_hidden_states=True).hidden_states[2],
                                   atol=1e-5, rtol=1e-5)


def block_keys(model, prefix):
    return {k.removeprefix(prefix) for k in model.state_dict() if k.startswith(prefix)}


def test_key_layouts_are_lavis():
    eva, clip = small(EvaViT), small(ClipViT)
    assert block_keys(eva, "blocks.0.") == {
        "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
        "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
        "mlp.fc2.bias"}
    assert {k for k in eva.state_dict() if not k.startswith("blocks.")} == {
        "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert block_keys(clip, "transformer.resblocks.0.") == {
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
        "mlp.c_proj.bias"}
    assert {k for k in clip.state_dict() if not k.startswith("transformer.")} == {
        "class_embedding", "positional_embedding", "conv1.weight", "ln_pre.weight", "ln_pre.bias"}
    # too small a difference for the parity tests to see
    assert {m.eps for m in eva.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}
    assert {m.eps for m in clip.modules() if isinstance(m, nn.LayerNorm)} == {1e-5}


def test_released_sizes_have_the_checkpoint_shapes():
    with torch.device("meta"):  # no memory, no compute
        eva, eva364 = create_vision_encoder("eva_vit_g", 224), create_vision_encoder("eva_vit_g", 364)
        clip = create_vision_encoder("clip_vit_L", 224)
        tiny = create_vision_encoder("eva_tiny", 32, patch_size=8)
    shapes = {k: list(v.shape) for k, v in eva.state_dict().items()}
    assert shapes["cls_token"] == [1, 1, 1408] and shapes["pos_embed"] == [1, 257, 1408]
    assert shapes["patch_embed.proj.weight"] == [1408, 3, 14, 14]
    assert shapes["blocks.38.attn.qkv.weight"] == [4224, 1408] and shapes["blocks.38.attn.q_bias"] == [1408]
    assert shapes["blocks.38.mlp.fc1.weight"] == [6144, 1408] and "blocks.39.norm1.weight" not in shapes
    assert list(eva364.pos_embed.shape) == [1, 677, 1408] and eva.num_features == 1408
    shapes = {k: list(v.shape) for k, v in clip.state_dict().items()}
    assert shapes["class_embedding"] == [1024] and shapes["positional_embedding"] == [257, 1024]
    assert shapes["conv1.weight"] == [1024, 3, 14, 14]
    assert shapes["transformer.resblocks.22.attn.in_proj_weight"] == [3072, 1024]
    assert shapes["transformer.resblocks.22.mlp.c_fc.weight"] == [4096, 1024]
    assert "transformer.resblocks.23.ln_1.weight" not in shapes and clip.num_features == 1024
    assert list(tiny.pos_embed.shape) == [1, 17, 128] and len(tiny.blocks) == 4
    with pytest.raises(InputError, match="eva_vit_g, clip_vit_L, eva_tiny"):
        create_vision_encoder("eva_vit_h", 224)


@pytest.mark.parametrize("cls", [EvaViT, ClipViT])
def test_frozen_encoder_stays_frozen_in_eval_and_low_precision(cls):
    encoder = small(cls, drop_path_rate=0.5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = encoder(images)
    keys = encoder.state_dict().keys()
    parent = nn.ModuleDict({"visual_encoder": freeze_vision_encoder(encoder, torch.bfloat16),
                            "ln_vision": nn.LayerNorm(32)})
    parent.train()
    assert parent.ln_vision.training and not any(m.training for m in encoder.modules())
    assert encoder.frozen and encoder.state_dict().keys() == keys
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in encoder.parameters())
    out = encoder(images.requires_grad_())
    assert out.dtype == torch.bfloat16 and out.grad_fn is None
    torch.testing.assert_close(encoder(images), out)  # drop-path is off
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    parent.ln_vision(out.float()).sum().backward()  # the trainable layer after it still trains
    assert parent.ln_vision.weight.grad is not None
    with pytest.raises(InputError, match="float32, bfloat16 or float16"):
        freeze_vision_encoder(encoder, torch.int8)


def test_loading_strips_the_prefix_drops_extra_blocks_and_resamples_positions(capsys):
    source = small(EvaViT, depth=3)  # 4x4 patches, one block more than the target
    state = {f"visual_encoder.{k}": v for k, v in source.state_dict().items()}
    state["ln_vision.weight"] = torch.ones(32)  # another part of a BLIP-2 checkpoint: ignored
    target = small(EvaViT, image_size=48)  # 6x6 patches
    dropped = load_vision_weights(target, state)
    assert dropped == sorted(k for k in source.state_dict() if k.startswith("blocks.2."))
    assert capsys.readouterr().out.strip().endswith("blocks.2.* (13)")
    torch.testing.assert_close(target.pos_embed, interpolate_pos_embed(source.pos_embed, 36))
    torch.testing.assert_close(target.blocks[1].attn.q_bias, source.blocks[1].attn.q_bias)

    source, target = small(ClipViT), small(ClipViT, image_size=48)
    load_vision_weights(target, source.state_dict())
    old, new = source.positional_embedding.detach(), target.positional_embedding.detach()
    assert new.shape == (37, 32)
    torch.testing.assert_close(new[0], old[0])  # class token kept
    # LAVIS resamples CLIP's grid with align_corners=True, which keeps the corner positions exactly
    old_grid, new_grid = old[1:].reshape(4, 4, 32), new[1:].reshape(6, 6, 32)
    torch.testing.assert_close(new_grid[::5, ::5], old_grid[::3, ::3])


def test_loading_rejects_missing_and_misshapen_weights():
    state = small(EvaViT).state_dict()
    with pytest.raises(InputError, match=r"blocks\.1\.attn\.q_bias"):
        load_vision_weights(small(EvaViT), {k: v for k, v in state.items() if k != "blocks.1.attn.q_bias"})
    with pytest.raises(InputError, match=r"patch_embed\.proj\.weight .*patch size"):
        load_vision_weights(small(EvaViT, patch_size=4, image_size=16), state)
    with pytest.raises(InputError, match="ClipViT: class_embedding is missing"):  # an EVA checkpoint given to CLIP
        load_vision_weights(small(ClipViT), state)


def counted(forward, calls, i):
    def wrapper(x):
        calls[i] += 1
        return forward(x)
    return wrapper


@pytest.mark.parametrize("cls", [EvaViT, ClipViT])
def test_activation_checkpointing_keeps_outputs_and_gradients(cls):
    plain, ckpt = small(cls, drop_path_rate=0.3), small(cls, drop_path_rate=0.3, grad_ckpt_layers=1)
    calls = [0, 0]
    for i, block in enumerate(ckpt.blocks if cls is EvaViT else ckpt.transformer.resblocks):
        block.forward = counted(block.forward, calls, i)
    images = torch.randn(2, 3, 32, 32)
    outputs = []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(3)  # the same drop-path masks; checkpointing replays them in the recomputation
        outputs.append(model(images))
        outputs[-1].square().mean().backward()
    assert calls == [1, 2]  # the checkpointed block ran again in the backward pass
    torch.testing.assert_close(outputs[0], outputs[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
