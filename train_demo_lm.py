"""Pre-train a tiny language model on the demo's text, the frozen language model of the BLIP-2 stage-2 demos.

    python train_demo_lm.py --data_dir demo_data --output_dir demo_data/opt_demo
    python train_demo_lm.py --arch llama --data_dir demo_data --output_dir demo_data/llama_demo
    python train_demo_lm.py --arch t5 --data_dir demo_data --output_dir demo_data/t5_demo

No real language model can be downloaded offline, so the demos train their own, with the tokenizer conventions of
the real ones (`tokenizers` models wrapped in transformers' classes):
- opt: `OPTForCausalLM`, byte-level BPE; `</s>` is the BOS that `tokenizer(text)` prepends, "\\n" ends a text
  (LAVIS's blip2_opt).
- llama: `LlamaForCausalLM`, LlamaTokenizer's byte-fallback BPE over "▁"-words (`<unk>` 0, `<s>` 1 prepended,
  `</s>` 2, the 256 byte pieces `<0x00>`... 3-258, no pad token); `</s>` ends a text (what Blip2CausalLM appends
  to a text_output for LMs other than OPT).
- t5: `T5ForConditionalGeneration` with Flan-T5's gated-GELU FFN in LAVIS's exact "gelu" and Flan-T5's config
  otherwise (tie_word_embeddings false: transformers 5 ties the LM head to the embeddings whatever the config and
  reads this as "do not rescale the decoder output", T5 v1.1's way); T5Tokenizer's Unigram (`<pad>` 0, also the
  decoder start, `</s>` 1 appended, `<unk>` 2; no sentinels).

Texts: `pre_caption(caption, 50)` of the captions (what stage 2 feeds) and, with `--texts captions+vqa` (the
default), VQA questions of the split evenly spaced through its file, as many as make a fifth of the texts,
rendered as the VQA fine-tuning shows them, `Question: {pre_question(question)} Short answer: {answer}`, the answer
the most common of its human answers (ties: the first written). The LM thus knows the questions' words and the
answer format, while its unprompted texts stay captions, so that the stage-2 caption demos' text-only baseline is
a caption model. The tokenizer is trained on the train texts; train and val texts come from the same files' train
and val splits.

Objectives: the causal LMs are trained on the texts (each from its BOS to its end) concatenated in reshuffled
epochs and cut into rows of --max_positions tokens, so that every position trains as in a real LM (stage 2's 32
query tokens put the text at positions 33 and later); T5 with the prefix-LM objective of BLIP-2: each text split
before a random word into the encoder's input (possibly empty) and the decoder's target (at least one word), as
Blip2T5 feeds text_input and text_output + `</s>`.

`output_dir` then loads like the real model (`models.blip2_lm.load_causal_lm` / `load_t5`, or AutoTokenizer and
the model class's from_pretrained) and holds `train_lm_log.json` with the final train loss and the val loss and
perplexity (per predicted token: the causal LMs' whole texts and ends, T5's targets under a fixed split).
"""

import argparse
import json
import math
import os
import time
from collections import Counter, deque

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.nn.utils.rnn import pad_sequence
from transformers import (BatchEncoding, LlamaConfig, LlamaForCausalLM, LlamaTokenizer, OPTConfig, OPTForCausalLM,
                          PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration, T5Tokenizer)

from data.utils import pre_caption, read_annotation
from data.vqa import DEFAULT_PROMPT, VQASplitConfig, pre_question, read_vqa_split
from utils import InputError, TrainConfig, build_optimizer, log, lr_at_step, run_main, seed_everything

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3, as in OPT's vocabulary
END_OF_CAPTION = "\n"
VQA_SHARE = 0.2  # of the texts, with --texts captions+vqa
# Per --arch, for the options left unset: each trains in about the same time (2 minutes on 2 CPU cores). T5's batch
# counts texts, the others' rows of --max_positions tokens. The gated FFNs (LLaMA's SwiGLU, T5's gated GELU) are
# 2.5 x the width, T5 v1.1's ratio: their three matrices hold about as many weights as OPT's two of 4 x.
ARCH_DEFAULTS = {"opt": dict(vocab_size=512, batch_size=16, ffn_dim=512),
                 "llama": dict(vocab_size=768, batch_size=12, ffn_dim=320),
                 "t5": dict(vocab_size=512, batch_size=32, ffn_dim=320)}
EVAL_BATCH_SIZE = 256


def build_demo_tokenizer(texts, vocab_size=512):
    """A byte-level BPE tokenizer trained on `texts`, with OPT's (GPT-2's) conventions.

    Specials `<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3; bos = eos = `</s>`, which `tokenizer(text)` prepends as OPT's
    does (`add_special_tokens=False` gives the bare ids). Every byte is in the alphabet, so any text encodes and
    decodes back exactly. BPE stops merging once every word of `texts` is one token, so a `vocab_size` above that
    (about 350 for the demo captions) leaves the vocabulary smaller.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", SPECIAL_TOKENS.index("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="right")


def build_llama_tokenizer(texts, vocab_size=768):
    """transformers' LlamaTokenizer over a byte-fallback BPE trained on `texts`: `<unk>` 0, `<s>` 1 (prepended),
    `</s>` 2, the byte pieces `<0x00>`..`<0xFF>` 3-258 (so any text encodes), no pad token. `vocab_size` counts
    them; merging stops once every word of `texts` is one token."""
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", *byte_pieces], show_progress=False))
    trained = json.loads(bpe.to_str())["model"]
    return LlamaTokenizer(vocab=trained["vocab"], merges=[tuple(m) for m in trained["merges"]], add_bos_token=True)


def build_t5_tokenizer(texts, vocab_size=512):
    """transformers' T5Tokenizer over a Unigram trained on `texts`: `<pad>` 0, `</s>` 1 (appended), `<unk>` 2, and
    every printable ASCII character (so any ASCII text encodes without `<unk>`). No sentinels (extra_ids), which
    BLIP-2 never uses."""
    words = sorted({word for text in texts for word in text.split()})
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always", split=True)])
    # The trainer's seed pieces are the strings that occur in its distinct words with different continuations, so
    # a word that occurs in no longer word never becomes a piece ("three" would be "th" "ree"). One extra line
    # with every word followed by a comma makes each word such a string; it adds one count to each.
    unigram.train_from_iterator([*texts, " ".join(word + "," for word in words)], trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False,
        initial_alphabet=[chr(c) for c in range(33, 127)]))
    # The trainer scores the characters it adds to cover the alphabet just above its lowest score, 1e-4 apart in an
    # order that changes from run to run (a hash set's), and the last bits of the other scores vary too: one score
    # for those characters, rounding and sorting make the vocabulary depend on the texts alone.
    vocab = json.loads(unigram.to_str())["model"]["vocab"]  # the specials first
    low = min(score for _, score in vocab[3:])
    pieces = [(piece, round(low if len(piece) == 1 and score < low + 1e-4 * len(vocab) else score, 6))
              for piece, score in vocab[3:]]
    return T5Tokenizer(vocab=[tuple(v) for v in vocab[:3]] + sorted(pieces, key=lambda p: (-p[1], p[0])),
                       extra_ids=0)


TOKENIZERS = {"opt": build_demo_tokenizer, "llama": build_llama_tokenizer, "t5": build_t5_tokenizer}


def build_demo_opt(tokenizer, hidden_size=128, num_layers=4, num_heads=4, ffn_dim=512, max_positions=128,
                   dropout=0.1):
    """A randomly initialised OPTForCausalLM over `tokenizer`'s vocabulary."""
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, word_embed_proj_dim=hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, ffn_dim=ffn_dim,
                       max_position_embeddings=max_positions, dropout=dropout, do_layer_norm_before=True,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return OPTForCausalLM(config)


def build_model(arch, tokenizer, args):
    """A randomly initialised `arch` model over `tokenizer`'s vocabulary, of the sizes in `args`. --dropout is
    LLaMA's attention dropout (its only one); T5 has relative positions and no --max_positions."""
    if arch == "opt":
        return build_demo_opt(tokenizer, args.hidden_size, args.num_layers, args.num_heads, args.ffn_dim,
                              args.max_positions, args.dropout)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.ffn_dim,
            num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads, num_key_value_heads=args.num_heads,
            max_position_embeddings=args.max_positions, attention_dropout=args.dropout,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None))
    return T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=args.hidden_size, d_kv=args.hidden_size // args.num_heads,
        d_ff=args.ffn_dim, num_layers=args.num_layers, num_heads=args.num_heads, dropout_rate=args.dropout,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu", tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))


# ------------------------------------------------------------------------------------------------------ texts

def read_texts(data_dir, split, which):
    """The `split` texts of `data_dir` (see the module docstring): `which` is "captions" or "captions+vqa"."""
    captions = read_captions(os.path.join(data_dir, f"coco_karpathy_{split}.json"))
    if which == "captions":
        return captions
    questions = read_vqa_texts(data_dir, split)
    kept = min(len(questions), round(len(captions) * VQA_SHARE / (1 - VQA_SHARE)))
    return captions + [questions[i * len(questions) // kept] for i in range(kept)]


def read_captions(path):
    """pre_caption(caption, 50) of every caption of a Karpathy-format file (a caption or a list of them per
    entry)."""
    require_file(path)
    texts = []
    for i, entry in enumerate(read_annotation(path)):
        captions = entry.get("caption") if isinstance(entry, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        if not captions or not all(isinstance(c, str) for c in captions):
            raise InputError(f"{path}: entry {i} has no \"caption\" string or list of strings; regenerate the file "
                             "with python -m data.synthetic")
        cleaned = [pre_caption(c, 50) for c in captions]
        if not all(cleaned):
            raise InputError(f"{path}: entry {i} has a caption that is empty after cleaning (pre_caption keeps no "
                             ". ! \" ( ) * # : ; ~ or spaces); write it or remove the entry")
        texts += cleaned
    return texts


def read_vqa_texts(data_dir, split):
    """`Question: {question} Short answer: {answer}` of every question of vqa_{split}_questions.json (VQAv2's
    official layout, answers from vqa_{split}_annotations.json), the answer the most common human one."""
    cfg = VQASplitConfig(questions=os.path.join(data_dir, f"vqa_{split}_questions.json"),
                         annotations=os.path.join(data_dir, f"vqa_{split}_annotations.json"))
    require_file(cfg.questions)
    require_file(cfg.annotations)
    return [f"{DEFAULT_PROMPT.format(pre_question(q['question']))} {Counter(q['answers']).most_common(1)[0][0]}"
            for q in read_vqa_split(cfg)]


def require_file(path):
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist; run python -m data.synthetic --output_dir "
                         f"{os.path.dirname(path) or '.'} first, or pass the --data_dir that holds it")


# ---------------------------------------------------------------------------------------------------- batches

def end_of_text(arch, tokenizer):
    """What ends a text of an `arch` model, as in Blip2CausalLM and Blip2T5: "\\n" for OPT, else the eos."""
    return END_OF_CAPTION if arch == "opt" else tokenizer.eos_token


def causal_token_lists(arch, tokenizer, texts):
    """Token ids of each text from its BOS to its end."""
    return tokenizer([text + end_of_text(arch, tokenizer) for text in texts]).input_ids


def shuffled_epochs(num_items, generator):
    """Indices 0..num_items-1 in a new random order every epoch, endlessly."""
    while True:
        yield from torch.randperm(num_items, generator=generator).tolist()


def packed_batches(token_lists, rows, block, steps, seed):
    """`steps` batches [rows, block] of token ids: the texts (each BOS ... end) in reshuffled epochs, concatenated
    and cut into blocks, as language models are pre-trained on packed text. Every position up to `block` gets
    trained, which stage 2 needs: its query tokens shift each text to positions 33 and later."""
    order = shuffled_epochs(len(token_lists), torch.Generator().manual_seed(seed))
    stream = []
    for _ in range(steps):
        while len(stream) < rows * block:
            stream += token_lists[next(order)]
        yield torch.tensor(stream[:rows * block]).view(rows, block)
        del stream[:rows * block]


def prefix_split(text, generator):
    """(prefix, suffix) of `text` split before a random word: the prefix may be empty, the suffix is not."""
    words = text.split()
    cut = torch.randint(len(words), (), generator=generator).item()
    return " ".join(words[:cut]), " ".join(words[cut:])


def prefix_lm_rows(tokenizer, pairs):
    """T5 inputs of (prefix, suffix) pairs: input_ids, attention_mask [B, L] of the prefixes + `</s>` and labels
    [B, T] of the suffixes + `</s>` (-100 on padding), as Blip2T5 feeds text_input and text_output."""
    prefixes, suffixes = zip(*pairs)
    inputs = tokenizer(list(prefixes), padding=True, return_tensors="pt")
    targets = tokenizer(list(suffixes), padding=True, return_tensors="pt")
    inputs["labels"] = targets.input_ids.masked_fill(targets.attention_mask == 0, -100)
    return inputs


def prefix_lm_batches(tokenizer, texts, rows, steps, seed):
    """`steps` batches of prefix_lm_rows: `rows` texts each, in reshuffled epochs, each split anew (prefix_split)."""
    generator = torch.Generator().manual_seed(seed)
    order = shuffled_epochs(len(texts), generator)
    for _ in range(steps):
        yield prefix_lm_rows(tokenizer, [prefix_split(texts[next(order)], generator) for _ in range(rows)])


def causal_rows(token_lists):
    """input_ids, attention_mask and labels [B, L] of `token_lists`, right-padded (labels -100 there)."""
    ids = [torch.tensor(tokens) for tokens in token_lists]
    return BatchEncoding({"input_ids": pad_sequence(ids, batch_first=True),
                          "attention_mask": pad_sequence([torch.ones_like(t) for t in ids], batch_first=True),
                          "labels": pad_sequence(ids, batch_first=True, padding_value=-100)})


def train_batches(arch, tokenizer, texts, args):
    """The `args.steps` training batches (model keyword arguments) of `arch`: packed rows for the causal LMs,
    prefix-LM pairs for T5."""
    if arch == "t5":
        return prefix_lm_batches(tokenizer, texts, args.batch_size, args.steps, args.seed)
    blocks = packed_batches(causal_token_lists(arch, tokenizer, texts), args.batch_size, args.max_positions, args.steps,
                            args.seed)
    return ({"input_ids": block, "labels": block} for block in blocks)


# --------------------------------------------------------------------------------------------------- training

def train(model, batches, cfg, steps, print_freq):
    """AdamW with linear warmup and cosine decay for `steps` steps over `batches` (model keyword arguments with
    labels); returns (first step's loss, mean loss of the last `print_freq` steps)."""
    optimizer = build_optimizer(model, cfg)
    model.train()
    window, first_loss = deque(maxlen=print_freq), None
    for step, batch in enumerate(batches):
        lr = lr_at_step(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss.item() if first_loss is None else first_loss
        window.append(loss.item())
        if (step + 1) % print_freq == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {sum(window) / len(window):.4f}  lr {lr:.2e}")
    return first_loss, sum(window) / len(window)


@torch.no_grad()
def evaluate_loss(model, tokenizer, texts, batch_size):
    """Mean cross-entropy per predicted token over `texts`: for a causal LM every token of each text after its BOS
    (the text cut to max_position_embeddings tokens), for T5 the target of each text's prefix_split (with a fixed
    seed, so that runs compare)."""
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        if model.config.is_encoder_decoder:
            batch = prefix_lm_rows(tokenizer, [prefix_split(text, generator) for text in chunk])
            predicted = batch["labels"] != -100
        else:
            block = model.config.max_position_embeddings
            token_lists = causal_token_lists(model.config.model_type, tokenizer, chunk)
            batch = causal_rows([tokens[:block] for tokens in token_lists])
            predicted = batch["labels"][:, 1:] != -100  # labels shift by one
        # The loss is a mean over the batch's predicted tokens; weigh it by their number.
        tokens = predicted.sum().item()
        total += model(**batch.to(model.device)).loss.item() * tokens
        count += tokens
    return total / count


@torch.no_grad()
def sample_texts(model, tokenizer, num_samples, max_new_tokens):
    """[greedy text, `num_samples` sampled texts], each generated from the empty text (causal LMs: its BOS; T5:
    its `</s>` as the encoder's input) until the end of a text."""
    model.eval()
    end = tokenizer(end_of_text(model.config.model_type, tokenizer), add_special_tokens=False).input_ids[0]
    start = tokenizer([""], return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=end, pad_token_id=pad)
    greedy = model.generate(**start, do_sample=False, **kwargs)
    sampled = model.generate(**start, do_sample=True, top_k=0, num_return_sequences=num_samples, **kwargs)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in [*greedy, *sampled]]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(ARCH_DEFAULTS), default="opt")
    parser.add_argument("--data_dir", default="demo_data",
                        help="holds coco_karpathy_{train,val}.json (and vqa_{train,val}_*.json for the VQA texts)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--texts", choices=["captions", "captions+vqa"], default="captions+vqa")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int,
                        help="rows of --max_positions packed tokens per step (t5: texts); default: by --arch, "
                             f"{ {a: d['batch_size'] for a, d in ARCH_DEFAULTS.items()} }")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--vocab_size", type=int, help="upper bound, see the tokenizer builders; default: by --arch, "
                        f"{ {a: d['vocab_size'] for a, d in ARCH_DEFAULTS.items()} }")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4, help="t5: in the encoder and in the decoder")
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--ffn_dim", type=int, help="default: by --arch, "
                        f"{ {a: d['ffn_dim'] for a, d in ARCH_DEFAULTS.items()} }")
    parser.add_argument("--max_positions", type=int, default=128, help="causal LMs: positions, packed row length")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--print_freq", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = parser.parse_args(argv)
    for name, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("steps", "batch_size", "print_freq", "vocab_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be positive; got {getattr(args, name)}")
    if args.hidden_size % args.num_heads:
        raise InputError(f"--hidden_size {args.hidden_size} must be a multiple of --num_heads {args.num_heads}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(args.seed)
    train_texts = read_texts(args.data_dir, "train", args.texts)
    val_texts = read_texts(args.data_dir, "val", args.texts)

    tokenizer = TOKENIZERS[args.arch](train_texts, args.vocab_size)
    model = build_model(args.arch, tokenizer, args).to(device)
    log(f"{args.arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocabulary "
        f"{len(tokenizer)}; {len(train_texts)} train, {len(val_texts)} val texts ({args.texts})")
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, no_decay_bias_norm=True, grad_clip=1.0, seed=args.seed)
    first_loss, final_loss = train(model, train_batches(args.arch, tokenizer, train_texts, args), cfg, args.steps,
                                   args.print_freq)
    val_loss = evaluate_loss(model, tokenizer, val_texts, EVAL_BATCH_SIZE)
    log(f"val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.3f}")
    greedy, *sampled = sample_texts(model, tokenizer, 3, args.max_positions - 1)
    log(f"greedy: {greedy!r}\n" + "\n".join(f"sample: {s!r}" for s in sampled))

    os.makedirs(args.output_dir, exist_ok=True)
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    stats = {"steps": args.steps, "initial_train_loss": first_loss, "final_train_loss": final_loss,
             "val_loss": val_loss, "val_perplexity": math.exp(val_loss), "seconds": time.time() - start_time}
    with open(os.path.join(args.output_dir, "train_lm_log.json"), "w") as f:
        json.dump(stats, f, indent=1)
    log(json.dumps(stats))
    log(f"wrote the language model to {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
