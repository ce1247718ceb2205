"""BLIP's tokenizer: bert-base-uncased WordPiece plus `[DEC]` (bos, id 30522) and `[ENC]` (id 30523); BLIP-2's
Q-Former tokenizer is the same without `[ENC]`."""

import os

from huggingface_hub import hf_hub_download
from transformers import BertTokenizer

from utils import InputError


def init_tokenizer(name_or_dir, enc_token=True):
    """A lower-casing BERT WordPiece tokenizer from `vocab.txt` of a local directory or of a hub model.

    `[DEC]` starts decoder inputs and `[ENC]` replaces `[CLS]` in multimodal encoder inputs; with the
    bert-base-uncased vocabulary (30522 entries) they get ids 30522 and 30523, as in the original checkpoints.
    The tokenizer gains `enc_token_id` (None with `enc_token=False`, BLIP-2's Q-Former tokenizer).
    """
    with open(_vocab_file(name_or_dir), encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.enc_token_id = None
    if enc_token:
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def _vocab_file(name_or_dir):
    # transformers 5 silently builds a 5-token tokenizer when it finds no files, so the vocabulary is resolved here.
    if os.path.isdir(name_or_dir):
        path = os.path.join(name_or_dir, "vocab.txt")
        if not os.path.isfile(path):
            raise InputError(f"tokenizer directory {name_or_dir} has no vocab.txt")
        return path
    try:
        return hf_hub_download(name_or_dir, "vocab.txt")
    except Exception as e:
        raise InputError(
            f"tokenizer '{name_or_dir}' is no local directory and cannot be fetched from the hub "
            f"({type(e).__name__}; offline?). On a machine with internet run "
            f"`hf download {name_or_dir} vocab.txt --local-dir /path/to/{name_or_dir}`, copy that "
            f"directory here and set `model.tokenizer: /path/to/{name_or_dir}` in the config (or pass "
            f"--options model.tokenizer=/path/to/{name_or_dir})") from None
