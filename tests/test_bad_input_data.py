"""Bad input fails clearly: image files (start-up check, sharded over processes, and at loading), empty texts,
words the tokenizer does not know, tokenizer paths that do not exist."""

import json
import os
import socket
import time
from collections import Counter

import huggingface_hub
import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

import data.utils
from data.caption import CaptionDataset, CaptionSource, RetrievalDataset
from data.nlvr import NLVRDataset
from data.transforms import eval_transform
from data.utils import check_image_files, find_bad_images
from models import tokenizer as tokenizer_module
from models.tokenizer import (check_unknown_tokens, init_tokenizer, is_local_path, local_dir_or_hub_id,
                              unknown_token_stats)
from tests.conftest import nlvr_config, run_script
from train_demo_lm import build_demo_tokenizer
from utils import InputError


def jpeg(path, seed=0):
    """A real 32 x 32 JPEG of noise (noise keeps the compressed data long enough to cut)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def truncate(path):
    """Cut the file to half its bytes: the header stays intact, the image data end early."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])


def write(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def bad_files(root):
    """Good 0.jpg..3.jpg and one file of each kind of bad: {name: what the check must say}."""
    for i in range(4):
        jpeg(root / f"{i}.jpg", i)
    truncate(jpeg(root / "truncated.jpg", 9))
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("not an image")
    (root / "folder.jpg").mkdir()
    return {"truncated.jpg": "truncated: image file is truncated", "zero.jpg": "zero bytes",
            "text.jpg": "unreadable: not an image format", "folder.jpg": "a directory", "gone.jpg": "missing"}


# --- the start-up image check ------------------------------------------------------------------------------------

NLVR_ENTRIES = [{"images": ["0.jpg", "1.jpg"], "sentence": "kept", "label": "True"},
                {"images": ["zero.jpg", "truncated.jpg"], "sentence": "two bad", "label": "False"},
                {"images": ["text.jpg", "2.jpg"], "sentence": "not an image", "label": "True"},
                {"images": ["3.jpg", "gone.jpg"], "sentence": "missing", "label": "True"},
                {"images": ["folder.jpg", "0.jpg"], "sentence": "a folder", "label": "False"}]


def test_every_bad_image_is_reported_with_its_reason(tmp_path, capsys):
    expected = bad_files(tmp_path)
    ann = write(tmp_path / "nlvr.json", NLVR_ENTRIES)
    with pytest.raises(InputError) as err:
        NLVRDataset(ann, str(tmp_path), eval_transform(32))
    message, out = str(err.value), capsys.readouterr().out
    assert message.startswith(f"{ann}: 5 of 9 images are missing or unreadable under image_root {tmp_path}")
    assert "data.skip_missing_images: true" in message
    for name, reason in expected.items():
        assert f"{tmp_path / name} ({reason}" in message
        assert f"bad image: {tmp_path / name}: {reason}" in out
    assert not any(f"{i}.jpg:" in out for i in range(4))

    dataset = NLVRDataset(ann, str(tmp_path), eval_transform(32), skip_missing_images=True)
    assert [entry["sentence"] for entry in dataset.entries] == ["kept"]
    assert "skipping 4 of 5 examples" in capsys.readouterr().out


def test_header_check_passes_truncation_which_loading_then_names(tmp_path):
    expected = bad_files(tmp_path)
    entries = [{"image": name, "caption": "c"} for name in ("0.jpg", "truncated.jpg")]
    ann = write(tmp_path / "train.json", entries)
    dataset = CaptionDataset([CaptionSource(ann, str(tmp_path))], eval_transform(32), image_check="header")
    assert dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(InputError) as err:
        dataset[1]
    assert f"image {tmp_path / 'truncated.jpg'} (dataset item 1 of {ann})" in str(err.value)
    assert expected["truncated.jpg"] in str(err.value)
    assert find_bad_images([str(tmp_path / "truncated.jpg")], decode=False) == {}
    with pytest.raises(InputError, match="image_check must be one of decode, header; got 'full'"):
        check_image_files(entries, lambda e: [e["image"]], ann, ".", False, image_check="full")


def test_large_sets_log_one_summary_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data.utils, "SUMMARY_FROM", 3)
    bad_files(tmp_path)
    paths = [str(tmp_path / f"{i}.jpg") for i in range(4)]
    assert check_image_files(paths, lambda p: [p], "set.json", str(tmp_path), False) == paths
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("set.json: checked 4 image files (decoded, 1 processes) in ")
    assert lines[0].endswith(": 0 bad")


def _check_on_rank(rank, world_size, init_file, root, out):
    """One process of the sharded check: records the paths it decoded and what it found."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    checked, problem = [], data.utils.image_problem
    data.utils.image_problem = lambda path, decode=True: checked.append(path) or problem(path, decode)
    entries = [{"images": [os.path.join(root, p) for p in e["images"]]} for e in NLVR_ENTRIES]
    kept = check_image_files(entries, lambda e: e["images"], "nlvr.json", root, skip_missing=True)
    paths = sorted({p for e in entries for p in e["images"]})
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump({"checked": checked, "bad": find_bad_images(paths), "kept": kept}, f)
    dist.destroy_process_group()


def test_processes_check_disjoint_shards_and_agree(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    bad_files(root)
    mp.spawn(_check_on_rank, args=(2, str(tmp_path / "init"), str(root), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    paths = sorted({str(root / p) for e in NLVR_ENTRIES for p in e["images"]})
    single = find_bad_images(paths)
    assert len(single) == 5
    for result in ranks:
        assert result["bad"] == single and list(result["bad"]) == list(single)
        assert result["kept"] == [{"images": [str(root / "0.jpg"), str(root / "1.jpg")]}]
    first_check = [set(result["checked"][:len(result["checked"]) // 2]) for result in ranks]
    assert not first_check[0] & first_check[1] and first_check[0] | first_check[1] == set(paths)


# --- images that break after the check -----------------------------------------------------------------------------

def test_a_file_broken_after_the_check_names_file_item_and_annotation(tmp_path):
    for name in ("a_1.jpg", "a_2.jpg"):
        jpeg(tmp_path / name)
    caption = write(tmp_path / "train.json", [{"image": f"a_{i}.jpg", "caption": "x"} for i in (1, 2)])
    karpathy = write(tmp_path / "test.json", [{"image": f"a_{i}.jpg", "caption": ["x"]} for i in (1, 2)])
    nlvr = write(tmp_path / "nlvr.json", [{"images": ["a_1.jpg", "a_1.jpg"], "sentence": "s", "label": "True"},
                                          {"images": ["a_1.jpg", "a_2.jpg"], "sentence": "s", "label": "True"}])
    transform = eval_transform(32)
    datasets = {caption: CaptionDataset([CaptionSource(caption, str(tmp_path))], transform),
                karpathy: RetrievalDataset(karpathy, str(tmp_path), transform),
                nlvr: NLVRDataset(nlvr, str(tmp_path), transform)}
    truncate(tmp_path / "a_2.jpg")
    for ann, dataset in datasets.items():
        assert dataset[0][0].shape == (3, 32, 32)
        with pytest.raises(InputError) as err:
            dataset[1]
        message = str(err.value)
        assert f"image {tmp_path / 'a_2.jpg'} (dataset item 1 of {ann}) cannot be loaded: truncated" in message
        assert "restore or replace the file" in message and "--resume" in message
    (tmp_path / "a_2.jpg").unlink()
    with pytest.raises(InputError, match=r"a_2.jpg \(dataset item 1 of .*\) cannot be loaded: missing"):
        next(iter(DataLoader(datasets[nlvr], batch_size=2, num_workers=1)))


# --- empty texts ---------------------------------------------------------------------------------------------------

def test_empty_captions_fail_with_their_places_or_are_skipped(tmp_path, capsys):
    jpeg(tmp_path / "0.jpg")
    entries = [{"image": "0.jpg", "caption": c} for c in ("a dog", "... !!", "", "a cat", " ; ")]
    ann = write(tmp_path / "train.json", entries)
    with pytest.raises(InputError) as err:
        CaptionDataset([CaptionSource(ann, str(tmp_path))], None)
    message = str(err.value)
    assert f"{ann}: 3 of 5 entries have a caption that is empty after cleaning" in message
    assert f"e.g. {ann}[1], {ann}[2], {ann}[4]" in message and "data.skip_empty_text: true" in message

    dataset = CaptionDataset([CaptionSource(ann, str(tmp_path))], None, skip_empty_text=True)
    assert [e["caption"] for e in dataset.entries] == ["a dog", "a cat"]
    out = capsys.readouterr().out.splitlines()
    assert out == [f"warning: {ann}: skipping 3 of 5 entries whose caption is empty after cleaning, e.g. {ann}[1], "
                   f"{ann}[2], {ann}[4]"]

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text('{"image": "0.jpg", "caption": "ok"}\n\n{"image": "0.jpg", "caption": "!"}\n')
    with pytest.raises(InputError, match=r"1 of 2 entries .* e.g. .*train.jsonl line 3\."):
        CaptionDataset([CaptionSource(str(jsonl), str(tmp_path))], None)


def test_empty_sentences_fail_or_are_skipped(tmp_path, capsys):
    jpeg(tmp_path / "0.jpg")
    entries = [{"images": ["0.jpg", "0.jpg"], "sentence": s, "label": "True"} for s in ("left", "...", "right")]
    ann = write(tmp_path / "nlvr.json", entries)
    with pytest.raises(InputError, match=r"1 of 3 entries have a sentence that is empty .* e.g. .*nlvr.json\[1\]"):
        NLVRDataset(ann, str(tmp_path), None)
    dataset = NLVRDataset(ann, str(tmp_path), None, skip_empty_text=True)
    assert [e["sentence"] for e in dataset.entries] == ["left", "right"]
    assert "skipping 1 of 3 entries whose sentence is empty" in capsys.readouterr().out


def test_evaluation_captions_all_empty_fail_single_empty_are_kept(tmp_path, capsys):
    for i in range(3):
        jpeg(tmp_path / f"a_{i}.jpg")
    entries = [{"image": "a_0.jpg", "caption": ["a dog", "..."]}, {"image": "a_1.jpg", "caption": ["a cat"]}]
    ann = write(tmp_path / "test.json", entries)
    dataset = RetrievalDataset(ann, str(tmp_path), None)
    assert dataset.text == ["a dog", "", "a cat"] and dataset.img2txt == [[0, 1], [2]]
    assert f"warning: {ann}: 1 of 3 captions are empty after cleaning, e.g. {ann}[0] caption 1; kept" in \
        capsys.readouterr().out
    bad = write(tmp_path / "bad.json", entries + [{"image": "a_2.jpg", "caption": ["!", ":;"]}])
    with pytest.raises(InputError, match=r"1 images have only captions that are empty .* e.g. .*bad.json\[2\]"):
        RetrievalDataset(bad, str(tmp_path), None)


# --- words the tokenizer does not know -----------------------------------------------------------------------------

KNOWN = ["a", "red", "circle", "dog", "on", "the", "left"]


@pytest.fixture
def bert(tmp_path):
    """A WordPiece tokenizer of whole words only: any other word is one [UNK]."""
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + KNOWN) + "\n")
    return init_tokenizer(str(tmp_path))


def test_unknown_share_and_words_match_a_count(bert):
    texts = ["a red circle", "a zebra on the left", "the zebra and the okapi", "dog", "a red okapi zebra"]
    words = [word for text in texts for word in text.split()]
    unknown = Counter(word for word in words if word not in KNOWN)
    share, top = unknown_token_stats(bert, texts, top=2)
    assert share == pytest.approx(sum(unknown.values()) / len(words))
    assert top == [("zebra", 3), ("okapi", 2)] == unknown.most_common(2)


def test_the_sample_is_spread_over_the_texts_and_fixed(bert):
    texts = [f"first{i}" for i in range(3000)] + [f"second{i}" for i in range(7000)]
    share, top = unknown_token_stats(bert, texts, top=None)
    assert share == 1.0 and len(top) == 2000 and all(n == 1 for _, n in top)
    assert Counter(word.rstrip("0123456789") for word, _ in top) == {"first": 600, "second": 1400}
    assert unknown_token_stats(bert, texts, top=None) == (share, top)


def mixed(unknown, total=200):
    """`total` one-word texts of which `unknown` are words the `bert` fixture does not know."""
    return ["zebra"] * unknown + ["dog"] * (total - unknown)


def test_thresholds_log_warn_fail_and_allow(bert, capsys):
    assert check_unknown_tokens(bert, mixed(1)) == 0.005
    out = capsys.readouterr().out
    assert "0.50% of the tokens of 200 sampled training texts are [UNK]" in out and "warning" not in out

    assert check_unknown_tokens(bert, mixed(10)) == 0.05
    warning = capsys.readouterr().out.splitlines()[-1]
    assert warning.startswith("warning: 5.0% of the training tokens are [UNK] (more than 1%)")
    assert f"tokenizer {bert.name_or_path}" in warning and "'zebra' (10)" in warning and "build_vocab.py" in warning

    with pytest.raises(InputError) as err:
        check_unknown_tokens(bert, mixed(40))
    message = str(err.value)
    assert message.startswith("20.0% of the training tokens are [UNK] (more than 10%)")
    assert "'zebra' (40)" in message and "build_vocab.py" in message and "data.allow_unknown_tokens: true" in message
    assert check_unknown_tokens(bert, mixed(40), allow=True) == 0.2
    assert "warning: 20.0%" in capsys.readouterr().out
    with pytest.raises(InputError, match=r"\(more than 2%\)"):
        check_unknown_tokens(bert, mixed(10), fail_above=0.02)


def test_byte_level_tokenizers_are_skipped(bert, capsys):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    opt_like = build_demo_tokenizer(["a red circle"] * 10, vocab_size=300)
    llama_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True)),
                                         unk_token="<unk>")
    for tokenizer in (opt_like, llama_like):
        assert check_unknown_tokens(tokenizer, mixed(200)) is None
        assert "no [UNK] check" in capsys.readouterr().out
    assert tokenizer_module.can_be_unknown(bert)


# --- tokenizer paths -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, local", [
    ("bert-base-uncased", False), ("facebook/opt-2.7b", False), ("Org_1/name.v2", False),
    ("/nonexistent/tok", True), ("./tok", True), ("../tok", True), ("~/tok", True), ("tok/", True), ("a/b/c", True),
    ("a b", True), ("models\\bert", True), ("demo_data/tokenizer", True), ("demo_data", False),
])
def test_local_paths_are_told_from_hub_ids(name, local):
    assert is_local_path(name) == local


@pytest.fixture
def no_network(monkeypatch):
    """Any hub download or network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network call: {args}")

    for module, name in ((tokenizer_module, "hf_hub_download"), (huggingface_hub, "hf_hub_download"),
                         (huggingface_hub.file_download, "hf_hub_download"), (socket.socket, "connect"),
                         (socket, "create_connection")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/tok", "directory /nonexistent/tok does not exist (a local path: hub ids are `name` or `org/name`)"),
    ("./no_tok", "directory ./no_tok does not exist"),
    ("../no_tok", "directory ../no_tok does not exist"),
    ("no/such/tok", "directory no/such/tok does not exist"),
    ("demo_data/tokenizer", "run `python -m data.synthetic --output_dir demo_data` first"),
    ("/x/demo_data/tokenizer", "run `python -m data.synthetic --output_dir /x/demo_data` first"),
])
def test_a_missing_tokenizer_path_fails_at_once_without_the_hub(name, message, no_network, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(InputError) as err:
        init_tokenizer(name)
    assert time.perf_counter() - start < 2
    assert str(err.value).startswith(f"model.tokenizer {name}: ") and message in str(err.value)


def test_existing_directories_and_hub_ids_still_load(bert, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    home_path = "~/" + tmp_path.name
    assert local_dir_or_hub_id(home_path, "model.bert") == str(tmp_path)
    assert init_tokenizer(home_path).convert_tokens_to_ids("red") == 6
    asked = []
    monkeypatch.setattr(tokenizer_module, "hf_hub_download",
                        lambda repo, filename: asked.append((repo, filename)) or str(tmp_path / "vocab.txt"))
    assert len(init_tokenizer("demo-org/bert")) == len(bert) and asked == [("demo-org/bert", "vocab.txt")]
    with pytest.raises(InputError, match="model.tokenizer .*vocab.txt is a file; give the directory"):
        init_tokenizer(str(tmp_path / "vocab.txt"))


# --- the scripts ---------------------------------------------------------------------------------------------------

def assert_one_error_line(result, *parts):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(part in errors[0] for part in parts), result.stderr


def test_training_stops_on_a_truncated_image_and_a_missing_tokenizer(demo_data, tmp_path):
    config = nlvr_config(tmp_path, demo_data)
    entries = json.loads((demo_data / "nlvr_train.json").read_text())
    image = tmp_path / "cut.png"
    image.write_bytes((demo_data / entries[0]["images"][0]).read_bytes())
    truncate(image)
    entries[3]["images"][1] = str(image)  # an absolute path stays itself under image_root
    train = write(tmp_path / "train.json", entries)
    result = run_script("train_nlvr.py", "--config", config, "--output_dir", tmp_path / "out", "--device", "cpu",
                        "--options", f"data.train_file={train}", check=False)
    assert_one_error_line(result, f"{train}: 1 of ", f"{image} (truncated: image file is truncated",
                          "data.skip_missing_images: true")
    assert f"bad image: {image}: truncated" in result.stdout

    result = run_script("train_nlvr.py", "--config", config, "--output_dir", tmp_path / "out", "--device", "cpu",
                        "--options", "model.tokenizer=/nonexistent/tok", check=False)
    assert_one_error_line(result, "model.tokenizer /nonexistent/tok: directory /nonexistent/tok does not exist")
