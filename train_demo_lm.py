"""Pre-train a tiny OPT on the demo captions' text, the frozen language model of the BLIP-2 stage-2 demo.

    python train_demo_lm.py --data_dir demo_data --output_dir demo_data/opt_demo

No real OPT can be downloaded offline, so the demo trains its own: a byte-level BPE tokenizer with OPT's
conventions and a small `OPTForCausalLM`, trained on `pre_caption(caption, 50) + "\\n"` of the train captions (the
text stage 2 feeds; "\\n" ends a caption, as in BLIP-2), packed into rows of --max_positions tokens so that every
position is trained as in a real OPT (stage 2's 32 query tokens put the captions at positions 33 and later).
`output_dir` then loads like `facebook/opt-2.7b`, with `OPTForCausalLM.from_pretrained(output_dir)` and
`AutoTokenizer.from_pretrained(output_dir)`, and holds `train_lm_log.json` with the final train loss and the val
loss and perplexity.
"""

import argparse
import json
import math
import os
import time
from collections import deque

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from data.utils import pre_caption, read_annotation
from utils import InputError, TrainConfig, build_optimizer, log, lr_at_step, run_main, seed_everything

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0, 1, 2, 3, as in OPT's vocabulary
END_OF_CAPTION = "\n"


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


def build_demo_opt(tokenizer, hidden_size=128, num_layers=4, num_heads=4, ffn_dim=512, max_positions=128,
                   dropout=0.1):
    """A randomly initialised OPTForCausalLM over `tokenizer`'s vocabulary."""
    if hidden_size % num_heads:
        raise InputError(f"--hidden_size {hidden_size} must be a multiple of --num_heads {num_heads}")
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, word_embed_proj_dim=hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, ffn_dim=ffn_dim,
                       max_position_embeddings=max_positions, dropout=dropout, do_layer_norm_before=True,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    return OPTForCausalLM(config)


def read_captions(path):
    """pre_caption(caption, 50) + "\\n" of every caption of a Karpathy-format file (a caption or a list of them
    per entry)."""
    if not os.path.isfile(path):
        raise InputError(f"{path} does not exist; run python -m data.synthetic --output_dir "
                         f"{os.path.dirname(path) or '.'} first, or pass the --data_dir that holds it")
    texts = []
    for i, entry in enumerate(read_annotation(path)):
        captions = entry.get("caption") if isinstance(entry, dict) else None
        captions = [captions] if isinstance(captions, str) else captions
        if not captions or not all(isinstance(c, str) for c in captions):
            raise InputError(f"{path}: entry {i} has no \"caption\" string or list of strings; regenerate the file "
                             "with python -m data.synthetic")
        texts += [pre_caption(c, 50) + END_OF_CAPTION for c in captions]
    return texts


def encode(tokenizer, texts, max_length, device):
    """Padded (input_ids, labels) [B, L] with the leading `</s>`; labels are -100 on padding."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return batch.input_ids.to(device), labels.to(device)


def packed_batches(token_lists, rows, block, steps, seed):
    """`steps` batches [rows, block] of token ids: the captions (each `</s>` ... "\n") in reshuffled epochs,
    concatenated and cut into blocks, as language models are pre-trained on packed text. Every position up to
    `block` gets trained, which stage 2 needs: its query tokens shift each caption to positions 33 and later."""
    generator = torch.Generator().manual_seed(seed)
    stream = []
    for _ in range(steps):
        while len(stream) < rows * block:
            for i in torch.randperm(len(token_lists), generator=generator).tolist():
                stream += token_lists[i]
        yield torch.tensor(stream[:rows * block]).view(rows, block)
        del stream[:rows * block]


def train(model, tokenizer, texts, cfg, steps, print_freq, device):
    """AdamW with linear warmup and cosine decay for `steps` steps of `cfg.batch_size` packed rows of
    max_position_embeddings tokens; returns (first step's loss, mean loss of the last `print_freq` steps)."""
    optimizer = build_optimizer(model, cfg)
    token_lists = tokenizer(texts).input_ids
    model.train()
    window, first_loss = deque(maxlen=print_freq), None
    batches = packed_batches(token_lists, cfg.batch_size, model.config.max_position_embeddings, steps, cfg.seed)
    for step, input_ids in enumerate(batches):
        lr = lr_at_step(step, steps, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids = input_ids.to(device)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; lower --lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = loss.item() if first_loss is None else first_loss
        window.append(loss.item())
        if (step + 1) % print_freq == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}  loss {sum(window) / len(window):.4f}  "
                f"lr {lr:.2e}")
    return first_loss, sum(window) / len(window)


@torch.no_grad()
def evaluate_loss(model, tokenizer, texts, batch_size, device):
    """Mean cross-entropy per predicted token (the caption's tokens and "\\n") over `texts`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(texts), batch_size):
        input_ids, labels = encode(tokenizer, texts[start:start + batch_size], model.config.max_position_embeddings,
                                   device)
        # The loss is a mean over the batch's predicted tokens (labels shift by one); weigh it by their number.
        tokens = (labels[:, 1:] != -100).sum().item()
        total += model(input_ids=input_ids, labels=labels).loss.item() * tokens
        count += tokens
    return total / count


@torch.no_grad()
def sample_captions(model, tokenizer, num_samples, max_new_tokens, device):
    """[greedy caption, `num_samples` sampled captions], each generated from `</s>` alone until "\\n"."""
    model.eval()
    newline = tokenizer(END_OF_CAPTION, add_special_tokens=False).input_ids[0]
    start = torch.tensor([[tokenizer.bos_token_id]], device=device)
    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=newline, pad_token_id=tokenizer.pad_token_id)
    greedy = model.generate(start, do_sample=False, **kwargs)
    sampled = model.generate(start, do_sample=True, top_k=0, num_return_sequences=num_samples, **kwargs)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in [*greedy, *sampled]]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default="demo_data", help="holds coco_karpathy_{train,val}.json")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=16, help="rows of --max_positions packed tokens per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--vocab_size", type=int, default=512, help="upper bound; see build_demo_tokenizer")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=4)
    parser.add_argument("--num_heads", type=int, default=4)
    parser.add_argument("--ffn_dim", type=int, default=512)
    parser.add_argument("--max_positions", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--print_freq", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "print_freq", "vocab_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be positive; got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    start_time = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(args.seed)
    train_texts = read_captions(os.path.join(args.data_dir, "coco_karpathy_train.json"))
    val_texts = read_captions(os.path.join(args.data_dir, "coco_karpathy_val.json"))

    tokenizer = build_demo_tokenizer(train_texts, args.vocab_size)
    model = build_demo_opt(tokenizer, args.hidden_size, args.num_layers, args.num_heads, args.ffn_dim,
                           args.max_positions, args.dropout).to(device)
    log(f"OPT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, vocabulary {len(tokenizer)}; "
        f"{len(train_texts)} train, {len(val_texts)} val captions")
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      weight_decay=args.weight_decay, no_decay_bias_norm=True, grad_clip=1.0, seed=args.seed)
    first_loss, final_loss = train(model, tokenizer, train_texts, cfg, args.steps, args.print_freq, device)
    val_loss = evaluate_loss(model, tokenizer, val_texts, 256, device)
    log(f"val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.3f}")
    greedy, *sampled = sample_captions(model, tokenizer, 3, args.max_positions - 1, device)
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
