"""BLIP's tokenizer: bert-base-uncased WordPiece plus `[DEC]` (bos, id 30522) and `[ENC]` (id 30523); BLIP-2's
Q-Former tokenizer is the same without `[ENC]`. Also: telling local paths from hub ids before any hub call, and the
start-up check of how many training words a tokenizer does not know."""

import json
import os
from collections import Counter

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import BertTokenizer

from utils import InputError, log

DEMO_DIR = "demo_data"     # data.synthetic's default --output_dir, named by the demo configs
UNK_SAMPLE = 2000          # training texts tokenised by the unknown-token check
# Shares of [UNK] among those texts' tokens. bert-base-uncased gives English captions ~0% (every ASCII character is
# in its vocabulary); 1% is an unknown word every ten or so captions, a vocabulary that misses part of the data;
# 10% is about one per caption: the model would learn from [UNK] instead of the words.
UNK_WARN_SHARE, UNK_FAIL_SHARE = 0.01, 0.10


def init_tokenizer(name_or_dir, enc_token=True):
    """A lower-casing BERT WordPiece tokenizer from `vocab.txt` of a local directory or of a hub model.

    `[DEC]` starts decoder inputs and `[ENC]` replaces `[CLS]` in multimodal encoder inputs; with the
    bert-base-uncased vocabulary (30522 entries) they get ids 30522 and 30523, as in the original checkpoints.
    The tokenizer gains `enc_token_id` (None with `enc_token=False`, BLIP-2's Q-Former tokenizer).
    """
    with open(_vocab_file(name_or_dir), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, name_or_path=name_or_dir)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.enc_token_id = None
    if enc_token:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def is_local_path(name):
    """True when `name` can only mean a local path: it is no hub id (`name` or `org/name` of letters, digits, `-`,
    `_`, `.`, by huggingface_hub's validate_repo_id), which takes in everything that starts with `/`, `./`, `../`
    or `~`, has two or more `/`, a backslash or a space; or it starts with `demo_data/`, the demo's directory."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return name.startswith(DEMO_DIR + "/")


def local_dir_or_hub_id(name, what):
    """`name` as a loader should take it: an existing directory (`~` expanded) or a hub id. A name that can only
    be a local path (is_local_path) and is no directory raises InputError at once, with no hub call; `what` names
    the setting in the message (e.g. "model.tokenizer")."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return path
    if not is_local_path(name):
        return name
    if os.path.exists(path):
        raise InputError(f"{what} {name} is a file; give the directory that holds the model's files")
    parts = os.path.normpath(path).split(os.sep)
    if DEMO_DIR in parts:
        root = os.sep.join(parts[:parts.index(DEMO_DIR) + 1])
        raise InputError(f"{what} {name}: directory {path} does not exist; the demo writes it: run `python -m "
                         f"data.synthetic --output_dir {root}` first (and `python train_demo_lm.py --data_dir {root} "
                         f"--output_dir {os.path.join(root, 'opt_demo')}` for the demo's OPT)")
    raise InputError(f"{what} {name}: directory {path} does not exist (a local path: hub ids are `name` or "
                     f"`org/name`); fix the path in the config or --options")


def unknown_token_stats(tokenizer, texts, sample_size=UNK_SAMPLE, top=10):
    """(share of `[UNK]` among the tokens of a deterministic sample of `texts`, [(word, count)] of the `top` words
    that became `[UNK]` most often). The sample is `sample_size` texts evenly spaced over `texts` (all of them when
    fewer), so that each of several mixed sources is represented by its share; special tokens are not counted."""
    step = max(1, len(texts) / sample_size)
    sample = [texts[int(i * step)] for i in range(min(sample_size, len(texts)))]
    encodings = tokenizer(sample, add_special_tokens=False, return_offsets_mapping=True)
    tokens = unknown = 0
    words = Counter()
    for text, ids, offsets in zip(sample, encodings.input_ids, encodings.offset_mapping):
        tokens += len(ids)
        for token, (start, end) in zip(ids, offsets):
            if token == tokenizer.unk_token_id:
                unknown += 1
                words[text[start:end].lower()] += 1
    return unknown / max(tokens, 1), words.most_common(top)


def check_unknown_tokens(tokenizer, texts, allow=False, *, warn_above=UNK_WARN_SHARE, fail_above=UNK_FAIL_SHARE):
    """Log the share of `[UNK]` tokens in the training `texts` (unknown_token_stats); warn above `warn_above`,
    naming the tokenizer and the most frequent unknown words; raise InputError above `fail_above` unless `allow`.
    Tokenizers that never produce an unknown token (byte-level BPE such as OPT's, byte fallback such as LLaMA's,
    or none defined) are skipped. Returns the share (None when skipped). Call it on every process: they agree."""
    name = tokenizer.name_or_path or type(tokenizer).__name__
    if not can_be_unknown(tokenizer):
        log(f"tokenizer {name}: encodes every text without an unknown token (byte-level); no [UNK] check")
        return None
    share, words = unknown_token_stats(tokenizer, texts)
    log(f"tokenizer {name}: {share:.2%} of the tokens of {min(len(texts), UNK_SAMPLE)} sampled training texts "
        f"are {tokenizer.unk_token}")
    if share <= warn_above:
        return share
    listed = ", ".join(f"{word!r} ({n})" for word, n in words)
    advice = (f"the vocabulary of tokenizer {name} misses words of the training texts; most frequent: {listed}. A "
              "pretrained text model must keep its vocabulary (check the data's language and encoding); for a model "
              "trained from scratch, build one from the annotations with `python build_vocab.py --ann_files ... "
              "--output_dir DIR` and set the tokenizer to DIR")
    if share > fail_above and not allow:
        raise InputError(f"{share:.1%} of the training tokens are {tokenizer.unk_token} (more than "
                         f"{fail_above:.0%}): {advice}; or set data.allow_unknown_tokens: true to train anyway")
    log(f"warning: {share:.1%} of the training tokens are {tokenizer.unk_token} (more than {warn_above:.0%}): "
        f"{advice}")
    return share


def can_be_unknown(tokenizer):
    """False for tokenizers that encode every text without their unknown token: none defined, a byte-level
    pre-tokenizer (GPT-2, OPT) or a BPE with byte fallback (LLaMA)."""
    if tokenizer.unk_token_id is None:
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return True
    spec = json.loads(backend.to_str())
    return not (spec["model"].get("byte_fallback") or '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")))


def _vocab_file(name_or_dir):
    # transformers 5 silently builds a 5-token tokenizer when it finds no files, so the vocabulary is resolved here.
    name = local_dir_or_hub_id(name_or_dir, "model.tokenizer")
    if os.path.isdir(name):
        path = os.path.join(name, "vocab.txt")
        if not os.path.isfile(path):
            raise InputError(f"tokenizer directory {name_or_dir} has no vocab.txt: fetch bert-base-uncased's with "
                             f"`hf download bert-base-uncased vocab.txt --local-dir {name_or_dir}`, or for a model "
                             f"trained from scratch write one with build_vocab.py")
        return path
    try:
        return hf_hub_download(name, "vocab.txt")
    except Exception as e:
        raise InputError(
            f"tokenizer '{name}' is no local directory and cannot be fetched from the hub "
            f"({type(e).__name__}; offline?). On a machine with internet run "
            f"`hf download {name} vocab.txt --local-dir /path/to/{name}`, copy that "
            f"directory here and set `model.tokenizer: /path/to/{name}` in the config (or pass "
            f"--options model.tokenizer=/path/to/{name})") from None
