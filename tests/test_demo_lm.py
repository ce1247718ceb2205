import json
import math
from argparse import Namespace
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, LlamaTokenizer, OPTForCausalLM, T5ForConditionalGeneration

from data.utils import pre_caption
from data.vqa import pre_question
from models.blip2_lm import Blip2CausalLM, Blip2T5, load_causal_lm, load_t5
from tests.conftest import run_script
from train_demo_lm import (TOKENIZERS, build_demo_tokenizer, evaluate_loss, packed_batches, parse_args,
                           prefix_lm_batches, read_captions, read_texts, train_batches)
from utils import InputError

TINY_STAGE2 = dict(vision="eva_tiny", image_size=32, qformer="tiny", num_query_tokens=4, vit_precision="fp32")


def all_captions(data_dir):
    """Every caption string of the three Karpathy caption files, as written."""
    texts = []
    for split in ("train", "val", "test"):
        for entry in json.loads((data_dir / f"coco_karpathy_{split}.json").read_text()):
            texts += [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
    return texts


def vqa_texts(data_dir, split):
    """`Question: ... Short answer: ...` of the VQA split, read from the raw files: the answer is the one most of
    the ten annotators wrote (the first written among equals)."""
    questions = json.loads((data_dir / f"vqa_{split}_questions.json").read_text())["questions"]
    annotations = json.loads((data_dir / f"vqa_{split}_annotations.json").read_text())["annotations"]
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    return [f"Question: {pre_question(q['question'])} Short answer: "
            f"{max(answers[q['question_id']], key=answers[q['question_id']].count)}" for q in questions]


def demo_texts(data_dir):
    """The demo's texts: captions as written and cleaned, VQA questions of the three splits as written and in the
    prompt, the rendered VQA texts, and every human answer (VQA fine-tuning draws its targets from them all)."""
    texts = all_captions(data_dir)
    texts += [pre_caption(c, 50) for c in texts]
    for split in ("train", "val", "test"):
        questions = json.loads((data_dir / f"vqa_{split}_questions.json").read_text())["questions"]
        texts += [q["question"] for q in questions]
        texts += [f"Question: {pre_question(q['question'])} Short answer:" for q in questions]
    for split in ("train", "val"):
        texts += vqa_texts(data_dir, split)
        texts += [a["answer"] for annotation in json.loads((data_dir / f"vqa_{split}_annotations.json").read_text())
                  ["annotations"] for a in annotation["answers"]]
    return texts


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return build_demo_tokenizer(read_captions(demo_data / "coco_karpathy_train.json"))


@pytest.fixture(scope="module")
def tokenizers(demo_data, tmp_path_factory):
    """{arch: (tokenizer of the demo train texts, another build saved and reloaded with AutoTokenizer)}: the two
    agree only if building is deterministic and saving keeps everything."""
    texts = read_texts(demo_data, "train", "captions+vqa")
    built = {}
    for arch, build in TOKENIZERS.items():
        out = tmp_path_factory.mktemp(f"{arch}_tokenizer")
        build(texts).save_pretrained(out)
        built[arch] = build(texts), AutoTokenizer.from_pretrained(out)
    return built


def test_tokenizer_follows_opt_conventions(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
        ("</s>", "</s>", "<pad>", "<unk>")
    assert tokenizer.padding_side == "right"
    bare = tokenizer("a red circle", add_special_tokens=False).input_ids
    assert tokenizer("a red circle").input_ids == [2, *bare]
    assert len(tokenizer("\n", add_special_tokens=False).input_ids) == 1
    batch = tokenizer(["a red circle\n", "a"], padding=True).input_ids
    assert batch[1] == [2, *tokenizer("a", add_special_tokens=False).input_ids] + [1] * (len(batch[0]) - 2)


def test_tokenizer_round_trips_any_text_and_keeps_caption_words_whole(tokenizer, demo_data):
    captions = all_captions(demo_data)
    cleaned = [pre_caption(c, 50) + "\n" for c in captions]
    for text in captions + cleaned + ["Ünïcode ☃ 42\t(x)\n\n"]:
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    pre_tokenize = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str
    for text in cleaned:  # one token per word, punctuation mark and "\n"
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == len(pre_tokenize(text))


def test_tokenizer_reloads_with_auto_tokenizer(tokenizer, demo_data, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = all_captions(demo_data) + ["\n"]
    assert reloaded(texts, padding=True).input_ids == tokenizer(texts, padding=True).input_ids
    assert reloaded(texts, add_special_tokens=False).input_ids == tokenizer(texts, add_special_tokens=False).input_ids
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id, reloaded.padding_side) == \
        (2, 2, 1, "right")


def test_llama_tokenizer_keeps_llama_conventions_after_reloading(tokenizers, demo_data):
    built, reloaded = tokenizers["llama"]
    assert isinstance(reloaded, LlamaTokenizer)
    assert reloaded.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]) == [0, 1, 2, 3, 258]
    assert (reloaded.unk_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.pad_token is None and reloaded.pad_token_id is None
    bare = reloaded("a red circle", add_special_tokens=False).input_ids
    assert reloaded.convert_ids_to_tokens(bare) == ["▁a", "▁red", "▁circle"]
    assert reloaded("a red circle").input_ids == [1, *bare]  # `<s>` prepended, nothing appended
    assert reloaded("a red circle</s>").input_ids == [1, *bare, 2]  # Blip2CausalLM's end of a text_output
    # Byte fallback: characters no text had are their UTF-8 bytes.
    assert reloaded.convert_ids_to_tokens(reloaded("☃", add_special_tokens=False).input_ids)[-3:] == \
        ["<0xE2>", "<0x98>", "<0x83>"]
    texts = demo_texts(demo_data)
    assert reloaded(texts).input_ids == built(texts).input_ids


def test_t5_tokenizer_keeps_t5_conventions_after_reloading(tokenizers, demo_data):
    built, reloaded = tokenizers["t5"]
    assert type(reloaded).__name__ == "T5Tokenizer"
    assert reloaded.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.unk_token_id) == (0, 1, 2)
    assert reloaded.bos_token is None and reloaded.padding_side == "right"
    assert not [t for t in reloaded.get_vocab() if t.startswith("<extra_id_")]
    bare = reloaded("a red circle", add_special_tokens=False).input_ids
    assert reloaded.decode(bare) == "a red circle"
    assert reloaded("a red circle").input_ids == [*bare, 1]  # nothing prepended, `</s>` appended
    batch, single = reloaded(["a red circle", "a"], padding=True).input_ids, reloaded("a").input_ids
    assert batch[1] == single + [0] * (len(batch[0]) - len(single))  # padded on the right with `<pad>`
    ascii_text = "".join(chr(c) for c in range(33, 127))  # any ASCII text encodes, as with T5's own vocabulary
    assert reloaded.unk_token_id not in reloaded(ascii_text).input_ids
    assert reloaded.decode(reloaded(ascii_text).input_ids, skip_special_tokens=True) == ascii_text
    texts = demo_texts(demo_data)
    assert reloaded(texts).input_ids == built(texts).input_ids


@pytest.mark.parametrize("arch", ["opt", "llama", "t5"])
def test_every_demo_text_round_trips_without_unknown_tokens(tokenizers, demo_data, arch):
    _, tokenizer = tokenizers[arch]
    for text in demo_texts(demo_data):
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_tokenizers_keep_most_demo_words_whole(tokenizers, demo_data, arch):
    """Short sequences: Blip2T5 cuts T5's input at 32 tokens, and every `Question: ... Short answer:` must fit."""
    _, tokenizer = tokenizers[arch]
    texts = read_texts(demo_data, "train", "captions+vqa")
    words = sum(len(text.split()) for text in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids)
    assert tokens < 1.2 * words
    prompts = [text[:text.index(" Short answer:")] + " Short answer:" for text in texts if text.startswith("Question:")]
    assert max(len(ids) for ids in tokenizer(prompts).input_ids) <= 24


def test_texts_are_the_cleaned_captions_and_a_fifth_of_vqa_prompts_with_the_most_common_answer(demo_data):
    for split in ("train", "val"):
        captions = [pre_caption(c, 50) for entry in json.loads((demo_data / f"coco_karpathy_{split}.json").read_text())
                    for c in ([entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"])]
        assert read_texts(demo_data, split, "captions") == captions
        texts = read_texts(demo_data, split, "captions+vqa")
        assert texts[:len(captions)] == captions
        questions = texts[len(captions):]
        assert set(questions) <= set(vqa_texts(demo_data, split))
        assert len(questions) / len(texts) == pytest.approx(0.2, abs=0.03)


TINY = ("--hidden_size", "32", "--num_layers", "2", "--num_heads", "2", "--ffn_dim", "64", "--max_positions", "64",
        "--lr", "1e-2")


def train(data_dir, out, arch="opt", seed=0):
    sizes = ("--steps", "30", "--batch_size", "16") if arch == "opt" else (*TINY, "--steps", "40", "--batch_size", "8")
    run_script("train_demo_lm.py", "--arch", arch, "--data_dir", data_dir, "--output_dir", out, "--warmup_steps", "5",
               "--print_freq", "10", "--seed", seed, "--device", "cpu", *sizes)
    return json.loads((out / "train_lm_log.json").read_text())


@pytest.fixture(scope="module", params=["opt", "llama", "t5"])
def trained(request, demo_data, tmp_path_factory):
    """(arch, [(output_dir, train_lm_log.json)] of two runs with the same seed); opt at the default sizes for 30
    steps, llama and t5 tiny for 40."""
    outs = [tmp_path_factory.mktemp(f"{request.param}_demo") for _ in range(2)]
    return request.param, [(out, train(demo_data, out, request.param)) for out in outs]


def test_training_writes_a_directory_whose_loss_went_down(trained, demo_data):
    arch, [(out, stats), _] = trained
    assert stats["steps"] == (30 if arch == "opt" else 40)
    assert stats["final_train_loss"] < stats["initial_train_loss"] - 1.0
    assert (out / "model.safetensors").is_file()
    model_class = {"opt": OPTForCausalLM, "llama": LlamaForCausalLM, "t5": T5ForConditionalGeneration}[arch]
    model, tokenizer = (load_t5 if arch == "t5" else load_causal_lm)(str(out), "fp32")
    assert type(model) is model_class
    assert model.config.vocab_size == len(tokenizer)
    assert stats["val_loss"] < math.log(len(tokenizer))  # better than a uniform guess
    # The reloaded directory is the model that was evaluated.
    texts = read_texts(demo_data, "val", "captions+vqa")
    assert evaluate_loss(model, tokenizer, texts, 16) == pytest.approx(stats["val_loss"], rel=1e-5)


# The special ids the real models' configs hold; T5's FFN as LAVIS runs Flan-T5 (exact GELU), its output unscaled.
CONFIGS = {"opt": dict(pad_token_id=1, bos_token_id=2, eos_token_id=2),
           "llama": dict(bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False),
           "t5": dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                      dense_act_fn="gelu", scale_decoder_outputs=False)}


def test_saved_config_keeps_the_conventions_and_stage2_trains_and_generates_on_it(trained):
    arch, [(out, _), _] = trained
    config = json.loads((out / "config.json").read_text())
    assert {key: config.get(key) for key in CONFIGS[arch]} == CONFIGS[arch]
    lm, tokenizer = load_t5(str(out), "fp32", dense_act_fn=None) if arch == "t5" else load_causal_lm(str(out), "fp32")
    torch.manual_seed(0)
    model = (Blip2T5 if arch == "t5" else Blip2CausalLM)(lm, tokenizer, **TINY_STAGE2)
    images = torch.randn(2, 3, 32, 32)
    loss = model(images, ["", "Question: how many shapes are there? Short answer:"],
                 ["a red circle at the top left", "2"])["loss"]
    assert torch.isfinite(loss) and loss > 0
    captions = model.eval().caption(images, num_beams=2, max_new_tokens=5, min_new_tokens=1)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


def test_same_seed_gives_identical_tokenizer_and_weights(trained):
    _, [(out_a, stats_a), (out_b, stats_b)] = trained
    assert (out_a / "tokenizer.json").read_text() == (out_b / "tokenizer.json").read_text()
    weights_a, weights_b = load_file(out_a / "model.safetensors"), load_file(out_b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert stats_a["val_loss"] == stats_b["val_loss"]


def test_missing_captions_name_the_file_and_the_fix(tmp_path):
    result = run_script("train_demo_lm.py", "--data_dir", tmp_path, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2
    assert f"{tmp_path}/coco_karpathy_train.json does not exist" in result.stderr
    assert f"run python -m data.synthetic --output_dir {tmp_path} first" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_vqa_files_name_the_file_and_the_fix(demo_data, tmp_path):
    for name in ("coco_karpathy_train.json", "coco_karpathy_val.json", "vqa_train_questions.json"):
        (tmp_path / name).write_text((demo_data / name).read_text())
    result = run_script("train_demo_lm.py", "--arch", "t5", "--data_dir", tmp_path, "--output_dir", tmp_path / "out",
                        check=False)
    assert result.returncode == 2
    assert f"error: {tmp_path}/vqa_train_annotations.json does not exist; run python -m data.synthetic" in \
        result.stderr
    assert not (tmp_path / "out").exists()


def test_captions_of_the_wrong_type_or_empty_are_rejected(tmp_path):
    path = tmp_path / "coco_karpathy_val.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": ["a red circle"]}, {"image": "b.png"}]))
    with pytest.raises(InputError, match="coco_karpathy_val.json: entry 1 has no \"caption\""):
        read_captions(path)
    path.write_text(json.dumps([{"image": "a.png", "caption": "a red circle"}, {"image": "b.png", "caption": "(.)"}]))
    with pytest.raises(InputError, match="coco_karpathy_val.json: entry 1 has a caption that is empty after"):
        read_captions(path)


@pytest.mark.parametrize("arch", ["opt", "llama", "t5"])
def test_heads_must_divide_the_width(arch):
    with pytest.raises(InputError, match="--hidden_size 30 must be a multiple of --num_heads 4"):
        parse_args(["--arch", arch, "--output_dir", "out", "--hidden_size", "30", "--num_heads", "4"])


def test_packed_batches_fill_every_position_with_whole_epochs_of_captions():
    captions = [[2, 10 + i] + [50] * i + [7] for i in range(9)]  # lengths 3..11
    batches = list(packed_batches(captions, rows=3, block=8, steps=6, seed=0))
    assert all(b.shape == (3, 8) for b in batches)
    stream = torch.cat([b.flatten() for b in batches]).tolist()
    epoch_length = sum(map(len, captions))
    for start in (0, epoch_length):  # each epoch holds every caption exactly once, whole and in some order
        epoch = stream[start:start + epoch_length]
        firsts = [epoch[i + 1] for i, token in enumerate(epoch[:-1]) if token == 2]
        assert sorted(firsts) == [10 + i for i in range(9)]


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_causal_batches_are_the_texts_from_bos_to_their_end(tokenizers, demo_data, arch):
    """OPT: `</s>` text "\\n"; LLaMA: `<s>` text `</s>`, as Blip2CausalLM ends every text_output."""
    tokenizer, _ = tokenizers[arch]
    texts = read_texts(demo_data, "train", "captions+vqa")
    bos, end = (2, tokenizer("\n", add_special_tokens=False).input_ids[0]) if arch == "opt" else (1, 2)
    epoch_length = sum(len(tokenizer(t).input_ids) + 1 for t in texts)
    args = Namespace(batch_size=2, max_positions=32, steps=epoch_length // 64, seed=0)
    batches = list(train_batches(arch, tokenizer, texts, args))
    assert all(torch.equal(b["input_ids"], b["labels"]) and b["input_ids"].shape == (2, 32) for b in batches)
    stream = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    starts = [i for i, token in enumerate(stream) if token == bos]
    pieces = [stream[a:b] for a, b in zip(starts, starts[1:])]
    assert stream[0] == bos and all(piece[-1] == end and end not in piece[:-1] for piece in pieces)
    decoded = [tokenizer.decode(piece, skip_special_tokens=True).strip() for piece in pieces]
    assert Counter(decoded) <= Counter(texts) and len(decoded) > 0.9 * len(texts)  # one epoch, nearly whole


def test_t5_batches_are_a_prefix_lm_split_of_the_texts(tokenizers, demo_data):
    tokenizer, _ = tokenizers["t5"]
    texts = read_texts(demo_data, "train", "captions+vqa")[:60]
    rows = []
    for batch in prefix_lm_batches(tokenizer, texts, rows=6, steps=20, seed=0):  # two epochs
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            ids, labels = ids[mask.bool()].tolist(), labels[labels != -100].tolist()
            assert ids[-1] == 1 and labels[-1] == 1 and 1 not in ids[:-1] + labels[:-1]  # `</s>` ends both
            rows.append((tokenizer.decode(ids, skip_special_tokens=True),
                         tokenizer.decode(labels, skip_special_tokens=True)))
    assert all(target for _, target in rows)
    joined = [(prefix + " " + target).strip() for prefix, target in rows]
    for epoch in (joined[:60], joined[60:]):  # every text once an epoch, its words split between the two parts
        assert sorted(epoch) == sorted(texts)
    cuts = Counter(len(prefix.split()) for prefix, _ in rows)
    assert cuts[0] > 0 and len(cuts) >= 5  # empty prefixes, and cuts all over the texts
    assert len(set(rows)) > len(set(joined))  # a text is split anew every epoch
