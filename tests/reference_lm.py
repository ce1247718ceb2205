"""Tiny transformers references for the BLIP-2 language-model variants (tests/test_blip2_lm.py).

Tokenizers are trained offline on a few texts with the `tokenizers` library and wrapped in transformers' own
classes, so they keep the real conventions: OPT's byte-level BPE (`</s>` first; train_demo_lm), LLaMA's
byte-fallback BPE over "▁"-words (`<s>` first, no pad token), T5's Unigram (`</s>` last, pad 0), and the Q-Former's
BERT WordPiece with `[DEC]`. Models are transformers' Blip2ForConditionalGeneration / InstructBlipForConditional-
Generation at tiny sizes, with every weight perturbed so that a wrong mapping shows.
"""

import json

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (Blip2Config, Blip2ForConditionalGeneration, InstructBlipConfig,
                          InstructBlipForConditionalGeneration, LlamaConfig, LlamaTokenizer, OPTConfig, T5Config,
                          T5Tokenizer)

from models.tokenizer import init_tokenizer
from train_demo_lm import build_demo_tokenizer

TEXTS = ["a red circle at the top left", "there is a blue square in the bottom right corner",
         "two shapes: a green triangle (top right) and a yellow circle (bottom left)",
         "the top left has a red square", "a dark picture with a blue circle on the bottom left",
         "what is in the image?", "describe the picture.", "question: how many shapes are there? answer:",
         "a photo of", "two", "yes", "no"]
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, image_size=32,
              patch_size=16, layer_norm_eps=1e-6)
QFORMER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
               max_position_embeddings=64, encoder_hidden_size=128)


def opt_tokenizer():
    return build_demo_tokenizer([t + "\n" for t in TEXTS])


def llama_tokenizer():
    """transformers' LlamaTokenizer over a BPE trained on TEXTS: `<unk>` 0, `<s>` 1 (prepended), `</s>` 2, no pad."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]], add_bos_token=True)


def t5_tokenizer():
    """transformers' T5Tokenizer over a Unigram trained on TEXTS: `<pad>` 0, `</s>` 1 (appended), `<unk>` 2."""
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    unigram.train_from_iterator(TEXTS, trainers.UnigramTrainer(
        vocab_size=150, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    return T5Tokenizer(vocab=[tuple(v) for v in json.loads(unigram.to_str())["model"]["vocab"]], extra_ids=0)


def bert_tokenizer(directory):
    """The Q-Former's tokenizer (models.tokenizer.init_tokenizer) over a WordPiece vocabulary of TEXTS' words."""
    words = sorted({w for t in TEXTS for w in t.replace("?", " ? ").replace(":", " : ").replace(".", " . ")
                    .replace("(", " ( ").replace(")", " ) ").split()})
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return init_tokenizer(str(directory), enc_token=False)


def text_config(kind, tokenizer):
    """A tiny LM config over `tokenizer`, with one spare vocabulary row for transformers' image token."""
    vocab = len(tokenizer) + 1
    if kind == "opt":
        return OPTConfig(vocab_size=vocab, hidden_size=64, word_embed_proj_dim=64, num_hidden_layers=2,
                         num_attention_heads=4, ffn_dim=128, max_position_embeddings=128, pad_token_id=1,
                         bos_token_id=2, eos_token_id=2, dropout=0.1)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=1, eos_token_id=2, attention_dropout=0.1)
    return T5Config(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dense_act_fn="gelu",
                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.1)


def transformers_model(kind, tokenizer, qformer_vocab=None, num_query_tokens=4, seed=0):
    """Blip2ForConditionalGeneration, or with `qformer_vocab` (the Q-Former tokenizer's size)
    InstructBlipForConditionalGeneration, over a tiny `kind` LM ("opt", "llama", "t5"), weights perturbed, eval."""
    text = text_config(kind, tokenizer)
    qformer = dict(QFORMER, vocab_size=qformer_vocab) if qformer_vocab else dict(QFORMER)
    config_class = InstructBlipConfig if qformer_vocab else Blip2Config
    config = config_class(vision_config=VISION, qformer_config=qformer, text_config=text.to_dict(),
                          num_query_tokens=num_query_tokens, image_token_index=len(tokenizer))
    torch.manual_seed(seed)
    model = (InstructBlipForConditionalGeneration if qformer_vocab else Blip2ForConditionalGeneration)(config)
    with torch.no_grad():  # random, not the init's zeros and ones; EVA has no key bias
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for layer in model.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[128:256] = 0
    return model.eval()
