import json
from pathlib import Path

import pytest

from build_vocab import SPECIAL_TOKENS, build_wordpiece_vocab, read_texts
from data.nlvr import swap_left_right
from data.utils import pre_caption
from models.tokenizer import init_tokenizer
from tests.conftest import run_script
from utils import InputError

DEMO_FILES = ("coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json", "nlvr_train.json",
              "nlvr_dev.json", "nlvr_test.json")


def demo_texts(demo_data):
    """Every text the demo trains and evaluates on, read from the files here, cleaned as the datasets clean them."""
    texts = []
    for name in DEMO_FILES:
        for entry in json.loads((demo_data / name).read_text()):
            if "sentence" in entry:
                texts += [pre_caption(entry["sentence"], 40), swap_left_right(pre_caption(entry["sentence"], 40))]
            else:
                captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
                texts += [pre_caption(caption, 50) for caption in captions]
    return texts


@pytest.fixture(scope="module")
def demo_vocab(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    result = run_script("build_vocab.py", "--ann_files", *(demo_data / name for name in DEMO_FILES),
                        "--output_dir", out)
    assert f"wrote {out / 'vocab.txt'}" in result.stdout and "[UNK] in 0.00%" in result.stdout
    return out


def test_the_demo_texts_have_no_unknown_token(demo_data, demo_vocab):
    tokenizer = init_tokenizer(str(demo_vocab))
    texts = demo_texts(demo_data)
    assert len(texts) == 2 * 2 * (16 + 5 + 5) + 2 * 24 + 5 * 8 * 2
    for text in texts:
        tokens = tokenizer.tokenize(text)
        assert tokens and tokenizer.unk_token not in tokens, text
    words = {word for text in texts for word in text.replace(",", " ").split()}
    assert words <= set(tokenizer.vocab)  # every demo word occurs at least twice: each is one token


def test_layout_bert_specials_first_then_dec_and_enc(demo_vocab):
    lines = (demo_vocab / "vocab.txt").read_text().splitlines()
    assert lines[:5] == SPECIAL_TOKENS == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(set(lines)) == len(lines)
    tokenizer = init_tokenizer(str(demo_vocab))
    ids = tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
    assert ids == (0, 1, 2, 3)
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(lines), len(lines) + 1]


def test_the_same_files_give_the_same_vocabulary(demo_data, demo_vocab, tmp_path):
    # another process: the trainer's own order depends on a per-process hash seed
    run_script("build_vocab.py", "--ann_files", *(demo_data / name for name in DEMO_FILES), "--output_dir", tmp_path)
    assert (tmp_path / "vocab.txt").read_bytes() == (demo_vocab / "vocab.txt").read_bytes()


def test_size_and_frequency_limits(tmp_path):
    texts = ["a zebra grazes", "a lion sleeps", "a lion roars", "the lion is tired"] * 3 + ["an okapi"]
    def build(name, **kwargs):
        return Path(build_wordpiece_vocab(texts, str(tmp_path / name), **kwargs)).read_text().splitlines()

    lines = build("f2", min_frequency=2)
    assert "lion" in lines and "zebra" in lines and "okapi" not in lines
    assert "okapi" in build("f1", min_frequency=1)
    assert len(build("small", vocab_size=len(lines) - 3)) == len(lines) - 3
    tokenizer = init_tokenizer(str(tmp_path / "small"))
    assert all(tokenizer.unk_token not in tokenizer.tokenize(text) for text in texts)


def test_nlvr_sentences_come_as_training_sees_them(tmp_path):
    nlvr = tmp_path / "nlvr.json"
    nlvr.write_text(json.dumps([{"images": ["a", "b"], "sentence": "The LEFT image: two dogs.", "label": "True"}]))
    assert read_texts(str(nlvr)) == ["the left image two dogs", "the right image two dogs"]


def test_jsonl_and_bad_entries(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"image": "0.jpg", "caption": "A Dog!"}\n\n{"image": "0.jpg", "caption": "x"}\n'
                     '{"image": "0.jpg", "label": "True"}\n')
    with pytest.raises(InputError, match=r"train.jsonl line 4: expected an object with 'caption' .* or 'sentence'"):
        read_texts(str(jsonl))
    jsonl.write_text('{"image": "0.jpg", "caption": "A Dog!"}\n')
    assert read_texts(str(jsonl)) == ["a dog"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "0.jpg", "caption": ["ok", 3]}]))
    result = run_script("build_vocab.py", "--ann_files", bad, "--output_dir", tmp_path / "out", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {bad}[0]: expected an object with 'caption' (a string or a list of "
                                     f"strings) or 'sentence' (a string); got {{'image': '0.jpg', 'caption': ['ok', "
                                     f"3]}}. Pass caption, Karpathy or NLVR files")
    result = run_script("build_vocab.py", "--ann_files", tmp_path / "none.json", "--output_dir", tmp_path / "out",
                        check=False)
    assert result.returncode == 2 and result.stderr.strip() == f"error: annotation file {tmp_path / 'none.json'} " \
                                                               "does not exist"
