import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, OPTForCausalLM

from data.utils import pre_caption
from tests.conftest import run_script
from train_demo_lm import build_demo_tokenizer, evaluate_loss, packed_batches, read_captions
from utils import InputError


def all_captions(data_dir):
    """Every caption string of the three Karpathy caption files, as written."""
    texts = []
    for split in ("train", "val", "test"):
        for entry in json.loads((data_dir / f"coco_karpathy_{split}.json").read_text()):
            texts += [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
    return texts


@pytest.fixture(scope="module")
def tokenizer(demo_data):
    return build_demo_tokenizer(read_captions(demo_data / "coco_karpathy_train.json"))


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


def train(data_dir, out, seed=0):
    run_script("train_demo_lm.py", "--data_dir", data_dir, "--output_dir", out, "--steps", "30", "--batch_size", "16",
               "--warmup_steps", "5", "--print_freq", "10", "--seed", seed, "--device", "cpu")
    return json.loads((out / "train_lm_log.json").read_text())


@pytest.fixture(scope="module")
def trained(demo_data, tmp_path_factory):
    """Two 30-step runs with the same seed: [(output_dir, train_lm_log.json)] * 2."""
    outs = [tmp_path_factory.mktemp("opt_demo") for _ in range(2)]
    return [(out, train(demo_data, out)) for out in outs]


def test_training_writes_an_opt_directory_whose_loss_went_down(trained, demo_data):
    out, stats = trained[0]
    assert stats["steps"] == 30
    assert stats["final_train_loss"] < stats["initial_train_loss"] - 1.0
    model = OPTForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (1, 2, 2)
    # The reloaded directory is the model that was evaluated.
    val_loss = evaluate_loss(model, tokenizer, read_captions(demo_data / "coco_karpathy_val.json"), 16, "cpu")
    assert val_loss == pytest.approx(stats["val_loss"], rel=1e-5)
    newline = tokenizer("\n", add_special_tokens=False).input_ids[0]
    generated = model.generate(torch.tensor([[2]]), max_new_tokens=5, eos_token_id=newline, pad_token_id=1)
    assert generated.shape[1] > 1


def test_same_seed_gives_identical_weights(trained):
    (out_a, stats_a), (out_b, stats_b) = trained
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


def test_captions_of_the_wrong_type_are_rejected(tmp_path):
    path = tmp_path / "coco_karpathy_val.json"
    path.write_text(json.dumps([{"image": "a.png", "caption": ["a red circle"]}, {"image": "b.png"}]))
    with pytest.raises(InputError, match="coco_karpathy_val.json: entry 1 has no \"caption\""):
        read_captions(path)


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
