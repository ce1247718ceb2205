"""Benchmarks: training samples/s, evaluation throughput, peak memory and FLOPs of the four jobs, random weights.

    python bench.py --task stage1 --size tiny                            # one case on CPU (or --device cuda)
    python bench.py --task stage1 --size real --device cuda --options train.amp=bf16 model.vit_precision=bf16
    python bench.py --task stage1 --size tiny --staircase --json out.json   # the fast path, one switch at a time
    python bench.py --task stage2 --size real --device cuda --max_batch   # the largest batch that fits
    python -m torch.distributed.run --nproc_per_node=8 bench.py --task stage1 --size real --device cuda
    python bench.py --task stage1 --size base --batch_size 4 --compare c7f367e   # this tree / another, side by side

Tasks: `nlvr` (train: forward + backward + AdamW step; eval: NLVR logits), `stage1` (train), `stage2` (train;
eval: beam-search captions) and `retrieval` (eval: the whole retrieval evaluation of `eval_retrieval.py` over
--num_images synthetic images with 5 texts each). Sizes: `tiny` (the demo configs), `base` and `real` (see SIZES).
The model and its options come from the task's YAML config (the demo config for tiny) with --options applied, so
every fast-path switch is measured as the trainers run it: the steps go through `utils.train_one_epoch`. With
`--options data.vit_feature_cache=DIR` (stage 1, 2) training is fed the frozen encoder's tokens instead of images,
as the feature cache does (reading it from disk is not measured).

Each timing is --reps repetitions of --steps steps after --warmup steps; the median and the spread (min, max) of
samples/s are reported. FLOPs per sample are counted once with `torch.utils.flop_counter.FlopCounterMode` over a
forward + backward (evaluation: a forward), so that on CUDA the model FLOPs utilisation (MFU) is printed against
the GPU's dense bf16 peak (--peak_tflops to set it). Peak memory: CUDA's max allocated; on CPU the process's peak
resident set so far (the staircase runs every case in a fresh process for that reason; a run of both modes
reports the larger peak for its second). Results print as a table and go
to --json as a list of records.

`--compare REF` times this tree against REF, another checkout of the project (a directory, or a git revision that
is checked out into a temporary worktree), in one run: --rounds rounds, each running the case in both trees in fresh
processes, the order alternating, so that drifts of the machine fall on both sides alike. It prints each side's
samples/s and the ratio (this / REF) per round and their median [min, max]. REF runs its own bench.py with the same
arguments (--ref_options in place of --options where config keys were renamed).
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
import typing
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode
from transformers import OPTConfig, OPTForCausalLM

from data.loader import eval_loader
from eval_caption import caption_function, generation_options
from eval_retrieval import RetrievalConfig, retrieval_evaluator
from models import blip2_lm
from models.inference import MODELS
from train_blip2_stage1 import Stage1Config, stage1_loss
from train_blip2_stage2 import Stage2Config, stage2_loss
from train_demo_lm import build_demo_tokenizer
from train_nlvr import NLVRConfig, logits_and_labels, nlvr_loss
from utils import (DTYPES, Autocast, Run, StopSignals, attention_kernels, build_optimizer, init_distributed,
                   is_main_process, load_config, log, run_main, train_state, train_steps)

TASKS = {  # task: (schema, {size: config file}, modes)
    "nlvr": (NLVRConfig, {"tiny": "configs/nlvr_demo.yaml", "base": "configs/nlvr.yaml", "real": "configs/nlvr.yaml"},
             ("train", "eval")),
    "stage1": (Stage1Config, {"tiny": "configs/blip2_stage1_demo.yaml", "base": "configs/blip2_stage1.yaml",
                              "real": "configs/blip2_stage1.yaml"}, ("train",)),
    "stage2": (Stage2Config, {"tiny": "configs/blip2_stage2_demo.yaml", "base": "configs/blip2_stage2.yaml",
                              "real": "configs/blip2_stage2.yaml"}, ("train", "eval")),
    "retrieval": (RetrievalConfig, {"tiny": "configs/blip2_stage1_demo.yaml", "base": "configs/retrieval_coco.yaml",
                                    "real": "configs/retrieval_coco.yaml"}, ("eval",)),
}
# Overrides of the config files per size: weights are random, so nothing is downloaded.
NO_WEIGHTS = {"nlvr": ["model.pretrained=null"],
              "stage1": ["model.pretrained=null", "model.vit_pretrained=null", "model.bert=null"],
              "stage2": ["model.pretrained=null", "model.vit_pretrained=null"],
              "retrieval": ["model.pretrained=null", "model.vit_pretrained=null", "model.bert=null"]}
SIZES = {
    ("nlvr", "base"): ["model.image_size=224"],                                  # ViT-B/16 at 224, BERT-base
    ("stage1", "base"): ["model.vision=clip_vit_L"],                             # CLIP ViT-L/14 at 224, Q-Former
    ("stage2", "base"): ["model.vision=clip_vit_L"],                             # ... with an OPT-125m
    ("retrieval", "base"): ["model.vision=clip_vit_L", "model.image_size=224"],  # COCO-5k sized, CLIP ViT-L/224
}
OPT_SHAPES = {  # hidden, layers, heads, FFN (facebook/opt-125m and facebook/opt-2.7b); vocabulary 50272
    "tiny": (128, 4, 4, 512), "base": (768, 12, 12, 3072), "real": (2560, 32, 32, 10240)}
RETRIEVAL_IMAGES = {"tiny": 500, "base": 5000, "real": 5000}
# The fast path, switch by switch (each step keeps the ones before it); the first entry is the "before". In
# evaluation the bench applies train.attention too (the evaluation scripts always run with "auto").
STAIRCASE = {
    "train": [("baseline: math attention, default AdamW (stage 1: explicit ITG mask)",
               ["train.attention=math", "model.itg_attention=masked", "train.fused_adamw=false",
                "train.compile=false"]),
              ("+ SDPA fused kernels (auto)", ["train.attention=auto"]),
              ("+ ITG bottom-right causal, no mask", ["model.itg_attention=causal"]),
              ("+ fused AdamW", ["train.fused_adamw=true"]),
              ("+ torch.compile", ["train.compile=true"])],
    "eval": [("baseline: math attention", ["train.attention=math"]),
             ("+ SDPA fused kernels (auto)", ["train.attention=auto"])],
}
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
                    "A10G": 70.0}
WORDS = [a + b for a in string.ascii_lowercase[:10] for b in string.ascii_lowercase[:10]]  # one token each
ROOT = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--size", choices=("tiny", "base", "real"), default="tiny")
    parser.add_argument("--mode", choices=("train", "eval", "both"), default="both",
                        help="what to measure (a task's modes: see the docstring)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    parser.add_argument("--batch_size", type=int, help="per process (default: the config's train/eval batch size)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--num_images", type=int, help="retrieval: images (5 texts each); default by size")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides key=value, as the scripts take")
    parser.add_argument("--staircase", action="store_true", help="measure the fast path switch by switch; keys "
                        "set with --options stay as set (e.g. train.compile=false leaves out the compile step)")
    parser.add_argument("--max_batch", action="store_true", help="CUDA: search the largest training batch")
    parser.add_argument("--peak_tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: by name)")
    parser.add_argument("--json", help="write the records to this file (a list; appended to if it exists)")
    parser.add_argument("--compare", metavar="REF", help="time this tree against REF (a directory or git revision)")
    parser.add_argument("--ref_options", nargs="+", help="--compare: REF's options (default: --options)")
    parser.add_argument("--rounds", type=int, default=3, help="--compare: rounds of both sides")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------ inputs

def write_vocab(directory, size):
    """A WordPiece vocab.txt of `size` entries: BERT's specials, WORDS, then unused fillers (the model's vocabulary
    size is what costs, not which words are in it)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    fillers = [f"[unused{i}]" for i in range(max(0, size - len(specials) - len(WORDS)))]
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(specials + WORDS + fillers) + "\n")
    return directory


def random_sentences(generator, count, min_words=8, max_words=16):
    lengths = torch.randint(min_words, max_words + 1, (count,), generator=generator).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (n,), generator=generator).tolist())
            for n in lengths]


def build_config(task, size, options, workdir):
    schema, files, _ = TASKS[task]
    vocab = write_vocab(workdir, 30522 if size != "tiny" else 128)
    overrides = NO_WEIGHTS[task] + SIZES.get((task, size), [])
    if task != "stage2":  # stage 2's OPT and its tokenizer are random_opt's
        overrides.append(f"model.tokenizer={vocab}")
    return load_config(files[size], schema, overrides + list(options))


def random_opt(size, precision, device):
    """(OPTForCausalLM of OPT_SHAPES[size] with random weights, a byte-level BPE tokenizer with OPT's specials)."""
    tokenizer = build_demo_tokenizer([w + "\n" for w in WORDS])
    hidden, layers, heads, ffn = OPT_SHAPES[size]
    config = OPTConfig(vocab_size=50272, hidden_size=hidden, word_embed_proj_dim=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, ffn_dim=ffn, max_position_embeddings=2048,
                       do_layer_norm_before=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device(device):
        model = OPTForCausalLM(config).to(DTYPES[precision])
    return model, tokenizer


def build_model(task, cfg, size, device):
    """(model on `device`, tokenizer) of the config, with random weights: the trainers' create_model (stage 2
    with a random OPT of the size's shape in place of a downloaded one)."""
    if task == "stage2":
        lm = random_opt(size, cfg.model.lm_precision or "fp16", device)
        model, tokenizer = blip2_lm.create_model(cfg.model, lm)
    else:
        model, tokenizer = MODELS[cfg.model.arch].create_model(cfg.model)
    return model.to(device), tokenizer


def train_batch(task, cfg, batch_size, generator):
    size = cfg.model.image_size
    images = torch.randn(batch_size, 3, size, size, generator=generator)
    if task == "nlvr":
        labels = torch.randint(2, (batch_size,), generator=generator)
        return images, torch.randn(batch_size, 3, size, size, generator=generator), \
            random_sentences(generator, batch_size), labels
    image_ids = torch.randperm(batch_size, generator=generator)
    text_input = [cfg.model.prompt if task == "stage2" else ""] * batch_size
    return images, text_input, random_sentences(generator, batch_size), image_ids


def cached_tokens(model, cfg, batch_size, device):
    """What data.vit_feature_cache feeds in place of images: random tokens of the frozen encoder's output shape and
    dtype [B, N, Dv] (reading them from disk is not measured)."""
    size = cfg.model.image_size
    with torch.no_grad():
        shape = model.visual_encoder(torch.zeros(1, 3, size, size, device=device))
    return torch.randn(batch_size, *shape.shape[1:], generator=torch.Generator().manual_seed(0)).to(shape.dtype)


def loss_function(task, cfg, tokenizer, device):
    if task == "nlvr":
        return partial(nlvr_loss, tokenizer=tokenizer, device=device)
    if task == "stage1":
        return partial(stage1_loss, tokenizer=tokenizer, max_txt_len=cfg.model.max_txt_len,
                       same_image_positives=cfg.model.same_image_positives, device=device)
    return partial(stage2_loss, device=device)


class RandomRetrievalSet(Dataset):
    """Random images with 5 random texts each, shaped like data.caption.RetrievalDataset."""

    def __init__(self, num_images, image_size, generator):
        self.images = torch.randn(num_images, 3, image_size, image_size, generator=generator, dtype=torch.bfloat16)
        self.text = random_sentences(generator, 5 * num_images)
        self.img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(num_images)]
        self.txt2img = [t // 5 for t in range(5 * num_images)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].float(), index


# ------------------------------------------------------------------------------------------------ measuring

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def flops_of(fn, model, inference=False):
    """Model FLOPs of `fn()`, counted on the math attention kernel (PyTorch has FLOP formulas for the CUDA fused
    kernels only, not the CPU ones) and the explicit ITG mask (a CausalBias cannot be created under
    FlopCounterMode): the matrix products, hence the count, are the same for every kernel and mask. `inference`:
    the parameters stop requiring grad meanwhile, as the counter's module hooks fail on no_grad views of them."""
    itg_attention = getattr(model, "itg_attention", None)
    trainable = [p for p in model.parameters() if p.requires_grad] if inference else []
    if itg_attention:
        model.itg_attention = "masked"
    for p in trainable:
        p.requires_grad_(False)
    counter = FlopCounterMode(display=False)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH):
            fn()
    finally:
        if itg_attention:
            model.itg_attention = itg_attention
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops()


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def repeated_rates(steps, batch_size, device, args):
    """`steps(n)` runs n steps of `batch_size` samples: after --warmup steps, samples/s of each of --reps repetitions
    of --steps steps, and the peak memory over the repetitions."""
    steps(args.warmup)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(partial(steps, args.steps), device) for _ in range(args.reps)]
    return [args.steps * batch_size / s for s in seconds], peak_memory_mb(device)


def measure_train(task, cfg, model, tokenizer, device, args):
    cfg.train.print_freq = 10 ** 9
    batch_size = args.batch_size or cfg.train.batch_size
    batch = train_batch(task, cfg, batch_size, torch.Generator().manual_seed(0))
    if getattr(cfg.data, "vit_feature_cache", None):
        batch = (cached_tokens(model, cfg, batch_size, device), *batch[1:])
    loss_fn = loss_function(task, cfg, tokenizer, device)
    state = train_state(bench_run(cfg, device), model)
    state.steps_per_epoch = state.total_steps = 10 ** 9

    def steps(n):  # n steps of utils.train_steps, as one epoch of n batches
        state.epoch_batches, state.batches_per_epoch = 0, n
        with contextlib.redirect_stdout(io.StringIO()), StopSignals() as signals:  # the loop's progress lines
            for _ in train_steps(state, [batch] * n, loss_fn, signals):
                pass

    def forward_backward():
        with state.run.autocast():
            loss = loss_fn(model, batch)["loss"]
        loss.backward()
        state.optimizer.zero_grad(set_to_none=True)

    rates, memory = repeated_rates(steps, batch_size, device, args)
    return batch_size, rates, flops_of(forward_backward, model) / batch_size, memory


def measure_eval(task, cfg, model, tokenizer, device, args):
    model.eval()
    generator = torch.Generator().manual_seed(0)
    if task == "retrieval":
        return measure_retrieval(cfg, model, tokenizer, device, args, generator)
    batch_size = args.batch_size or cfg.eval.batch_size
    batch = train_batch(task, cfg, batch_size, generator)
    run = bench_run(cfg, device)
    if task == "nlvr":
        def forward():
            with torch.no_grad(), run.autocast():
                logits_and_labels(model, batch, tokenizer, device)
    else:
        caption = caption_function(model, tokenizer, generation_options(cfg.eval), run)

        def forward():
            with torch.no_grad():
                caption(batch[0])

    def steps(n):
        with attention_kernels(cfg.train.attention):
            for _ in range(n):
                forward()

    rates, memory = repeated_rates(steps, batch_size, device, args)
    return batch_size, rates, flops_of(forward, model, inference=True) / batch_size, memory


def measure_retrieval(cfg, model, tokenizer, device, args, generator):
    """The whole evaluation (ITC features, top-k_test ITM re-ranking, metrics) over a random COCO-shaped split;
    throughput in images/s. FLOPs are not counted (they depend on which pairs the top-k picks)."""
    num_images = args.num_images or RETRIEVAL_IMAGES[args.size]
    dataset = RandomRetrievalSet(num_images, cfg.model.image_size, generator)
    loader = eval_loader(dataset, args.batch_size or cfg.eval.batch_size, num_workers=0)
    evaluate = retrieval_evaluator(tokenizer, bench_run(cfg, device))

    def evaluation():
        with attention_kernels(cfg.train.attention), contextlib.redirect_stdout(io.StringIO()):
            evaluate(model, loader, header="bench")

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(evaluation, device) for _ in range(args.reps)]
    return loader.batch_size, [num_images / s for s in seconds], None, peak_memory_mb(device)


def max_train_batch(task, cfg, model, tokenizer, device, start=8):
    """The largest per-process training batch whose step fits in GPU memory: doubling, then bisection."""
    loss_fn = loss_function(task, cfg, tokenizer, device)
    optimizer, autocast = build_optimizer(model, cfg.train), Autocast(device, cfg.train.amp)

    def fits(batch_size):
        batch = train_batch(task, cfg, batch_size, torch.Generator().manual_seed(0))
        try:
            with attention_kernels(cfg.train.attention), autocast():
                loss = loss_fn(model, batch)["loss"]
            loss.backward()
            optimizer.step()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            loss = None
            torch.cuda.empty_cache()

    low, high = 0, start
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def bench_run(cfg, device):
    """The Run that the training and evaluation functions read their config, device and autocast from (a bench
    has no command line and no output directory)."""
    return Run(None, cfg, device, Autocast(device, cfg.train.amp))


def gpu_peak_tflops(device, given):
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def run_case(args):
    device = init_distributed(args.device)
    torch.manual_seed(0)
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        cfg = build_config(args.task, args.size, args.options, workdir)
        model, tokenizer = build_model(args.task, cfg, args.size, device)
        if args.max_batch:
            return [dict(case(args, device, "train"), max_batch=max_train_batch(args.task, cfg, model, tokenizer,
                                                                                device))]
        modes = TASKS[args.task][2] if args.mode == "both" else [args.mode]
        for mode in modes:
            measure = measure_train if mode == "train" else measure_eval
            batch_size, rates, flops, memory = measure(args.task, cfg, model, tokenizer, device, args)
            records.append(result(args, device, mode, batch_size, rates, flops, memory))
    return records


def case(args, device, mode):
    return {"task": args.task, "size": args.size, "mode": mode, "options": list(args.options),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "processes": int(os.environ.get("WORLD_SIZE", 1)), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}


def result(args, device, mode, batch_size, rates, flops, memory):
    median = statistics.median(rates)
    record = dict(case(args, device, mode), batch_size=batch_size, samples_per_s=round(median, 3),
                  samples_per_s_min=round(min(rates), 3), samples_per_s_max=round(max(rates), 3),
                  reps=args.reps, steps=args.steps, warmup=args.warmup, peak_memory_mb=round(memory, 1),
                  gflops_per_sample=None if flops is None else round(flops / 1e9, 4))
    if flops is not None:
        record["tflops_per_s"] = round(flops * median / 1e12, 4)
        peak = gpu_peak_tflops(device, args.peak_tflops)
        record["mfu"] = round(record["tflops_per_s"] / peak, 4) if peak else None
    return record


def staircase(args):
    """Every step of STAIRCASE for each of the task's modes, each in a fresh process; switches of keys the task's
    config lacks or --options sets are left out."""
    records = []
    modes = TASKS[args.task][2] if args.mode == "both" else [args.mode]
    pinned = {option.split("=", 1)[0] for option in args.options}
    schema = TASKS[args.task][0]
    for mode in modes:
        options = []
        for label, switches in STAIRCASE[mode]:
            keys = [switch.split("=", 1)[0] for switch in switches]
            switches = [s for s, key in zip(switches, keys) if key not in pinned and has_key(schema, key)]
            if options and not switches:
                continue
            options = options + switches
            step = case_in_process(ROOT, [*case_arguments(args), "--mode", mode], [*options, *args.options])
            for record in step:
                record["step"] = label
                print_record(record)
            records += step
    return records


def case_in_process(directory, arguments, options):
    """The records of `directory`'s bench.py run with `arguments` and `options` in a fresh process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "bench.py", *arguments, "--json", out.name]
        command += ["--options", *options] if options else []
        subprocess.run(command, check=True, cwd=directory, stdout=subprocess.DEVNULL)  # records printed by caller
        return json.load(open(out.name))


@contextlib.contextmanager
def checkout(ref):
    """A directory holding `ref`: itself when it is one, else a temporary git worktree of that revision."""
    if os.path.isdir(ref):
        yield os.path.abspath(ref)
        return
    with tempfile.TemporaryDirectory() as parent:
        directory = os.path.join(parent, "ref")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", directory, ref], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            yield directory
        finally:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", directory], check=True)


def compare(args):
    """--rounds rounds of the case in this tree and in --compare's, alternating which goes first; a record per
    round and mode with both sides' records and the ratio of their median samples/s."""
    arguments = [*case_arguments(args), "--mode", args.mode]
    ref_options = args.options if args.ref_options is None else args.ref_options
    records = []
    with checkout(args.compare) as ref_dir:
        for number in range(args.rounds):
            sides = [("this", ROOT, args.options), ("ref", ref_dir, ref_options)]
            ran = {name: case_in_process(directory, arguments, options)
                   for name, directory, options in (sides if number % 2 == 0 else sides[::-1])}
            for this, ref in zip(ran["this"], ran["ref"]):
                records.append({"compare": args.compare, "round": number, "mode": this["mode"], "this": this,
                                "ref": ref, "ratio": round(this["samples_per_s"] / ref["samples_per_s"], 4)})
                log(f"round {number}: {this['task']} {this['size']} {this['mode']}: this "
                    f"{this['samples_per_s']:.2f}, {args.compare} {ref['samples_per_s']:.2f} samples/s, ratio "
                    f"{records[-1]['ratio']:.3f}")
    for mode in dict.fromkeys(r["mode"] for r in records):
        ratios = [r["ratio"] for r in records if r["mode"] == mode]
        log(f"{args.task} {args.size} {mode}: this / {args.compare} = {statistics.median(ratios):.3f} "
            f"[{min(ratios):.3f}, {max(ratios):.3f}] over {len(ratios)} rounds")
    return records


def has_key(schema, dotted):
    """Whether the config schema has the key `section.name` (the ITG switch is stage 1's only)."""
    section, name = dotted.split(".")
    return name in {f.name for f in dataclasses.fields(typing.get_type_hints(schema)[section])}


def case_arguments(args):
    """The command line of one case with the settings of `args` (no --staircase, --mode, --json or --options)."""
    values = {"--task": args.task, "--size": args.size, "--device": args.device, "--batch_size": args.batch_size,
              "--steps": args.steps, "--warmup": args.warmup, "--reps": args.reps, "--num_images": args.num_images,
              "--peak_tflops": args.peak_tflops}
    return [str(item) for flag, value in values.items() if value is not None for item in (flag, value)]


def print_record(record):
    mfu = f"  MFU {100 * record['mfu']:.1f}%" if record.get("mfu") else ""
    flops = f"  {record['gflops_per_sample']:.3f} GFLOP/sample" if record.get("gflops_per_sample") else ""
    extra = f"  max batch {record['max_batch']}" if "max_batch" in record else ""
    log(f"{record['task']:9s} {record['size']:4s} {record['mode']:5s} b={record.get('batch_size', '-')!s:4s} "
        f"{record.get('samples_per_s', 0):10.2f} samples/s [{record.get('samples_per_s_min', 0):.2f}, "
        f"{record.get('samples_per_s_max', 0):.2f}]  peak {record.get('peak_memory_mb', 0):.0f} MB"
        f"{flops}{mfu}{extra}  {record.get('step', ' '.join(record['options']))}")


def main(argv=None):
    args = parse_args(argv)
    if args.max_batch and args.device != "cuda":
        sys.exit("--max_batch searches GPU memory: add --device cuda")
    records = staircase(args) if args.staircase else compare(args) if args.compare else run_case(args)
    if not (args.staircase or args.compare):
        for record in records:
            print_record(record)
    if args.json and is_main_process():
        previous = json.load(open(args.json)) if os.path.exists(args.json) and os.path.getsize(args.json) else []
        with open(args.json, "w") as f:
            json.dump(previous + records, f, indent=1)


if __name__ == "__main__":
    run_main(main)
