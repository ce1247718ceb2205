import copy

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

from models.blip2_lm import Blip2CausalLM, from_transformers, load_checkpoint, to_transformers
from models.blip2_qformer import Blip2Qformer
from train_demo_lm import build_demo_tokenizer
from utils import InputError, TrainConfig, build_optimizer

CAPTIONS = ["a red circle at the top left", "there is a blue square in the bottom right corner",
            "two shapes: a green triangle (top right) and a yellow circle (bottom left)",
            "the top left has a red square", "a dark picture with a blue circle on the bottom left"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_demo_tokenizer([c + "\n" for c in CAPTIONS] + ["a photo of"])


def hf_pair(tokenizer, num_query_tokens=32):
    """transformers' Blip2ForConditionalGeneration with tiny random weights (OPT vocabulary = the tokenizer's plus
    an image placeholder token, as in Salesforce/blip2-opt-2.7b), and ours with the same weights."""
    vision = Blip2VisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                               image_size=32, patch_size=16, layer_norm_eps=1e-6)
    qformer = Blip2QFormerConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                 encoder_hidden_size=128, use_qformer_text_input=False)
    image_token = len(tokenizer)
    text = OPTConfig(vocab_size=image_token + 1, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
                     num_attention_heads=4, ffn_dim=128, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=num_query_tokens, image_token_index=image_token)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # random, not the init's zeros and ones, so that a wrong mapping shows; EVA has no key bias
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for layer in hf.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[128:256] = 0
    ours = Blip2CausalLM(copy.deepcopy(hf.language_model), tokenizer, vision="eva_tiny", image_size=32, qformer="tiny",
                         num_query_tokens=num_query_tokens, vit_precision="fp32", ln_vision_eps=1e-6).eval()
    return hf, ours


def load_hf_weights(ours, hf, tmp_path):
    torch.save({"model": hf.state_dict()}, tmp_path / "hf.pth")
    load_checkpoint(ours, str(tmp_path / "hf.pth"))


def test_parity_with_transformers_blip2_opt(tokenizer, tmp_path):
    hf, ours = hf_pair(tokenizer)
    load_hf_weights(ours, hf, tmp_path)
    ours.prompt = "a photo of"
    images, prompts = torch.randn(3, 3, 32, 32), ["a photo of"] * 3
    ids, mask, labels = ours.text_tokens(prompts, CAPTIONS[:3], images.device)
    num_query = 32
    image_tokens = torch.full((3, num_query), hf.config.image_token_index)
    with torch.no_grad():
        torch.testing.assert_close(ours.soft_prompt(images), hf.get_image_features(images).pooler_output,
                                   atol=1e-5, rtol=1e-5)
        out = hf(pixel_values=images, input_ids=torch.cat([image_tokens, ids], 1),
                 attention_mask=torch.cat([torch.ones_like(image_tokens), mask], 1),
                 labels=torch.cat([torch.full_like(image_tokens, -100), labels], 1))
        # The head runs where a label is predicted only: those rows of transformers' logits of every position.
        predicting = labels[:, 1:] != -100
        torch.testing.assert_close(ours.text_logits(images, ids, mask, labels, prompts),
                                   out.logits[:, num_query:-1][predicting], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(images, prompts, CAPTIONS[:3])["loss"], out.loss, atol=1e-5, rtol=1e-5)

        prompt = tokenizer(["a photo of"] * 3, return_tensors="pt").input_ids
        # No repetition penalty here: transformers' BLIP-2 also penalises the prompt's tokens, LAVIS (and we) only
        # the generated ones.
        for num_beams in (1, 3):
            kwargs = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=2, eos_token_id=ours.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, length_penalty=0.5)
            theirs = hf.generate(images, input_ids=torch.cat([image_tokens, prompt], 1), **kwargs)
            mine = ours.generate(images, num_beams=num_beams, max_new_tokens=6, min_new_tokens=2, length_penalty=0.5)
            assert torch.equal(mine, theirs[:, num_query + prompt.shape[1]:]), num_beams


def test_generation_honours_max_and_min_new_tokens_with_a_prompt_and_32_queries(tokenizer):
    _, model = hf_pair(tokenizer)
    model.prompt = "a photo of"
    images = torch.randn(2, 3, 32, 32)
    for limit in (1, 5, 9):
        ids = model.generate(images, num_beams=3, max_new_tokens=limit, min_new_tokens=limit)
        assert ids.shape == (2, limit)
        assert (ids != model.eos_token_id).all()  # eos is forbidden before min_new_tokens
    ids = model.generate(images, num_beams=1, max_new_tokens=4, min_new_tokens=0)
    assert 1 <= ids.shape[1] <= 4
    captions = model.caption(images, num_beams=2, max_new_tokens=4, min_new_tokens=0, num_captions=2)
    assert len(captions) == 4 and all(isinstance(c, str) and "\n" not in c for c in captions)


def test_labels_cover_the_caption_and_newline_only(tokenizer):
    _, model = hf_pair(tokenizer, num_query_tokens=4)
    ids, mask, labels = model.text_tokens(["a photo of"] * 2, ["a red circle", "the top left has a red square"], "cpu")
    prompt = tokenizer("a photo of").input_ids
    assert prompt[0] == tokenizer.bos_token_id
    for row in range(2):
        n = int(mask[row].sum())
        assert ids[row, :len(prompt)].tolist() == prompt
        assert ids[row, n - 1] == model.eos_token_id  # every caption ends with "\n"
        assert (labels[row, :len(prompt)] == -100).all() and (labels[row, n:] == -100).all()
        assert torch.equal(labels[row, len(prompt):n], ids[row, len(prompt):n])
    text = tokenizer.decode(ids[0, len(prompt):int(mask[0].sum())])
    assert text == " a red circle\n"


def test_frozen_opt_gets_no_gradient_no_optimizer_state_and_no_checkpoint_entry(tokenizer):
    _, model = hf_pair(tokenizer, num_query_tokens=4)
    model.train()
    assert model.opt_model.training and not model.visual_encoder.training  # LAVIS: the frozen OPT's dropout is on
    model.lm_dropout = False
    assert not model.train().opt_model.training
    model(torch.randn(2, 3, 32, 32), [""] * 2, CAPTIONS[:2])["loss"].backward()
    for name, p in model.named_parameters():
        trainable = not name.startswith(("opt_model.", "visual_encoder."))
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
    optimizer = build_optimizer(model, TrainConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}

    state = model.state_dict()
    assert not any(k.startswith("opt_model.") for k in state)
    assert any(k.startswith("visual_encoder.") for k in state)  # random init: nothing else could rebuild it
    model.vit_source = "eva_vit_g.pth"
    state = model.state_dict()
    assert not any(k.startswith(("opt_model.", "visual_encoder.")) for k in state)
    assert {k.split(".")[0] for k in state} == {"ln_vision", "Qformer", "query_tokens", "opt_proj"}
    model.load_state_dict(state)  # strict: the frozen parts are not asked for
    with pytest.raises(RuntimeError, match="opt_proj"):
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("opt_proj.")})


def test_state_dict_has_lavis_blip2_opt_keys(tokenizer):
    _, model = hf_pair(tokenizer, num_query_tokens=4)
    qformer = {k for k in model.state_dict() if k.startswith("Qformer.")}
    assert "Qformer.bert.embeddings.LayerNorm.weight" in qformer
    assert not any(".cls." in k or "word_embeddings" in k or "position_embeddings" in k for k in qformer)
    assert not any(".intermediate." in k or ".output.dense" in k and "attention" not in k for k in qformer)
    assert "Qformer.bert.encoder.layer.0.intermediate_query.dense.weight" in qformer
    assert "Qformer.bert.encoder.layer.0.crossattention.self.key.weight" in qformer
    assert model.state_dict()["opt_proj.weight"].shape == (64, 128)


def test_lavis_and_transformers_layouts_round_trip(tokenizer):
    hf, ours = hf_pair(tokenizer)
    state = {k: v for k, v in ours.state_dict().items()}
    opt_state = ours.opt_model.state_dict()
    hf_state = to_transformers(state, opt_state)
    assert set(hf_state) == set(hf.state_dict())
    back, opt_back = from_transformers(hf_state, "opt")
    assert set(back) == set(state) and set(opt_back) == set(opt_state)
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    for key, value in opt_back.items():
        assert torch.equal(value, opt_state[key]), key


def test_stage1_checkpoint_initialises_the_shared_parts(tokenizer, tmp_path):
    stage1 = Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32, qformer="tiny",
                          vocab_size=41, num_query_tokens=4, embed_dim=32, vit_precision="fp32")
    torch.save({"model": stage1.state_dict()}, tmp_path / "stage1.pth")
    _, model = hf_pair(tokenizer, num_query_tokens=4)
    opt_proj = model.opt_proj.weight.clone()
    load_checkpoint(model, str(tmp_path / "stage1.pth"))
    theirs = stage1.state_dict()
    for key, value in model.state_dict().items():
        if key.startswith("opt_proj."):
            continue
        assert torch.equal(value, theirs[key]), key
    assert torch.equal(model.opt_proj.weight, opt_proj)
    assert model.vit_source == str(tmp_path / "stage1.pth")


def test_checkpoints_reload_and_mismatches_are_explained(tokenizer, tmp_path):
    _, model = hf_pair(tokenizer, num_query_tokens=4)
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    _, other = hf_pair(tokenizer, num_query_tokens=4)
    load_checkpoint(other, str(tmp_path / "ours.pth"))
    assert other.vit_source == str(tmp_path / "ours.pth")  # from now on the file supplies the frozen encoder
    vision = {f"visual_encoder.{k}": v for k, v in other.visual_encoder.state_dict().items()}
    reloaded = {**other.state_dict(), **vision}
    for key, value in model.state_dict().items():
        assert torch.equal(value, reloaded[key]), key

    _, wrong = hf_pair(tokenizer, num_query_tokens=8)
    with pytest.raises(InputError, match="query_tokens is"):
        load_checkpoint(wrong, str(tmp_path / "ours.pth"))

    model.vit_source = "vit.pth"
    torch.save({"model": model.state_dict(), "config": {"model": {"vit_pretrained": "vit.pth"}}},
               tmp_path / "no_vit.pth")
    _, fresh = hf_pair(tokenizer, num_query_tokens=4)
    with pytest.raises(InputError, match="no image-encoder weights.*vit.pth"):
        load_checkpoint(fresh, str(tmp_path / "no_vit.pth"))


def test_bf16_opt_trains_fp32_weights_with_an_fp32_loss(tokenizer):
    hf, _ = hf_pair(tokenizer, num_query_tokens=4)
    model = Blip2CausalLM(copy.deepcopy(hf.language_model).to(torch.bfloat16), tokenizer, vision="eva_tiny",
                          image_size=32, qformer="tiny", num_query_tokens=4, vit_precision="bf16").train()
    loss = model(torch.randn(2, 3, 32, 32), [""] * 2, CAPTIONS[:2])["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.opt_proj.weight.grad.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
