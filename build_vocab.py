"""Build a WordPiece vocabulary from annotation files, for BLIP / Q-Former text encoders trained from scratch.

    python build_vocab.py --ann_files demo_data/coco_karpathy_train.json demo_data/nlvr_train.json \\
        --output_dir demo_data/vocab

reads caption training files (a JSON list or JSONL of {"image", "caption"}), Karpathy evaluation files
({"image", "caption": [...]}) and NLVR2 files ({"images", "sentence", "label"}), cleans each text with pre_caption
as training does (NLVR sentences also with left and right swapped, as training's augmentation swaps them), trains
a lower-casing WordPiece vocabulary on them with the `tokenizers` library and writes `--output_dir/vocab.txt`:
BERT's special tokens first ([PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4), then every character seen (so no text
of the files has an [UNK]), then the word pieces. `model.tokenizer: OUTPUT_DIR` loads it (models.tokenizer adds
[DEC] and [ENC] after it). A pretrained BERT keeps its own vocabulary: this is for models trained from scratch;
build it from the training files (words of val/test only are then unknown, as they would be).
"""

import argparse
import os

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from data.nlvr import swap_left_right
from data.utils import pre_caption, read_entries
from models.tokenizer import init_tokenizer, unknown_token_stats
from utils import InputError, run_main

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # as bert-base-uncased names them


def read_texts(path, max_words=50):
    """The cleaned texts of one annotation file: each entry's "caption" (a string or a list of strings) or NLVR's
    "sentence" (and its left/right swap)."""
    texts = []
    for where, entry in read_entries(path):
        if isinstance(entry, dict) and isinstance(entry.get("sentence"), str):
            sentence = pre_caption(entry["sentence"], max_words)
            texts += [sentence, swap_left_right(sentence)]
            continue
        captions = entry.get("caption") if isinstance(entry, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        if not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
            raise InputError(f"{where}: expected an object with 'caption' (a string or a list of strings) or "
                             f"'sentence' (a string); got {entry!r:.80}. Pass caption, Karpathy or NLVR files")
        texts += [pre_caption(c, max_words) for c in captions]
    return texts


def build_wordpiece_vocab(texts, output_dir, vocab_size=30522, min_frequency=2):
    """Train a lower-casing BERT WordPiece vocabulary on `texts` and write output_dir/vocab.txt; returns its path.
    The same texts give the same file."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)  # bert-base-uncased's normalisation
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # The trainer numbers the word-continuing pieces (`##c`) in hash-map order, and ties between merges are broken
    # by those numbers, so two runs can differ (huggingface/tokenizers#1794). Giving them, sorted, with the special
    # tokens numbers them in a fixed order first.
    words = {word for text in texts
             for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(tokenizer.normalizer.normalize_str(text))}
    continuing = sorted({"##" + c for word in words for c in word[1:]})
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=SPECIAL_TOKENS + continuing)
    tokenizer.train_from_iterator(texts, trainer)
    os.makedirs(output_dir, exist_ok=True)
    return tokenizer.model.save(output_dir)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ann_files", nargs="+", required=True, help="caption, Karpathy or NLVR annotation files")
    parser.add_argument("--output_dir", required=True, help="where vocab.txt is written")
    parser.add_argument("--vocab_size", type=int, default=30522, help="at most this many tokens (bert-base's size)")
    parser.add_argument("--min_frequency", type=int, default=2, help="pieces seen fewer times are not merged")
    parser.add_argument("--max_words", type=int, default=50, help="pre_caption's cut, as data.max_words")
    args = parser.parse_args()
    if args.vocab_size <= len(SPECIAL_TOKENS):
        raise InputError(f"--vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens; got {args.vocab_size}")
    texts = [text for path in args.ann_files for text in read_texts(path, args.max_words)]
    if not any(texts):
        raise InputError(f"{', '.join(args.ann_files)} hold no text to build a vocabulary from")
    path = build_wordpiece_vocab(texts, args.output_dir, args.vocab_size, args.min_frequency)
    tokenizer = init_tokenizer(args.output_dir)
    share, _ = unknown_token_stats(tokenizer, texts)
    print(f"wrote {path}: {tokenizer.vocab_size} tokens from {len(texts)} texts of {len(args.ann_files)} files "
          f"([UNK] in {share:.2%} of a sample's tokens); set model.tokenizer: {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
