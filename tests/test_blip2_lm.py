import copy
import re

import pytest
import torch
from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

from models.blip2_lm import (Blip2CausalLM, Blip2LMConfig, Blip2T5, add_lora, create_model, from_transformers,
                             load_causal_lm, load_checkpoint, load_state, load_t5, merge_lora, read_transformers,
                             save_transformers, to_transformers)
from models.blip2_qformer import Blip2Qformer
from models.eva_vit import ClipViT
from tests.reference_lm import (bert_tokenizer, llama_tokenizer, opt_tokenizer, t5_tokenizer, text_config,
                                transformers_model)
from tests.conftest import run_script
from tests.stage2_ddp import TOKENIZERS
from utils import InputError, TrainConfig, build_optimizer

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")

TINY = dict(vision="eva_tiny", image_size=32, qformer="tiny", num_query_tokens=4, vit_precision="fp32",
            ln_vision_eps=1e-6)  # transformers' ln_vision takes the encoder's eps
INSTRUCTIONS = ["what is in the image?", "question: how many shapes are there? answer:", "describe the picture."]
ANSWERS = ["a red circle", "two", "a dark picture with a blue circle on the bottom left"]
# (LM, instruction-aware Q-Former): BLIP-2 and InstructBLIP with a LLaMA-architecture LM and with T5.
VARIANTS = [("llama", False), ("llama", True), ("t5", False), ("t5", True)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"opt": opt_tokenizer(), "llama": llama_tokenizer(), "t5": t5_tokenizer(),
            "bert": bert_tokenizer(tmp_path_factory.mktemp("bert"))}


def qformer_inputs(tokenizers):
    """InstructBLIP's instruction for transformers' models: the Q-Former's tokens of INSTRUCTIONS."""
    tokens = tokenizers["bert"](INSTRUCTIONS, padding="longest", return_tensors="pt")
    return dict(qformer_input_ids=tokens.input_ids, qformer_attention_mask=tokens.attention_mask)


def pair(tokenizers, kind, instruct, **kwargs):
    """transformers' model (tests/reference_lm.py) and ours with its weights, loaded through the layout converters."""
    tokenizer, qformer_tokenizer = tokenizers[kind], tokenizers["bert"] if instruct else None
    hf = transformers_model(kind, tokenizer, len(qformer_tokenizer) if instruct else None)
    model_class = Blip2T5 if kind == "t5" else Blip2CausalLM
    ours = model_class(copy.deepcopy(hf.language_model), tokenizer, qformer_tokenizer=qformer_tokenizer,
                       max_txt_len=64, **{**TINY, **kwargs})
    load_state(ours, hf.state_dict(), "transformers")
    return hf, ours.eval()


def lm_inputs(ids, mask, num_query, image_token):
    """transformers' input_ids/attention_mask: image placeholder tokens where our soft prompt goes, then `ids`."""
    image_tokens = torch.full((ids.shape[0], num_query), image_token)
    return torch.cat([image_tokens, ids], 1), torch.cat([torch.ones_like(image_tokens), mask], 1)


@pytest.mark.parametrize("kind,instruct", VARIANTS)
def test_parity_with_transformers(tokenizers, kind, instruct):
    """transformers 5 puts the projected queries at image placeholder tokens of input_ids (masked_scatter); with
    the placeholders first they take the positions our concatenation gives them, so the comparison is exact."""
    hf, ours = pair(tokenizers, kind, instruct)
    tokenizer, images, num_query = ours.lm_tokenizer, torch.randn(3, 3, 32, 32), 4
    image_token = hf.config.image_token_index
    qformer = qformer_inputs(tokenizers) if instruct else {}
    with torch.no_grad():
        if kind == "t5":
            encoder = tokenizer(INSTRUCTIONS, padding="longest", return_tensors="pt")
            labels, decoder_mask = ours.target_tokens(ANSWERS, "cpu")
            input_ids, attention_mask = lm_inputs(encoder.input_ids, encoder.attention_mask, num_query, image_token)
            theirs = hf(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        decoder_attention_mask=decoder_mask, **qformer)
            torch.testing.assert_close(ours.decoder_logits(images, INSTRUCTIONS, labels, decoder_mask)[labels != -100],
                                       theirs.logits[labels != -100], atol=1e-5, rtol=1e-5)
            # T5's generation sees no prompt ids on either side: a repetition penalty means the same in both.
            shared, theirs_only = dict(repetition_penalty=1.5), {}
        else:
            ids, mask, labels = ours.text_tokens(INSTRUCTIONS, ANSWERS, "cpu")
            input_ids, attention_mask = lm_inputs(ids, mask, num_query, image_token)
            theirs = hf(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask,
                        labels=torch.cat([torch.full((3, num_query), -100), labels], 1), **qformer)
            labelled = labels[:, 1:] != -100
            torch.testing.assert_close(ours.text_logits(images, ids, mask, labels, INSTRUCTIONS),
                                       theirs.logits[:, num_query:-1][labelled], atol=1e-5, rtol=1e-5)
            # The prompts differ in length: left padding between the queries and the prompt, on both sides.
            # No repetition penalty: transformers also penalises the prompt's (and the placeholder's) ids, which
            # it passes to generate; LAVIS and we only the generated ones.
            prompt = tokenizer(INSTRUCTIONS, padding="longest", padding_side="left", return_tensors="pt")
            encoder = prompt
            shared, theirs_only = {}, dict(eos_token_id=ours.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        torch.testing.assert_close(ours(images, INSTRUCTIONS, ANSWERS)["loss"], theirs.loss, atol=1e-5, rtol=1e-5)
        input_ids, attention_mask = lm_inputs(encoder.input_ids, encoder.attention_mask, num_query, image_token)
        for num_beams in (1, 3):
            kwargs = dict(num_beams=num_beams, max_new_tokens=6, min_new_tokens=2, length_penalty=0.5, **shared)
            mine = ours.generate(images, INSTRUCTIONS, **kwargs)
            generated = hf.generate(images, input_ids=input_ids, attention_mask=attention_mask, **qformer, **kwargs,
                                    **theirs_only)
            start = 1 if kind == "t5" else input_ids.shape[1]  # T5: the decoder start; others: the prompt
            assert torch.equal(mine, generated[:, start:]), num_beams


def test_instructions_change_the_soft_prompt_and_blip2_ignores_them(tokenizers):
    _, instruct = pair(tokenizers, "llama", True)
    _, plain = pair(tokenizers, "llama", False)
    images = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)
    with torch.no_grad():
        soft = instruct.soft_prompt(images, INSTRUCTIONS[:2])
        assert not torch.allclose(soft[0], soft[1])
        # Rows of one batch may differ in the last bits (batched kernels): the instructions swapped, each row equal.
        assert torch.equal(plain.soft_prompt(images, INSTRUCTIONS[:2]), plain.soft_prompt(images, INSTRUCTIONS[1::-1]))
    keys = set(instruct.state_dict())
    assert "Qformer.bert.embeddings.word_embeddings.weight" in keys
    assert "Qformer.bert.encoder.layer.0.intermediate.dense.weight" in keys
    assert not any(k.startswith("Qformer.cls.") for k in keys)
    assert not any("word_embeddings" in k or ".intermediate." in k for k in plain.state_dict())
    assert {k.split(".")[0] for k in keys} == {"ln_vision", "Qformer", "query_tokens", "llm_proj"}


def test_llama_layout_input_then_output_then_padding(tokenizers):
    """LAVIS's blip2_vicuna_instruct: [input (BOS first, cut on the left); output + eos (cut on the right, the BOS
    counted); padding]; labels on the output and its eos only; a tokenizer without a pad token pads with unk."""
    _, model = pair(tokenizers, "llama", False, max_output_txt_len=5)
    tokenizer = model.lm_tokenizer
    assert tokenizer.pad_token == "<unk>" and model.eos_token_id == tokenizer.eos_token_id == 2
    ids, mask, labels = model.text_tokens(INSTRUCTIONS, ANSWERS, "cpu")
    for row, (text_input, text_output) in enumerate(zip(INSTRUCTIONS, ANSWERS)):
        expected_input = tokenizer(text_input).input_ids
        expected_output = tokenizer(text_output + "</s>", add_special_tokens=False).input_ids[:4]
        n, m = len(expected_input), len(expected_output)
        assert expected_input[0] == tokenizer.bos_token_id
        assert ids[row, :n + m].tolist() == expected_input + expected_output
        assert mask[row, :n + m].all() and not mask[row, n + m:].any()
        assert labels[row, n:n + m].tolist() == expected_output
        assert (labels[row, :n] == -100).all() and (labels[row, n + m:] == -100).all()
    assert len(tokenizer(ANSWERS[2]).input_ids) > 5 and 2 not in labels[2]  # cut: no eos
    assert 2 in labels[0] and 2 in labels[1]  # "a red circle" and "two" fit: their eos is a label
    model.max_txt_len = 4
    ids, _, _ = model.text_tokens(INSTRUCTIONS, ANSWERS, "cpu")
    assert ids[0, :4].tolist() == tokenizer(INSTRUCTIONS[0]).input_ids[:1] + tokenizer(INSTRUCTIONS[0]).input_ids[-3:]


@pytest.mark.parametrize("instruct", [False, True])
def test_t5_cuts_the_input_as_lavis(tokenizers, instruct):
    """blip2_t5 cuts text_input on the right, blip2_t5_instruct on the left; T5's `</s>` ends both."""
    _, model = pair(tokenizers, "t5", instruct)
    ids = model.lm_tokenizer(INSTRUCTIONS[1], add_special_tokens=False).input_ids
    assert len(ids) > 3
    cut = model.input_tokens(INSTRUCTIONS[1:2], 4).input_ids[0].tolist()
    assert cut == (ids[-3:] if instruct else ids[:3]) + [model.eos_token_id]
    labels, _ = model.target_tokens(ANSWERS, "cpu")
    two = model.lm_tokenizer("two").input_ids  # its `</s>` is a label, padding is not
    assert two[-1] == model.eos_token_id and labels[1].tolist()[:len(two) + 1] == two + [-100]


@pytest.mark.parametrize("kind,instruct", [("opt", False)] + VARIANTS)
def test_lavis_layout_round_trips_through_transformers_keys(tokenizers, kind, instruct):
    if kind == "opt":
        hf = transformers_model("opt", tokenizers["opt"])
        model = Blip2CausalLM(copy.deepcopy(hf.language_model), tokenizers["opt"], **TINY)
    else:
        hf, model = pair(tokenizers, kind, instruct)
        model.vit_source = None  # the image encoder in the state dict
    state, lm_state = model.state_dict(), model.language_model.state_dict()
    converted = to_transformers(state, lm_state)
    assert set(converted) == set(hf.state_dict())
    back, lm_back = from_transformers(converted, model.lm_name)
    # position_ids, a constant, is the one thing transformers' layouts leave out
    assert set(back) == {k for k in state if not k.endswith("position_ids")} and set(lm_back) == set(lm_state)
    for key, value in back.items():
        assert torch.equal(value, state[key]), key
    for key, value in lm_back.items():
        assert torch.equal(value, lm_state[key]), key


@pytest.mark.parametrize("kind,instruct", [("llama", True), ("t5", False)])
def test_export_loads_in_transformers_with_our_logits(tokenizers, tmp_path, kind, instruct):
    _, ours = pair(tokenizers, kind, instruct)
    save_transformers(ours, tmp_path / "export")
    model_class = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    exported = model_class.from_pretrained(tmp_path / "export").eval()
    images = torch.randn(3, 3, 32, 32)
    qformer = qformer_inputs(tokenizers) if instruct else {}
    with torch.no_grad():
        if kind == "t5":
            encoder = ours.lm_tokenizer(INSTRUCTIONS, padding="longest", return_tensors="pt")
            labels, decoder_mask = ours.target_tokens(ANSWERS, "cpu")
            input_ids, attention_mask = lm_inputs(encoder.input_ids, encoder.attention_mask, 4,
                                                  exported.config.image_token_index)
            logits = exported(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask,
                              labels=labels, decoder_attention_mask=decoder_mask, **qformer).logits
            expected = ours.decoder_logits(images, INSTRUCTIONS, labels, decoder_mask)
            torch.testing.assert_close(logits[labels != -100], expected[labels != -100], atol=1e-5, rtol=1e-5)
        else:
            ids, mask, labels = ours.text_tokens(INSTRUCTIONS, ANSWERS, "cpu")
            input_ids, attention_mask = lm_inputs(ids, mask, 4, exported.config.image_token_index)
            logits = exported(pixel_values=images, input_ids=input_ids, attention_mask=attention_mask,
                              **qformer).logits
            torch.testing.assert_close(logits[:, 4:-1][labels[:, 1:] != -100],
                                       ours.text_logits(images, ids, mask, labels, INSTRUCTIONS),
                                       atol=1e-5, rtol=1e-5)
    # The directory reads back (one file or shards) into a fresh model of ours: the same weights.
    exported.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    _, fresh = pair(tokenizers, kind, instruct)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    config, state = read_transformers(str(tmp_path / "sharded"))
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1 and config["num_query_tokens"] == 4
    load_state(fresh, state, str(tmp_path / "sharded"), load_lm=True)
    assert any(k.startswith(f"{fresh.lm_name}_model.") for k in fresh.state_dict())
    for part in (lambda m: m, lambda m: m.visual_encoder, lambda m: m.language_model):
        theirs = part(fresh).state_dict()
        for key, value in part(ours).state_dict().items():
            assert torch.equal(theirs[key], value), key


@pytest.mark.parametrize("kind,instruct,arch", [("t5", False, "blip2_t5"), ("llama", True, "blip2_llm_instruct")])
def test_a_transformers_directory_is_the_config_s_lm_and_checkpoint(tokenizers, tmp_path, kind, instruct, arch):
    """Salesforce/blip2-flan-t5-xl or instructblip-vicuna-7b downloaded: model.lm and model.pretrained name it."""
    _, ours = pair(tokenizers, kind, instruct)
    save_transformers(ours, tmp_path / "hf")
    ours.lm_tokenizer.save_pretrained(tmp_path / "hf")  # the released directories hold their tokenizer
    (tmp_path / "bert").mkdir()
    bert_tokenizer(tmp_path / "bert")
    cfg = Blip2LMConfig(arch=arch, vision="eva_tiny", image_size=32, qformer="tiny", num_query_tokens=4,
                        vit_precision="fp32", lm=str(tmp_path / "hf"), lm_precision="fp32", max_txt_len=64,
                        tokenizer=str(tmp_path / "bert"), pretrained=str(tmp_path / "hf"))
    model, _ = create_model(cfg)
    load_checkpoint(model, cfg.pretrained)
    for part in (lambda m: m, lambda m: m.visual_encoder, lambda m: m.language_model):
        theirs = part(model).state_dict()
        for key, value in part(ours).state_dict().items():
            assert torch.equal(theirs[key], value), key


def test_export_refuses_what_transformers_cannot_hold(tokenizers, tmp_path):
    _, model = pair(tokenizers, "llama", False)
    add_lora(model)
    with pytest.raises(InputError, match="merge_lora"):
        save_transformers(model, tmp_path / "lora")
    model.visual_encoder = ClipViT(image_size=32, patch_size=16, embed_dim=128, depth=1, num_heads=4, mlp_dim=256)
    merge_lora(model)
    with pytest.raises(InputError, match="CLIP ViT-L"):
        save_transformers(model, tmp_path / "clip")
    with pytest.raises(InputError, match="neither model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.json").write_text("{}")
        read_transformers(str(tmp_path / "empty"))


def test_lora_trains_only_the_adapters_and_merges_to_the_same_logits(tokenizers):
    _, model = pair(tokenizers, "llama", True)
    add_lora(model, r=4, lora_alpha=8, lora_dropout=0.1)
    assert model.llm_model.training is False  # add_lora keeps the model's mode
    with torch.no_grad():  # B starts at zero: make the adapters count
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    images = torch.randn(3, 3, 32, 32)
    model(images, INSTRUCTIONS, ANSWERS)["loss"].backward()
    last = f"Qformer.bert.encoder.layer.{len(model.Qformer.bert.encoder.layer) - 1}."
    dead = (last + "intermediate.", last + "output.")  # the instruction's last-layer FFN: nothing reads it
    for name, p in model.named_parameters():
        trainable = "lora_" in name or not name.startswith(("llm_model.", "visual_encoder.", *dead))
        assert p.requires_grad == trainable and (p.grad is not None) == trainable, name
        assert not trainable or p.dtype == torch.float32, name
    state = model.state_dict()
    lm_keys = [k for k in state if k.startswith("llm_model.")]
    assert lm_keys and all("lora_" in k for k in lm_keys) and len(lm_keys) == 8  # 2 layers x q, v x A, B
    _, other = pair(tokenizers, "llama", True)
    add_lora(other, r=4, lora_alpha=8)
    other.load_state_dict(state)  # strict: the frozen LM is not asked for, the adapters are
    _, plain = pair(tokenizers, "llama", True)
    with pytest.raises(InputError, match="unexpected llm_model.*lora_"):
        load_state(plain, {"model": state}, "lora.pth")
    adapters = {k: v.clone() for k, v in other.state_dict().items() if "lora_" in k}
    load_state(other, {"model": plain.state_dict()}, "no_lora.pth")  # the adapters keep what they have
    assert all(torch.equal(other.state_dict()[k], v) for k, v in adapters.items())
    assert torch.equal(other.llm_proj.weight, plain.llm_proj.weight)

    model.eval()
    with torch.no_grad():
        ids, mask, labels = model.text_tokens(INSTRUCTIONS, ANSWERS, "cpu")
        unmerged = model.text_logits(images, ids, mask, labels, INSTRUCTIONS)
        assert not torch.allclose(unmerged, plain.text_logits(images, ids, mask, labels, INSTRUCTIONS))
        merge_lora(model)
        torch.testing.assert_close(model.text_logits(images, ids, mask, labels, INSTRUCTIONS), unmerged,
                                   atol=1e-5, rtol=1e-5)
    assert not any("lora_" in k for k in model.state_dict()) and "llm_model.lm_head.weight" in model.state_dict()


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_frozen_lm_gets_no_gradient_no_optimizer_state_no_checkpoint_entry(tokenizers, kind):
    _, model = pair(tokenizers, kind, False)
    model.train()
    model(torch.randn(2, 3, 32, 32), INSTRUCTIONS[:2], ANSWERS[:2])["loss"].backward()
    lm = f"{model.lm_name}_model."
    for name, p in model.named_parameters():
        trainable = not name.startswith((lm, "visual_encoder."))
        assert p.requires_grad == trainable and (p.grad is not None) == trainable, name
    optimizer = build_optimizer(model, TrainConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    state = model.state_dict()
    assert not any(k.startswith((lm, "visual_encoder.")) for k in state)  # vit_source: loaded from a file
    model.load_state_dict(state)
    with pytest.raises(RuntimeError, match="_proj"):
        model.load_state_dict({k: v for k, v in state.items() if "_proj." not in k})


@pytest.mark.parametrize("lm_dropout", [True, False])
def test_frozen_lm_dropout_follows_lavis_unless_turned_off(tokenizers, lm_dropout):
    for kind in ("opt", "t5"):  # both LMs have dropout 0.1
        tokenizer = tokenizers[kind]
        hf = transformers_model(kind, tokenizer)
        model_class = Blip2T5 if kind == "t5" else Blip2CausalLM
        model = model_class(copy.deepcopy(hf.language_model), tokenizer, lm_dropout=lm_dropout, **TINY).train()
        assert all(m.training == lm_dropout for m in model.language_model.modules())
        assert not model.visual_encoder.training and model.Qformer.training
        model.Qformer.eval()  # only the LM's dropout can change the loss now
        images = torch.randn(2, 3, 32, 32)
        losses = [model(images, INSTRUCTIONS[:2], ANSWERS[:2])["loss"] for _ in range(2)]
        assert (not torch.equal(*losses)) == lm_dropout, kind
        model.eval()
        assert not any(m.training for m in model.language_model.modules())


def test_stage1_and_own_checkpoints_load_and_mismatches_are_explained(tokenizers, tmp_path, capsys):
    bert = tokenizers["bert"]
    stage1 = Blip2Qformer({"bos": len(bert) - 1, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32,
                          qformer="tiny", vocab_size=len(bert), num_query_tokens=4, embed_dim=32, vit_precision="fp32")
    theirs = stage1.state_dict()
    for kind, instruct in [("t5", True), ("llama", False)]:
        _, model = pair(tokenizers, kind, instruct)
        projection = model.language_projection.weight.clone()
        load_state(model, {"model": theirs}, "stage1.pth")
        assert f"stage1.pth is a stage-1 checkpoint: {model.lm_name}_proj keeps" in capsys.readouterr().out
        for key, value in model.state_dict().items():
            if "_proj." not in key:
                assert torch.equal(value, theirs[key]), key
        assert torch.equal(model.language_projection.weight, projection)
        assert any("word_embeddings" in k for k in model.state_dict()) == instruct

    _, model = pair(tokenizers, "t5", True)
    own = {"model": {**model.state_dict(), **{f"visual_encoder.{k}": v
                                              for k, v in model.visual_encoder.state_dict().items()}}}
    _, wrong = pair(tokenizers, "t5", False)
    with pytest.raises(InputError, match="own.pth does not fit.*unexpected Qformer.bert.embeddings"):
        load_state(wrong, own, "own.pth")
    _, wrong = pair(tokenizers, "llama", True)
    with pytest.raises(InputError, match=r"own.pth is a stage-2 checkpoint of another language model \(t5_proj\); "
                                         "this model.arch projects into llm_proj"):
        load_state(wrong, own, "own.pth")
    with pytest.raises(InputError, match="no_proj.pth does not fit.*missing t5_proj.weight"):
        load_state(model, {"model": {k: v for k, v in own["model"].items() if "_proj." not in k}}, "no_proj.pth")
    hf = transformers_model("t5", tokenizers["t5"], len(bert))
    fresh = Blip2T5(copy.deepcopy(hf.language_model), tokenizers["t5"], qformer_tokenizer=bert, **TINY)
    with pytest.raises(InputError, match="trimmed.pth holds no image-encoder weights"):
        load_state(fresh, {"model": model.state_dict()}, "trimmed.pth")
    load_state(fresh, own, "own.pth")
    assert fresh.vit_source == "own.pth"
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key


def test_loaders_set_precision_and_lavis_activation(tokenizers, tmp_path):
    tokenizer = tokenizers["t5"]
    transformers_model("t5", tokenizer).language_model.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    config = text_config("t5", tokenizer)
    assert config.dense_act_fn == "gelu"
    config.dense_act_fn = "gelu_new"  # as the hub's Flan-T5
    config.save_pretrained(tmp_path / "t5")
    t5, loaded_tokenizer = load_t5(str(tmp_path / "t5"))
    assert t5.dtype == torch.bfloat16 and t5.config.dense_act_fn == "gelu" and len(loaded_tokenizer) == len(tokenizer)
    assert load_t5(str(tmp_path / "t5"), "fp32", dense_act_fn=None)[0].config.dense_act_fn == "gelu_new"
    with pytest.raises(InputError, match=r"model.lm .*missing: directory .* does not exist"):
        load_causal_lm(str(tmp_path / "missing"))  # a path: no hub call


def test_bf16_t5_trains_fp32_weights_with_an_fp32_loss(tokenizers):
    tokenizer = tokenizers["t5"]
    hf = transformers_model("t5", tokenizer)
    model = Blip2T5(copy.deepcopy(hf.language_model).to(torch.bfloat16), tokenizer, **{**TINY, "vit_precision": "bf16"})
    loss = model.train()(torch.randn(2, 3, 32, 32), INSTRUCTIONS[:2], ANSWERS[:2])["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert model.t5_proj.weight.grad.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("lm,instruct", [("opt", False), ("t5", False), ("t5", True), ("llama", True)])
def test_two_processes_give_the_loss_and_gradients_of_one(tmp_path, lm, instruct):
    TOKENIZERS[lm]().save_pretrained(tmp_path / "tokenizer")
    options = ["--lm", lm, "--tokenizer", tmp_path / "tokenizer"] + (["--instruct"] if instruct else [])
    run_script("tests/stage2_ddp.py", "--out", tmp_path / "one.pt", *options)
    run_script(*TORCHRUN, "tests/stage2_ddp.py", "--out", tmp_path / "two.pt", *options)
    one, two = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))
    torch.testing.assert_close(two["loss"], one["loss"], atol=1e-6, rtol=1e-6)
    assert one["grads"].keys() == two["grads"].keys() and not any("_model." in k for k in one["grads"])
    assert any(k.startswith("Qformer.bert.embeddings.word_embeddings") for k in one["grads"]) == instruct
    # InstructBLIP: the last layer's text FFN feeds no query output (only queries are projected): no gradient
    unused = re.compile(r"Qformer\.bert\.encoder\.layer\.3\.(intermediate|output)\.")
    for name, grad in one["grads"].items():
        assert grad is not None and (grad.abs().sum() > 0) != bool(unused.match(name)), name
        torch.testing.assert_close(two["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)
