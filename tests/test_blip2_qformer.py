import pytest
import torch
import torch.nn.functional as F
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

from models.blip2_qformer import (Blip2Qformer, from_hf_retrieval, load_checkpoint, sample_hard_negatives,
                                  to_hf_retrieval)
from tests.conftest import run_script
from tests.reference_blip2 import blip2_losses
from tests.stage1_ddp import global_batch, tiny_stage1_model
from utils import InputError

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
TINY = {"layers": 4, "heads": 4, "ln_vision_eps": 1e-5}


def text_batch(batch=6, length=10, vocab=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (batch, length), generator=generator)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for row in range(0, batch, 2):
        cut = 3 + row % (length - 3)
        ids[row, cut:], mask[row, cut:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("with_image_ids", [True, False])
def test_losses_equal_the_original_for_the_same_weights_inputs_and_rng(with_image_ids):
    model = tiny_stage1_model().eval()
    images = torch.randn(6, 3, 32, 32)
    ids, mask = text_batch()
    image_ids = torch.tensor([0, 1, 2, 0, 3, 4]) if with_image_ids else None
    torch.manual_seed(5)
    ours = model(images, ids, mask, image_ids)
    with torch.no_grad():
        vit_tokens = model.visual_encoder(images)
        sd = {k: v.detach() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    theirs = blip2_losses(sd, TINY, vit_tokens, ids, mask, image_ids, bos_id=40, pad_id=0)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-5, msg=name)
    image_embeds = model.image_embeddings(images)
    torch.testing.assert_close(model.image_features(image_embeds), theirs["image_feats"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.text_features(ids, mask), theirs["text_feat"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours["loss"], ours["loss_itc"] + ours["loss_itm"] + ours["loss_itg"])


def test_gradients_equal_the_originals_for_the_same_weights_inputs_and_rng():
    """Every trainable weight's gradient through the original's computation (the reference recomputes each pass's
    image keys and values, and every position of every last layer, where we reuse and skip), ITC's as LAVIS's
    under DDP: one process or many, our gathered features carry no gradient."""
    model = tiny_stage1_model().eval()
    images, (ids, mask) = torch.randn(6, 3, 32, 32), text_batch()
    image_ids = torch.tensor([0, 1, 2, 0, 3, 4])
    torch.manual_seed(5)
    model(images, ids, mask, image_ids)["loss"].backward()
    with torch.no_grad():
        vit_tokens = model.visual_encoder(images)
    state = model.state_dict(keep_vars=True)
    sd = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in state.items()}
    torch.manual_seed(5)
    theirs = blip2_losses(sd, TINY, vit_tokens, ids, mask, image_ids, bos_id=40, pad_id=0, distributed=True)
    (theirs["loss_itc"] + theirs["loss_itm"] + theirs["loss_itg"]).backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # Tied tensors (the LM head's decoder and the word embeddings) are one parameter here, several keys there.
        aliases = [k for k, v in state.items() if v is param]
        reference = sum(sd[k].grad for k in aliases if sd[k].grad is not None)
        torch.testing.assert_close(param.grad, reference, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("flag", [[], ["--no_image_ids"], ["--static_graph", "--no_bucket_view"], ["--trim"]])
def test_two_processes_give_the_losses_and_gradients_of_one(tmp_path, flag):
    run_script("tests/stage1_ddp.py", "--out", tmp_path / "one.pt", *flag)
    run_script(*TORCHRUN, "tests/stage1_ddp.py", "--out", tmp_path / "two.pt", *flag)
    one, two = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))
    for name, value in one["losses"].items():
        torch.testing.assert_close(two["losses"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert one["grads"].keys() == two["grads"].keys()
    for name, grad in one["grads"].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def padded_to(tensor, length):
    """tensor [B, L] cut or zero-padded on the right to `length` columns."""
    return F.pad(tensor[:, :length], (0, max(0, length - tensor.shape[1])))


@pytest.mark.parametrize("itg_attention", ["causal", "masked"])
def test_texts_cut_to_their_longest_give_the_losses_and_gradients_of_max_length_padding(itg_attention):
    """train_blip2_stage1 pads to the longest caption, LAVIS to max_txt_len: the same function of the texts."""
    images, ids, mask, image_ids = global_batch()
    results = []
    for length in (int(mask.sum(1).max()), 32):
        model = tiny_stage1_model().eval()
        model.itg_attention = itg_attention
        torch.manual_seed(3)
        losses = model(images, padded_to(ids, length), padded_to(mask, length), image_ids)
        losses["loss"].backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (cut, cut_grads), (full, full_grads) = results
    for name in full:
        torch.testing.assert_close(cut[name], full[name], atol=1e-6, rtol=1e-6, msg=name)
    assert cut_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(cut_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_hard_negatives_are_never_positives_and_match_per_row_multinomial():
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        batch = int(torch.randint(2, 12, (1,), generator=generator))
        sim = torch.randn(batch, batch, generator=generator) * 5
        image_ids = torch.randint(0, max(2, batch // 2), (batch,), generator=generator)
        positives = image_ids[:, None] == image_ids[None, :]
        if positives.all(1).any():
            continue
        torch.manual_seed(trial)
        drawn = sample_hard_negatives(sim, positives)
        assert not positives[torch.arange(batch), drawn].any()
        weights = torch.softmax(sim.masked_fill(positives, -10000), dim=1)
        torch.manual_seed(trial)
        expected = torch.stack([torch.multinomial(weights[b], 1)[0] for b in range(batch)])
        assert torch.equal(drawn, expected)


def test_hard_negative_frequencies_follow_the_softmax():
    sim = torch.tensor([[0.0, 1.0, 2.0, 0.5]])
    positives = torch.tensor([[True, False, False, False]])
    torch.manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, positives) for _ in range(20000)]).flatten()
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.softmax(torch.tensor([-float("inf"), 1.0, 2.0, 0.5]), 0)
    torch.testing.assert_close(frequencies, expected, atol=0.015, rtol=0)


def test_a_batch_without_negatives_is_refused():
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.randn(2, 2), torch.ones(2, 2, dtype=torch.bool))


def hf_pair():
    """transformers' retrieval model with tiny random weights, and ours with those weights."""
    vision = Blip2VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                               image_size=32, patch_size=16, layer_norm_eps=1e-6)
    qformer = Blip2QFormerConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                 encoder_hidden_size=128, vocab_size=41, max_position_embeddings=64,
                                 use_qformer_text_input=True)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=4,
                         image_text_hidden_size=32)
    torch.manual_seed(0)
    hf = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # EVA has no key bias: make transformers' zero so that both compute the same function
        for layer in hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[128:256] = 0
        for p in hf.parameters():  # random, not the init's zeros and ones, so that a wrong mapping shows
            p.add_(torch.randn_like(p) * 0.02)
        for layer in hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[128:256] = 0
    ours = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, qformer="tiny",
                        vocab_size=41, num_query_tokens=4, embed_dim=32, vit_precision="fp32",
                        ln_vision_eps=1e-6).eval()  # transformers uses the ViT's eps for ln_vision
    return hf, ours


def test_parity_with_transformers_blip2_retrieval(tmp_path):
    hf, ours = hf_pair()
    torch.save({"model": hf.state_dict()}, tmp_path / "hf.pth")
    load_checkpoint(ours, str(tmp_path / "hf.pth"))
    images = torch.randn(3, 3, 32, 32)
    ids, mask = text_batch(batch=3, vocab=41)
    with torch.no_grad():
        image_embeds = ours.image_embeddings(images)
        torch.testing.assert_close(image_embeds, hf.vision_model(images).last_hidden_state, atol=1e-5, rtol=1e-5)
        query_hidden, _ = ours.query_outputs(image_embeds)
        hf_query = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=image_embeds)
        torch.testing.assert_close(query_hidden, hf_query.last_hidden_state, atol=1e-5, rtol=1e-5)
        itc = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
        sim = torch.einsum("iqe,te->itq", ours.image_features(image_embeds), ours.text_features(ids, mask)).amax(-1)
        torch.testing.assert_close(sim, itc.logits_per_image, atol=1e-5, rtol=1e-5)
        itm = hf(pixel_values=images, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
        torch.testing.assert_close(ours.itm_logits(image_embeds, ids, mask), itm.logits_per_image, atol=1e-5,
                                   rtol=1e-5)
        torch.testing.assert_close(ours.itm_scores(image_embeds, ids, mask), itm.logits_per_image[:, 1], atol=1e-5,
                                   rtol=1e-5)


def test_lavis_and_transformers_layouts_round_trip():
    hf, ours = hf_pair()
    state = ours.state_dict()
    hf_state, side = to_hf_retrieval(state)
    expected = {k for k in hf.state_dict() if not k.endswith("position_ids")}
    assert set(hf_state) == expected
    hf.load_state_dict(hf_state, strict=False)
    assert set(side) == {k for k in state if k == "temp" or k.startswith("Qformer.cls.")}
    back = from_hf_retrieval(hf_state, side)
    assert set(back) == {k for k in state if not k.endswith("position_ids")}
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    again, _ = to_hf_retrieval(back)
    for key, value in again.items():
        assert torch.equal(value, hf_state[key]), key


def test_a_transformers_checkpoint_with_a_key_bias_is_refused():
    hf, _ = hf_pair()
    state = hf.state_dict()
    state["vision_model.encoder.layers.0.self_attn.qkv.bias"][130] = 1.0
    with pytest.raises(InputError, match="key bias"):
        from_hf_retrieval(state)


def test_own_checkpoint_reloads_and_mismatches_are_explained(tmp_path):
    model = tiny_stage1_model().eval()
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    other = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, qformer="tiny",
                         vocab_size=41, num_query_tokens=4, embed_dim=32, vit_precision="fp32").eval()
    load_checkpoint(other, str(tmp_path / "ckpt.pth"))
    images, ids, mask, _ = global_batch()
    with torch.no_grad():
        torch.testing.assert_close(other.itm_scores(other.image_embeddings(images), ids, mask),
                                   model.itm_scores(model.image_embeddings(images), ids, mask))
    wrong = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, qformer="tiny",
                         vocab_size=41, num_query_tokens=8, embed_dim=32, vit_precision="fp32")
    with pytest.raises(InputError, match="query_tokens.*num_query_tokens"):
        load_checkpoint(wrong, str(tmp_path / "ckpt.pth"))
    state = model.state_dict()
    del state["itm_head.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="missing itm_head.weight"):
        load_checkpoint(other, str(tmp_path / "partial.pth"))


def test_frozen_vision_encoder_gets_no_gradient_and_ln_vision_does():
    model = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, qformer="tiny",
                         vocab_size=41, num_query_tokens=4, embed_dim=32, vit_precision="bf16")
    model.train()
    assert not model.visual_encoder.training
    images, ids, mask, image_ids = global_batch()
    model(images, ids, mask, image_ids)["loss"].backward()
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in model.visual_encoder.parameters())
    assert model.ln_vision.weight.grad is not None and model.ln_vision.weight.dtype == torch.float32
    assert model.query_tokens.grad is not None and model.temp.grad is not None


def test_conversion_command_round_trips(tmp_path):
    state = tiny_stage1_model().state_dict()
    torch.save({"model": state}, tmp_path / "lavis.pth")
    run_script("convert_checkpoint.py", "stage1", "to_hf", tmp_path / "lavis.pth", tmp_path / "hf.pth")
    hf, _ = hf_pair()
    converted = torch.load(tmp_path / "hf.pth", weights_only=True)
    hf.load_state_dict(converted, strict=False)
    assert set(converted) == {k for k in hf.state_dict() if not k.endswith("position_ids")}
    run_script("convert_checkpoint.py", "stage1", "from_hf", tmp_path / "hf.pth", tmp_path / "back.pth",
               "--side", tmp_path / "hf.pth.side.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == {k for k in state if not k.endswith("position_ids")}
    assert all(torch.equal(back[k], state[k]) for k in back)
