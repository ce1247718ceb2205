"""Pieces every entry script shares: distributed setup, config, logging, LR schedule, checkpoints, the train loop.

Small functions, no framework: each script calls them from its own visible `main`.
"""

import argparse
import dataclasses
import datetime
import difflib
import json
import math
import os
import random
import resource
import sys
import time
import types
import typing
from collections import defaultdict, deque
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel


class InputError(Exception):
    """Bad input from the user (config, data, checkpoint); scripts print it without a traceback."""


# --------------------------------------------------------------------------------------------------- distributed

def init_distributed(device_name=None):
    """Join the process group that the launcher describes and return this process's device.

    Launchers: `torch.distributed.run` (RANK, WORLD_SIZE, LOCAL_RANK), SLURM `srun` (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT exported), or none (plain `python script.py`). A world of one
    process creates no process group: every collective below is guarded for that case.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        rank, world_size, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env["SLURM_LOCALID"])
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in env]
        if missing:
            raise InputError(f"SLURM launch without {' and '.join(missing)}: export MASTER_ADDR=$(scontrol show "
                             "hostnames $SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT=29500 before srun")
    else:
        rank, world_size, local_rank = 0, 1, 0

    device_name = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for, but PyTorch sees no GPU; use --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_name)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world_size)
    return device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum of `tensor` over all ranks (in place; a no-op for one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...]."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_no_grad(tensor):
    """cat of `tensor` [B, ...] over ranks along dim 0 -> [W * B, ...], detached (also for one process, so that
    what a loss backpropagates does not depend on the number of processes)."""
    tensor = tensor.detach()
    if not dist.is_initialized():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor):
        gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss may use this rank's slice: sum their gradients, keep this rank's slice.
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(get_world_size())[get_rank()]


def all_gather_with_grad(tensor):
    """cat of `tensor` [B, ...] over ranks along dim 0 -> [W * B, ...]; gradients flow back to each rank's slice."""
    return _AllGatherWithGrad.apply(tensor) if dist.is_initialized() else tensor


def broadcast_from_main(compute):
    """Run `compute()` on rank 0 only and give its result to every rank."""
    result = [compute() if is_main_process() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0]


def wrap_ddp(model, device, cfg):
    """The model as the train loop runs it: in DistributedDataParallel over several processes (never with
    find_unused_parameters: every trainable parameter gets a gradient each step), then torch.compile'd with
    `train.compile`. `model` itself stays eager for evaluation."""
    if cfg.ddp_static_graph and accumulation_steps(cfg) > 1:
        raise InputError("train.ddp_static_graph does not work with gradient accumulation (DDP's static graph "
                         "fails inside no_sync): set train.ddp_static_graph: false, or train.global_batch_size to "
                         "train.batch_size x processes")
    if get_world_size() > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        gradient_as_bucket_view=cfg.ddp_bucket_view, static_graph=cfg.ddp_static_graph)
    return torch.compile(model) if cfg.compile else model


def unwrap(model):
    """The model inside torch.compile's and DistributedDataParallel's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def log(*args):
    """print() on rank 0 only."""
    if is_main_process():
        print(*args, flush=True)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# -------------------------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Optimisation settings shared by every trainer (`train:` in the YAML)."""
    epochs: int = 10
    batch_size: int = 16                      # per process
    global_batch_size: typing.Optional[int] = None  # reached by gradient accumulation; null: batch_size x processes
    lr: float = 1e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    lr_schedule: typing.Literal["cosine_epoch", "cosine"] = "cosine"
    weight_decay: float = 0.05
    no_decay_bias_norm: bool = False          # exclude biases and norm weights from weight decay
    grad_clip: typing.Optional[float] = None  # max global grad norm
    amp: typing.Literal["bf16", "fp16", "off"] = "off"
    seed: int = 42
    print_freq: int = 50
    # The fast path (BENCHMARKS.md measures each switch).
    fused_adamw: bool = False                 # AdamW's fused kernel (CUDA and CPU); off: the for-each/loop one
    attention: typing.Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"  # SDPA kernels in training
    compile: bool = False                     # torch.compile the training forward (evaluation runs eagerly)
    ddp_static_graph: bool = False            # DDP: the same parameters get gradients every step (no accumulation)
    ddp_bucket_view: bool = True              # DDP: gradients are views into the all-reduce buckets (no copy)


def load_config(path, schema, overrides=()):
    """Read the YAML file `path` (YAML 1.2: `3e-5` is a float) into the dataclass `schema`, then apply
    `key=value` overrides (dotted keys, values parsed as YAML). Unknown keys and wrong types raise InputError."""
    cfg = _to_dataclass(schema, read_yaml(path), path, "")
    for item in overrides:
        _apply_override(cfg, item)
    return cfg


def read_yaml(path):
    """The mapping in the YAML file `path` (empty for an empty file)."""
    try:
        with open(path) as f:
            raw = YAML(typ="safe").load(f)
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except YAMLError as e:
        raise InputError(f"{path} is not valid YAML: {e}") from None
    return raw or {}


def config_section(path, key, hint):
    """`key` of the YAML file `path` checked against `hint` (a dataclass or a union of them told apart by their
    `arch`), ignoring the file's other sections."""
    raw = read_yaml(path)
    if not isinstance(raw, dict) or key not in raw:
        raise InputError(f"{path} has no '{key}' section")
    return _check_type(raw[key], hint, path, key)


def start_run(args, schema):
    """The start of every entry script: the config (`--config` with `--options` and `--seed` applied), the process
    group and device, seeded RNGs (seed + rank), and the output directory with the resolved config.yaml.
    Returns (cfg, device)."""
    cfg = load_config(args.config, schema, args.options)
    if args.seed is not None:
        cfg.train.seed = args.seed
    device = init_distributed(args.device)
    seed_everything(cfg.train.seed + get_rank())
    os.makedirs(args.output_dir, exist_ok=True)
    if is_main_process():
        save_config(cfg, os.path.join(args.output_dir, "config.yaml"))
    return cfg, device


def parse_args(description, argv=None, training=True):
    """The command line every entry script shares (`training=False`: the evaluation scripts')."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output_dir", required=True)
    if training:
        parser.add_argument("--evaluate", action="store_true", help="evaluate val and test only")
        parser.add_argument("--checkpoint", help="with --evaluate: the weights to evaluate (default: "
                                                 "output_dir/checkpoint_best.pth, else model.pretrained)")
        parser.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint_last.pth")
    else:
        parser.add_argument("--checkpoint", help="the weights to evaluate (default: model.pretrained)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="overrides train.seed")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.lr=1e-5 data.num_workers=8")
    return parser.parse_args(argv)


def _to_dataclass(schema, raw, source, prefix):
    if not isinstance(raw, dict):
        raise InputError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys to values")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            raise InputError(f"{source}: unknown key '{prefix}{key}'{_suggest(key, fields, prefix)}")
    values = {}
    for name, field in fields.items():
        if name in raw:
            values[name] = _check_type(raw[name], hints[name], source, prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = _to_dataclass(hints[name], {}, source, f"{prefix}{name}.")
            else:
                raise InputError(f"{source}: missing key '{prefix}{name}'")
    return schema(**values)


def _suggest(key, candidates, prefix=""):
    close = difflib.get_close_matches(str(key), list(candidates), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(candidates)}"


def _check_type(value, hint, source, key):
    """`value` converted to `hint` (int accepted for float), or InputError naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _to_dataclass(hint, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        hint = _schema_by_arch(options, value, source, key) if len(options) > 1 else options[0]
        return _check_type(value, hint, source, key)
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{source}: {key} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{source}: {key} must be a list; got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            raise InputError(f"{source}: {key} must be a list of {len(args)} values; got {value!r}")
        item = args[0] if args else typing.Any
        return origin(_check_type(v, item, source, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise InputError(f"{source}: {key} must be {hint.__name__}; got {value!r} ({type(value).__name__})")
    return value


def _schema_by_arch(schemas, value, source, key):
    """The one of `schemas` (dataclasses with an `arch: Literal[name]` field) that `value["arch"]` names."""
    archs = {typing.get_args(typing.get_type_hints(schema)["arch"])[0]: schema for schema in schemas}
    arch = value.get("arch") if isinstance(value, dict) else None
    if arch not in archs:
        raise InputError(f"{source}: {key}.arch must say which model this is, one of {', '.join(archs)}; "
                         f"got {arch!r}")
    return archs[arch]


def _apply_override(cfg, item):
    if "=" not in item:
        raise InputError(f"--options {item}: expected key=value, e.g. train.lr=1e-4")
    key, text = item.split("=", 1)
    where, parts, node = f"--options {item}", key.split("."), cfg
    for i, part in enumerate(parts):
        fields = [f.name for f in dataclasses.fields(node)]
        prefix = "".join(p + "." for p in parts[:i])
        if part not in fields:
            raise InputError(f"{where}: unknown key '{prefix}{part}'{_suggest(part, fields, prefix)}")
        if i < len(parts) - 1:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise InputError(f"{where}: '{prefix}{part}' is a value, not a section")
    value = YAML(typ="safe").load(text) if text.strip() else ""
    setattr(node, parts[-1], _check_type(value, typing.get_type_hints(type(node))[parts[-1]], where, key))


def save_config(cfg, path):
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with open(path, "w") as f:
        yaml.dump(_plain(dataclasses.asdict(cfg)), f)


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------------- logging

class SmoothedValue:
    """A series of values: median and mean over a recent window, and the average over everything."""

    def __init__(self, window=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.values = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value, n=1):
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self):
        return float(np.median(self.values))

    @property
    def avg(self):
        return float(np.mean(self.values))

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def value(self):
        return self.values[-1]

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues and a progress line every `print_freq` iterations (rank 0)."""

    def __init__(self):
        self.meters = defaultdict(SmoothedValue)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def update(self, **values):
        for name, value in values.items():
            self.meters[name].update(float(value))

    def log_every(self, iterable, print_freq, header, samples_per_iter=None, total=None):
        total = len(iterable) if total is None else total
        iter_time, data_time = SmoothedValue(fmt="{avg:.3f}"), SmoothedValue(fmt="{avg:.3f}")
        start = end = time.time()
        for i, item in enumerate(iterable):
            data_time.update(time.time() - end)
            yield item
            iter_time.update(time.time() - end)
            end = time.time()
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.avg * (total - i - 1)))
                parts = [f"{header} [{i + 1}/{total}]", f"eta: {eta}"]
                parts += [f"{name}: {meter}" for name, meter in self.meters.items()]
                if samples_per_iter:
                    parts.append(f"samples/s: {samples_per_iter / max(iter_time.avg, 1e-9):.1f}")
                parts += [f"time: {iter_time}", f"data: {data_time}", f"max mem: {max_memory_mb():.0f} MB"]
                log("  ".join(parts))
            if i == total - 1:
                break
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        log(f"{header} total time: {elapsed} ({(time.time() - start) / max(total, 1):.3f} s / it)")

    def global_averages(self):
        return {name: meter.global_avg for name, meter in self.meters.items()}


def max_memory_mb():
    """Peak GPU memory allocated by PyTorch, or the peak resident memory of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_log(output_dir, stats):
    """One JSON object per epoch in output_dir/log.txt."""
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")


def truncate_log(output_dir, last_epoch):
    """Drop log.txt lines after `last_epoch` (they belong to a run that died before saving its checkpoint), and
    lines without an epoch (the final test results, which the resumed run writes again)."""
    path = os.path.join(output_dir, "log.txt")
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("epoch", math.inf) <= last_epoch]
        with open(path, "w") as f:
            f.writelines(lines)


# --------------------------------------------------------------------------------------------- optimiser & LR

def build_optimizer(model, cfg):
    """AdamW over the trainable parameters; biases and norm weights (1-D tensors) undecayed if asked."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.no_decay_bias_norm:
        groups = [{"params": [p for _, p in params if p.ndim >= 2]},
                  {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in params]}]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused_adamw or None)


def lr_at_step(step, steps_per_epoch, cfg):
    """Learning rate for optimiser step `step` (0-based).

    `cosine`: linear warmup from warmup_lr over warmup_steps, then cosine from lr to min_lr over the other steps.
    `cosine_epoch` (BLIP, LAVIS): constant within an epoch, lr(e) = min + (lr - min) * (1 + cos(pi e / epochs)) / 2;
    warmup (LAVIS) only within epoch 0.
    """
    if cfg.lr_schedule == "cosine_epoch":
        epoch = step // steps_per_epoch
        if epoch == 0 and step < cfg.warmup_steps:
            return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps)
        progress = epoch / cfg.epochs
    else:
        if step < cfg.warmup_steps:
            return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
        decay_steps = max(1, cfg.epochs * steps_per_epoch - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, cfg, steps_per_epoch):
    """A LambdaLR stepped once per optimiser step; its state is the step count."""
    if cfg.lr <= 0:
        raise InputError(f"train.lr must be positive; got {cfg.lr}")
    if steps_per_epoch < 1:
        raise InputError("the train split is smaller than one optimiser step (train.batch_size x processes x "
                         "accumulation steps); lower train.batch_size or train.global_batch_size")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at_step(step, steps_per_epoch, cfg) / cfg.lr)


def accumulation_steps(cfg):
    """Micro-batches per optimiser step so that batch_size x processes x steps == global_batch_size."""
    per_step = cfg.batch_size * get_world_size()
    if cfg.global_batch_size is None:
        return 1
    if cfg.global_batch_size % per_step:
        raise InputError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.batch_size "
                         f"x processes = {cfg.batch_size} x {get_world_size()}; change one of them")
    return cfg.global_batch_size // per_step


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def autocast(device, amp):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}


def attention_kernels(choice):
    """`train.attention`: "auto" lets PyTorch pick (flash, then memory-efficient, then math, as each call allows);
    a named fused kernel is the only one allowed, with math for the calls it cannot take (e.g. flash and a padding
    mask); "math" is the unfused reference."""
    if choice == "auto":
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH] + ([SDPA_BACKENDS[choice]] if choice in SDPA_BACKENDS else []))


def grad_scaler(device, amp):
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


# ---------------------------------------------------------------------------------------------------- train loop

def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg, device, accum_steps=1):
    """One epoch. `loss_fn(model, batch)` returns a dict of scalar losses; its "loss" is minimised, all are logged
    (averaged over ranks). A non-finite loss raises FloatingPointError before any optimiser step uses it."""
    model.train()
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window=1, fmt="{value:.3e}"))
    num_iters = len(loader) // accum_steps * accum_steps  # a trailing partial accumulation group is dropped
    samples_per_iter = cfg.batch_size * get_world_size()
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(logger.log_every(loader, cfg.print_freq, f"Train epoch {epoch}", samples_per_iter,
                                               total=num_iters)):
        is_step = (i + 1) % accum_steps == 0
        sync = nullcontext() if is_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync, attention_kernels(cfg.attention):
            with autocast(device, cfg.amp):
                losses = loss_fn(model, batch)
            scaler.scale(losses["loss"] / accum_steps).backward()
        values = all_reduce_sum(torch.stack([v.detach().float() for v in losses.values()])) / get_world_size()
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"non-finite loss at epoch {epoch}, iteration {i}: "
                                     + ", ".join(f"{k}={v:.4g}" for k, v in zip(losses, values.tolist())))
        logger.update(lr=optimizer.param_groups[0]["lr"], **dict(zip(losses, values.tolist())))
        if is_step:
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    return logger.global_averages()


# ------------------------------------------------------------------------------------------- seeds & checkpoints

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state():
    """This process's RNG states as plain types and tensors (loadable with weights_only=True)."""
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"],
                       "gauss": np_state["gauss"]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(state, path):
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint_file(url_or_path):
    """A checkpoint dict from a local path or a URL (downloaded once into torch.hub's cache), tensors on CPU."""
    if url_or_path.startswith(("http://", "https://", "file://")):
        try:
            return torch.hub.load_state_dict_from_url(url_or_path, map_location="cpu", weights_only=True,
                                                      check_hash=False)
        except OSError as e:
            raise InputError(f"cannot download checkpoint {url_or_path}: {e}. Download it elsewhere and set the "
                             "config to the local file's path") from None
    if not os.path.isfile(url_or_path):
        raise InputError(f"checkpoint {url_or_path} does not exist (a local file path or an http(s) URL is "
                         "expected)")
    return torch.load(url_or_path, map_location="cpu", weights_only=True)


def training_state(model, optimizer, scheduler, scaler, epoch, best_metric, cfg):
    """Everything `--resume` needs to continue exactly: call on every rank (it gathers their RNG states)."""
    return {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
            "step": scheduler.last_epoch, "best_metric": best_metric, "rng": all_gather_object(get_rng_state()),
            "config": _plain(dataclasses.asdict(cfg))}


def restore_training_state(ckpt, model, optimizer, scheduler, scaler):
    """Load a `training_state` dict; returns (first epoch to run, best metric so far)."""
    unwrap(model).load_state_dict(ckpt["model"])
    # The config's train.fused_adamw, not the checkpoint's: set before loading, which places the state by it.
    for saved, group in zip(ckpt["optimizer"]["param_groups"], optimizer.param_groups):
        saved["fused"] = group["fused"]
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    if len(ckpt["rng"]) == get_world_size():
        set_rng_state(ckpt["rng"][get_rank()])
    else:
        log(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, this run has "
            f"{get_world_size()}; RNG streams are reseeded, so the data order will differ from an unbroken run")
        seed_everything(ckpt["config"]["train"]["seed"] + get_rank() + ckpt["epoch"] + 1)
    return ckpt["epoch"] + 1, ckpt["best_metric"]


# ------------------------------------------------------------------------------------------- trainer plumbing

def weights_to_evaluate(args, pretrained):
    """The weights to evaluate: --checkpoint, else (a trainer's --evaluate) output_dir/checkpoint_best.pth, else
    model.pretrained."""
    best = os.path.join(args.output_dir, "checkpoint_best.pth")
    weights = args.checkpoint or (best if getattr(args, "evaluate", False) and os.path.exists(best) else pretrained)
    if weights is None:
        raise InputError("evaluation needs weights: pass --checkpoint or set model.pretrained")
    return weights


def write_evaluation(output_dir, results):
    """Print `results` {split: {metric: value}} as a table and write them to output_dir/evaluate.txt as one JSON
    object {"<split>_<metric>": value}."""
    stats = flat_metrics(results)
    log(metrics_table(results))
    if is_main_process():
        with open(os.path.join(output_dir, "evaluate.txt"), "w") as f:
            f.write(json.dumps(stats) + "\n")


def flat_metrics(results):
    """{split: {metric: value}} -> {"<split>_<metric>": value}, the keys of evaluate.txt and log.txt."""
    return {f"{split}_{name}": value for split, metrics in results.items() for name, value in metrics.items()}


def metrics_table(results):
    """{row: {column: number}} -> a text table, a row per key, a column per metric (floats to 4 decimals)."""
    columns = list(dict.fromkeys(name for metrics in results.values() for name in metrics))
    width = {name: max(len(name), 9) for name in columns}
    first = max([len(str(row)) for row in results] + [5])
    lines = [" " * first + "".join(f"  {name:>{width[name]}}" for name in columns)]
    for row, metrics in results.items():
        cells = [_cell(metrics.get(name, ""), width[name]) for name in columns]
        lines.append(f"{row!s:<{first}}" + "".join(f"  {cell}" for cell in cells))
    return "\n".join(lines)


def _cell(value, width):
    return f"{value:>{width}.4f}" if isinstance(value, float) else f"{value!s:>{width}}"


def resume_training(output_dir, model, optimizer, scheduler, scaler):
    """Restore output_dir/checkpoint_last.pth; returns (first epoch to run, best metric so far). log.txt lines of
    later epochs (a run that died before saving) are dropped."""
    path = os.path.join(output_dir, "checkpoint_last.pth")
    if not os.path.exists(path):
        raise InputError(f"--resume: {path} does not exist; run without --resume to start afresh")
    start_epoch, best_metric = restore_training_state(load_checkpoint_file(path), model, optimizer, scheduler, scaler)
    log(f"resumed from {path} at epoch {start_epoch}")
    if is_main_process():
        truncate_log(output_dir, start_epoch - 1)
    return start_epoch, best_metric


def start_training(args, model, loader, cfg, device):
    """The optimisation state for `cfg` (a TrainConfig) over `loader`, restored from output_dir/checkpoint_last.pth
    with --resume: (accumulation steps, AdamW, LR scheduler, grad scaler, first epoch, best metric so far)."""
    accum = accumulation_steps(cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(loader) // accum)
    scaler = grad_scaler(device, cfg.amp)
    start_epoch, best_metric = 0, -math.inf
    if args.resume:
        start_epoch, best_metric = resume_training(args.output_dir, model, optimizer, scheduler, scaler)
    return accum, optimizer, scheduler, scaler, start_epoch, best_metric


def load_best_weights(output_dir, model):
    """Load output_dir/checkpoint_best.pth into `model`; returns its epoch."""
    best = load_checkpoint_file(os.path.join(output_dir, "checkpoint_best.pth"))
    model.load_state_dict(best["model"])
    return best["epoch"]


def train_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg, device, accum_steps, output_dir):
    """train_one_epoch, with a diverged loss explained in terms of the checkpoints on disk."""
    loader.sampler.set_epoch(epoch)
    try:
        return train_one_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, epoch, cfg, device, accum_steps)
    except FloatingPointError as e:
        last = os.path.join(output_dir, "checkpoint_last.pth")
        kept = f"{last} (epoch {epoch - 1}) is left as it was" if epoch else "no checkpoint was written"
        raise FloatingPointError(f"{e}. Training stopped; {kept}. Lower train.lr, set train.grad_clip, or use "
                                 "train.amp: bf16 in place of fp16") from None


def end_epoch(output_dir, stats, improved, best_extra, model, optimizer, scheduler, scaler, epoch, best_metric, cfg):
    """Save checkpoint_last.pth (everything --resume needs) and, when `improved`, checkpoint_best.pth (weights,
    epoch, config and `best_extra`); append `stats` to log.txt. Call on every rank."""
    state = training_state(model, optimizer, scheduler, scaler, epoch, best_metric, cfg)
    if is_main_process():
        if improved:
            save_checkpoint({"model": state["model"], "epoch": epoch, **best_extra, "config": state["config"]},
                            os.path.join(output_dir, "checkpoint_best.pth"))
        save_checkpoint(state, os.path.join(output_dir, "checkpoint_last.pth"))
        append_log(output_dir, stats)
    log(json.dumps(stats))
    barrier()


def run_main(main):
    """Call `main()`; bad input (exit status 2) and a diverged loss (status 1) end with a message, no traceback."""
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    finally:
        cleanup_distributed()
