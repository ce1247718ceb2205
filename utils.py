"""What every entry script shares, in the order a run uses it.

    args = parse_args(__doc__, argv)
    with start_run(args, Schema) as run:                # config, process group, seeds, locked output directory
        model, tokenizer = create_model(run.cfg.model)  # the architecture and its external frozen parts
        state = start_training(run, model, load_checkpoint, init)   # weights by one rule, optimizer, resume
        fit(state, train_loader(...), loss_fn, validate, "val_acc") # epochs or steps, evaluation, checkpoints
    # evaluation scripts: load_checkpoint(model, evaluation_weights(run)); write_evaluation(run, results)

Small functions over two objects, `Run` (one invocation) and `TrainState` (what a training run carries from step
to step), and no framework: each script calls them from its own visible `main`.
"""

import argparse
import collections
import dataclasses
import datetime
import difflib
import glob
import json
import math
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import sys
import time
import types
import typing
from collections import defaultdict, deque
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter


class InputError(Exception):
    """Bad input from the user (config, data, checkpoint, command line): one line, exit status 2."""


class RunError(Exception):
    """The run cannot go on for a reason outside the input (a full disk): one line, exit status 1."""


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived; the step it arrived in was finished and checkpointed: exit status 75."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "try again later", what a requeue script tests for


# --------------------------------------------------------------------------------------------------- distributed

def init_distributed(device_name=None, local_rank=None, timeout_s=1800):
    """Join the process group that the launcher describes and return this process's device.

    Launchers: `torch.distributed.run` (RANK, WORLD_SIZE, LOCAL_RANK), `torch.distributed.launch` (the same, plus
    `--local-rank` on the command line, passed here as `local_rank`), SLURM `srun` (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT exported), or none (plain `python script.py`). A world of one
    process creates no process group: every collective below is guarded for that case. Collectives wait at most
    `timeout_s` for a rank that hangs.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        env_local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None
        if local_rank is not None and env_local is not None and local_rank != env_local:
            raise InputError(f"--local-rank {local_rank} disagrees with LOCAL_RANK={env_local} in the environment; "
                             "pass one of them, or the same value")
        local_rank = next(r for r in (env_local, local_rank, 0) if r is not None)
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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
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


def all_reduce_max(tensor):
    """Maximum of `tensor` over all ranks (in place; a no-op for one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
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


def all_gather_with_grad(tensor):
    """cat of `tensor` [B, ...] over ranks along dim 0 -> [W * B, ...]; each rank's slice gets the gradients that
    every rank's loss sends it (summed)."""
    return torch.cat(dist_nn.all_gather(tensor)) if dist.is_initialized() else tensor


def broadcast_from_main(compute):
    """Run `compute()` on rank 0 only and give its result to every rank."""
    result = [compute() if is_main_process() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(result, src=0)
    return result[0]


def raise_on_every_rank(compute):
    """Run `compute()` on rank 0; an InputError it raises is raised on every rank (none waits for rank 0 at the next
    collective), its result is returned on rank 0."""
    def guarded():
        try:
            return None, compute()
        except InputError as e:
            return str(e), None
    problem, result = broadcast_from_main(guarded)
    if problem:
        raise InputError(problem)
    return result


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


def log_parameters(model, name):
    """One line: the model's parameters and how many of them train, in millions."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"{name}: {total / 1e6:.1f} M parameters, {trainable / 1e6:.1f} M trainable")


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------- precision

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Precision = typing.Literal["fp32", "bf16", "fp16"]


class Autocast:
    """`train.amp` on a device, made once per run: `with autocast():` runs its block under torch.autocast (bf16,
    fp16) or as it is (fp32); `autocast.dtype` is the dtype activations are computed in."""

    def __init__(self, device, amp):
        self.device_type, self.amp, self.dtype = device.type, amp, DTYPES[amp]

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.amp != "fp32" else nullcontext()


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}


def attention_kernels(choice):
    """`train.attention`: "auto" lets PyTorch pick (flash, then memory-efficient, then math, as each call allows);
    a named fused kernel is the only one allowed, with math for the calls it cannot take (e.g. flash and a padding
    mask); "math" is the unfused reference."""
    if choice == "auto":
        return nullcontext()
    return sdpa_kernel([SDPBackend.MATH] + ([SDPA_BACKENDS[choice]] if choice in SDPA_BACKENDS else []))


# -------------------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Range:
    """A bound on a config number, declared with its field (`Annotated[int, Range(1)]`): `low` <= value (< with
    `low_open`), value <= `high`. Calling it gives the problem with a value, or None."""
    low: typing.Optional[float] = None
    high: typing.Optional[float] = None
    low_open: bool = False

    def __call__(self, value):
        if value is None:
            return None
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'greater than' if self.low_open else 'at least'} {self.low}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high}"
        return None


def increasing_within(low, high):
    """A check of a [a, b] pair: low < a <= b <= high (a crop-scale range)."""
    def check(pair):
        return None if low < pair[0] <= pair[1] <= high else f"must be [a, b] with {low} < a <= b <= {high}"
    return check


Count = typing.Annotated[int, Range(1)]                  # a size or number of things: at least 1
Workers = typing.Annotated[int, Range(0)]                 # 0 or more
NonNegative = typing.Annotated[float, Range(0)]
PositiveFloat = typing.Annotated[float, Range(0, low_open=True)]
UnitRange = typing.Annotated[tuple[float, float], increasing_within(0, 1)]
UnitInterval = typing.Annotated[float, Range(0, 1)]


def check_patches(image_size, patch_size):
    """validate() of model sections: the image is cut into whole patches (else the last pixels are dropped)."""
    if image_size % patch_size:
        return (f"image_size {image_size} is not a multiple of patch_size {patch_size}: the last "
                f"{image_size % patch_size} pixels would be dropped; use {image_size // patch_size * patch_size} or "
                f"{(image_size // patch_size + 1) * patch_size}")
    return None


def check_new_tokens(cfg):
    """validate() of generation sections: min_new_tokens <= max_new_tokens."""
    if cfg.min_new_tokens > cfg.max_new_tokens:
        return (f"min_new_tokens ({cfg.min_new_tokens}) exceeds max_new_tokens ({cfg.max_new_tokens}); lower it or "
                "raise max_new_tokens")
    return None


@dataclass
class TrainConfig:
    """Optimisation settings shared by every trainer (`train:` in the YAML)."""
    epochs: Count = 10
    max_steps: typing.Optional[Count] = None  # plan the run in optimiser steps instead (train.epochs is then unused)
    batch_size: Count = 16                    # per process
    global_batch_size: typing.Optional[Count] = None  # reached by gradient accumulation; null: batch_size x processes
    lr: PositiveFloat = 1e-4
    min_lr: NonNegative = 0.0
    warmup_steps: Workers = 0
    warmup_lr: NonNegative = 0.0
    lr_schedule: typing.Literal["cosine_epoch", "cosine"] = "cosine"
    weight_decay: NonNegative = 0.05
    no_decay_bias_norm: bool = False          # exclude biases and norm weights from weight decay
    grad_clip: typing.Optional[PositiveFloat] = None  # max global grad norm
    amp: Precision = "fp32"                   # autocast dtype; weights, optimizer state and losses stay fp32
    seed: int = 42
    print_freq: Count = 50
    save_every_steps: typing.Optional[Count] = None  # checkpoint_last.pth also every N steps (besides epoch ends)
    eval_every_steps: typing.Optional[Count] = None  # validation also every N steps (besides epoch ends)
    dist_timeout_s: Count = 1800              # how long collectives wait for a rank that hangs
    tensorboard: bool = False                 # also write the step records to output_dir/tensorboard/
    # The fast path (BENCHMARKS.md measures each switch).
    # AdamW's fused kernel, faster on CPU and CUDA; false: torch's default AdamW as the original code builds it
    # (for-each on CUDA, per tensor on CPU; the same update rounded otherwise: bit-identical replays of BLIP/LAVIS)
    fused_adamw: bool = True
    attention: typing.Literal["auto", "flash", "efficient", "cudnn", "math"] = "auto"  # SDPA kernels in training
    compile: bool = False                     # torch.compile the training forward (evaluation runs eagerly)
    ddp_static_graph: bool = False            # DDP: the same parameters get gradients every step (no accumulation)
    ddp_bucket_view: bool = True              # DDP: gradients are views into the all-reduce buckets (no copy)


def load_config(path, schema, overrides=()):
    """Read the YAML file `path` (YAML 1.2: `3e-5` is a float) into the dataclass `schema`, then apply
    `key=value` overrides (dotted keys, values parsed as YAML). Unknown keys and wrong types raise InputError."""
    raw = read_yaml(path)
    _refuse_foreign(raw, schema, path)
    cfg = _to_dataclass(schema, raw, path, "")
    for item in overrides:
        _apply_override(cfg, item)
    _validate(cfg, path, "")
    return cfg


# Which scripts read the configs of each model.arch (for a config given to another script).
ARCH_SCRIPTS = {"blip_nlvr": "train_nlvr.py",
                "blip2_qformer": "train_blip2_stage1.py, eval_retrieval.py or eval_caption.py",
                **{arch: "train_blip2_stage2.py, eval_caption.py or eval_vqa.py" for arch in (
                    "blip2_opt", "blip2_llm", "blip2_llm_instruct", "blip2_t5", "blip2_t5_instruct")}}
# The keys of the original BLIP and LAVIS configs, and where they go here.
BLIP_KEYS = {"image_root": "data.image_root", "ann_root": "data.train_file, val_file, test_file (or data.train)",
             "pretrained": "model.pretrained", "vit": "model.vit", "image_size": "model.image_size",
             "vit_grad_ckpt": "model.vit_grad_ckpt", "vit_ckpt_layer": "model.vit_ckpt_layer",
             "batch_size_train": "train.batch_size", "batch_size": "train.batch_size",
             "batch_size_test": "eval.batch_size", "init_lr": "train.lr", "min_lr": "train.min_lr",
             "weight_decay": "train.weight_decay", "max_epoch": "train.epochs", "num_beams": "eval.num_beams",
             "max_length": "eval.max_new_tokens", "min_length": "eval.min_new_tokens", "prompt": "model.prompt",
             "k_test": "eval.k_test"}
LAVIS_KEYS = {"run.init_lr": "train.lr", "run.min_lr": "train.min_lr", "run.warmup_lr": "train.warmup_lr",
              "run.warmup_steps": "train.warmup_steps", "run.weight_decay": "train.weight_decay",
              "run.max_epoch": "train.epochs", "run.batch_size_train": "train.batch_size",
              "run.batch_size_eval": "eval.batch_size", "run.seed": "train.seed", "run.amp": "train.amp",
              "run.lr_sched: linear_warmup_cosine_lr": "train.lr_schedule: cosine_epoch",
              "model.arch (blip2, blip2_opt, blip2_t5, blip2_vicuna_instruct, ...)":
                  "model.arch (blip2_qformer, blip2_opt, blip2_t5, blip2_llm_instruct, ...)",
              "model.num_query_token": "model.num_query_tokens",
              "model.opt_model / t5_model / llm_model": "model.lm", "model.pretrained": "model.pretrained",
              "datasets.<name>.build_info.annotations": "data.train ({ann_file, image_root}), data.val_file"}


def _refuse_foreign(raw, schema, path):
    """InputError, before any key is read, for a config of the original BLIP or LAVIS code (with the keys' places
    here), and for a config whose model.arch another script reads."""
    if not isinstance(raw, dict):
        return
    blip = [key for key in raw if key in BLIP_KEYS or key in ("max_epoch", "ann_root")]
    if {"run", "datasets"} & set(raw) or (blip and not {"train", "data"} & set(raw)):
        origin, table = ("LAVIS", LAVIS_KEYS) if {"run", "datasets"} & set(raw) else ("BLIP", BLIP_KEYS)
        mapping = "; ".join(f"{theirs} -> {ours}" for theirs, ours in table.items()
                            if origin == "LAVIS" or theirs in raw)
        raise InputError(f"{path} is a config of the original {origin} code, not of this project (sections model, "
                         f"data, train, eval). Its keys go here: {mapping}. Start from the config of configs/ for the "
                         "same task and copy the values over")
    hints = typing.get_type_hints(schema)
    arch = raw.get("model", {}).get("arch") if isinstance(raw.get("model"), dict) else None
    if "model" not in hints or arch is None:
        return
    models = typing.get_args(hints["model"]) or (hints["model"],)
    archs = [arch for m in models if dataclasses.is_dataclass(m)
             for arch in typing.get_args(typing.get_type_hints(m)["arch"])]
    if arch not in archs and arch in ARCH_SCRIPTS:
        raise InputError(f"{path} is a config of model.arch {arch}, which {ARCH_SCRIPTS[arch]} reads; this script "
                         f"reads model.arch {', '.join(archs)}")


def _validate(cfg, source, prefix):
    """Checks across a section's keys (its `validate()` returns the problem, or None), after the overrides."""
    problem = cfg.validate() if hasattr(cfg, "validate") else None
    if problem:
        raise InputError(f"{source}: {prefix}{problem}")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if dataclasses.is_dataclass(item):
                _validate(item, source, f"{prefix}{f.name}{f'[{i}]' if isinstance(value, list) else ''}.")


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


def _to_dataclass(schema, raw, source, prefix):
    if not isinstance(raw, dict):
        raise InputError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys to values")
    hints = typing.get_type_hints(schema, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in fields:
            raise InputError(f"{source}: unknown key '{prefix}{key}'{_suggest(key, fields, prefix)}")
    values = {}
    for name, field_ in fields.items():
        if name in raw:
            values[name] = _check_type(raw[name], hints[name], source, prefix + name)
        elif field_.default is dataclasses.MISSING and field_.default_factory is dataclasses.MISSING:
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
    if origin is typing.Annotated:
        value = _check_type(value, args[0], source, key)
        for check in hint.__metadata__:
            problem = check(value)
            if problem:
                raise InputError(f"{source}: {key} {problem}; got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _to_dataclass(hint, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) > 1 and all(dataclasses.is_dataclass(o) for o in options):
            return _check_type(value, _pick_schema(options, value, source, key), source, key)
        for option in options[:-1]:  # the first that fits, else the last one's error
            with suppress(InputError):
                return _check_type(value, option, source, key)
        return _check_type(value, options[-1], source, key)
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


def _pick_schema(schemas, value, source, key):
    """The one of `schemas` (dataclasses) that `value` is: the one whose `arch` Literal names value["arch"] when they
    have an `arch` field (model sections), else the one whose required keys `value` has (data sources)."""
    hints = [typing.get_type_hints(schema) for schema in schemas]
    if all("arch" in h for h in hints):
        archs = {arch: schema for schema, h in zip(schemas, hints) for arch in typing.get_args(h["arch"])}
        arch = value.get("arch") if isinstance(value, dict) else None
        if arch not in archs:
            raise InputError(f"{source}: {key}.arch must say which model this is, one of {', '.join(archs)}; "
                             f"got {arch!r}")
        return archs[arch]
    required = {schema: [f.name for f in dataclasses.fields(schema) if f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING] for schema in schemas}
    fitting = [schema for schema, names in required.items() if isinstance(value, dict) and set(names) <= set(value)]
    if len(fitting) != 1:
        kinds = "; or ".join(f"{schema.__name__} (with {', '.join(names)})" for schema, names in required.items())
        raise InputError(f"{source}: {key} must be one of {kinds}; got {value!r:.200}")
    return fitting[0]


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
    setattr(node, parts[-1], _check_type(value, typing.get_type_hints(type(node), include_extras=True)[parts[-1]],
                                         where, key))


def save_config(cfg, path):
    yaml = YAML(typ="safe")
    yaml.default_flow_style = False
    with open(path, "w") as f:
        yaml.dump(config_dict(cfg), f)


def config_dict(cfg):
    """A config dataclass as plain dicts, lists and scalars (what checkpoints and config.yaml hold)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _flat(obj, prefix=""):
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4} (lists stay values)."""
    if not isinstance(obj, dict):
        return {prefix[:-1]: obj}
    return {key: value for name, item in obj.items() for key, value in _flat(item, f"{prefix}{name}.").items()}


# ----------------------------------------------------------------------------------------------------------- run

def parse_args(description, argv=None, training=True):
    """The command line every entry script shares (`training=False`: the evaluation scripts')."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--output_dir", required=True)
    if training:
        parser.add_argument("--evaluate", action="store_true", help="evaluate val and test only")
        parser.add_argument("--checkpoint", help="with --evaluate: the weights to evaluate (default: "
                                                 "output_dir/checkpoint_best.pth, else model.pretrained)")
        parser.add_argument("--resume", nargs="?", const="yes", choices=["yes", "auto"],
                            help="continue from output_dir/checkpoint_last.pth; `--resume auto` starts afresh when "
                                 "there is none (one command line for the first start and every requeue)")
        parser.add_argument("--allow_changes", nargs="+", default=[], metavar="KEY",
                            help="with --resume: config keys that may differ from the checkpoint's, e.g. train.lr")
    else:
        parser.add_argument("--checkpoint", help="the weights to evaluate (default: model.pretrained)")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    parser.add_argument("--seed", type=int, help="overrides train.seed")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.lr=1e-5 data.num_workers=8")
    parser.add_argument("--local-rank", "--local_rank", type=int, dest="local_rank",
                        help=argparse.SUPPRESS)  # set by torch.distributed.launch
    args = parser.parse_args(argv)
    args.trainer = training
    if not training:
        args.evaluate, args.resume, args.allow_changes = True, None, []
    if args.allow_changes and not args.resume:
        raise InputError("--allow_changes only applies to --resume")
    return args


@dataclass
class Run:
    """One invocation of an entry script: its arguments, config, device and autocast, and the output directory,
    which it holds locked (see `OutputLock`) until the `with` block ends."""
    args: argparse.Namespace
    cfg: typing.Any
    device: torch.device
    autocast: Autocast
    lock: typing.Optional["OutputLock"] = None

    @property
    def output_dir(self):
        return self.args.output_dir

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lock:
            self.lock.release()


def start_run(args, schema):
    """The start of every entry script: the config (`--config` with `--options` and `--seed` applied), the process
    group and device, the output directory (locked by rank 0), seeded RNGs (seed + rank). Evaluation runs write
    the resolved config to output_dir/evaluate_config.yaml; training runs write config.yaml in start_training,
    once a resumed run's config has been checked against its checkpoint's."""
    cfg = load_config(args.config, schema, args.options)
    if args.seed is not None:
        cfg.train.seed = args.seed
    device = init_distributed(args.device, args.local_rank, cfg.train.dist_timeout_s)
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise InputError(f"--output_dir {args.output_dir} is a file, not a directory; name a directory")
    os.makedirs(args.output_dir, exist_ok=True)
    lock = OutputLock(args.output_dir)
    raise_on_every_rank(lock.acquire)
    run = Run(args, cfg, device, Autocast(device, cfg.train.amp), lock if is_main_process() else None)
    seed_everything(cfg.train.seed + get_rank())
    if args.evaluate and is_main_process():
        save_config(cfg, os.path.join(args.output_dir, "evaluate_config.yaml"))
    return run


class OutputLock:
    """output_dir/run.lock, held by rank 0 of the run that writes there: {"host", "pid", "started", "job",
    "command"}. A second run on the directory is refused naming the holder; a lock left by a process that is gone
    (same host, pid not running) or by an earlier attempt of the same SLURM job (a requeue) is taken over."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, "run.lock")
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": datetime.datetime.now().isoformat(timespec="seconds"),
                   "job": os.environ.get("SLURM_JOB_ID"), "command": " ".join(sys.argv)}

    def acquire(self):
        for _ in range(3):  # another run may take over a stale lock at the same time: look again
            try:
                with open(self.path, "x") as f:
                    json.dump(self.me, f)
                return
            except FileExistsError:
                holder = self._holder()
            if holder is not None and not self._stale(holder):
                raise InputError(f"{os.path.dirname(self.path)} is in use by another run (host {holder.get('host')}, "
                                 f"pid {holder.get('pid')}, started {holder.get('started')}: "
                                 f"{holder.get('command', '')[:200]}). Wait for it to end or use another "
                                 f"--output_dir; if that run is gone (its machine died), delete {self.path}")
            log(f"warning: taking over {self.path}, left by {self._describe(holder)}")
            with suppress(FileNotFoundError):
                os.remove(self.path)
        raise InputError(f"could not lock {self.path}: other runs keep taking it; start one run per --output_dir")

    def release(self):
        if self._holder() == self.me:
            with suppress(FileNotFoundError):
                os.remove(self.path)

    def _holder(self):
        try:
            with open(self.path) as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else None
        except (FileNotFoundError, ValueError):
            return None  # gone meanwhile, or half written by a process that died: stale

    def _stale(self, holder):
        if holder.get("job") and holder.get("job") == self.me["job"]:
            return True  # an earlier attempt of this SLURM job: a requeued job may start on another node
        if holder.get("host") != self.me["host"]:
            return False
        try:
            os.kill(int(holder.get("pid", -1)), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    @staticmethod
    def _describe(holder):
        if holder is None:
            return "an unreadable lock file"
        return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')}), which is gone"


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
        self.paused = 0.0  # seconds of the current item that its consumer spent on other work (not timed)

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def update(self, **values):
        for name, value in values.items():
            self.meters[name].update(float(value))

    def log_every(self, iterable, print_freq, header, samples_per_iter=None, total=None, start=0):
        """Yield the items of `iterable`, printing progress; `start` items were done before (a resumed epoch)."""
        total = len(iterable) + start if total is None else total
        iter_time, data_time = SmoothedValue(fmt="{avg:.3f}"), SmoothedValue(fmt="{avg:.3f}")
        begin = end = time.time()
        for i, item in enumerate(iterable, start):
            data_time.update(time.time() - end)
            self.paused = 0.0
            yield item
            iter_time.update(time.time() - end - self.paused)
            end = time.time()
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.avg * (total - i - 1)))
                parts = [f"{header} [{i + 1}/{total}]", f"eta: {eta}"]
                parts += [f"{name}: {meter}" for name, meter in self.meters.items()]
                if samples_per_iter:
                    parts.append(f"samples/s: {samples_per_iter / max(iter_time.avg, 1e-9):.1f}")
                parts += [f"time: {iter_time}", f"data: {data_time}", f"max mem: {max_memory_mb():.0f} MB"]
                log("  ".join(parts))
            if i >= total - 1:
                break
        done = max(iter_time.count, 1)
        log(f"{header} total time: {datetime.timedelta(seconds=int(time.time() - begin))} "
            f"({(time.time() - begin) / done:.3f} s / it)")

    def global_averages(self):
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def totals(self):
        """{name: [total, count]}: what a checkpoint keeps of an unfinished epoch's averages."""
        return {name: [meter.total, meter.count] for name, meter in self.meters.items()}

    def restore_totals(self, totals):
        for name, (total, count) in totals.items():
            self.meters[name].total, self.meters[name].count = total, count


def max_memory_mb():
    """Peak GPU memory allocated by PyTorch, or the peak resident memory of this process on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_log(output_dir, stats):
    """One JSON object per line in output_dir/log.txt (rank 0)."""
    if is_main_process():
        with open(os.path.join(output_dir, "log.txt"), "a") as f:
            f.write(json.dumps(stats) + "\n")
            f.flush()
            os.fsync(f.fileno())
    log(json.dumps(stats))


def truncate_log(output_dir, last_step):
    """Drop the log.txt and train_steps.jsonl lines after optimizer step `last_step` (written by a run that died
    before checkpointing that step, which the resumed run writes again), and lines without a step (the final test
    results, likewise)."""
    for name in ("log.txt", "train_steps.jsonl"):
        _truncate_records(os.path.join(output_dir, name), last_step)


def _truncate_records(path, last_step):
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", math.inf) <= last_step]
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


def total_steps(cfg, steps_per_epoch):
    """Optimiser steps of the whole run: train.max_steps, else train.epochs x steps per epoch."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def lr_at_step(step, steps_per_epoch, cfg):
    """Learning rate for optimiser step `step` (0-based).

    `cosine`: linear warmup from warmup_lr over warmup_steps, then cosine from lr to min_lr over the other steps of
    the run (`total_steps`). `cosine_epoch` (BLIP, LAVIS): constant within an epoch,
    lr(e) = min + (lr - min) * (1 + cos(pi e / epochs)) / 2; warmup (LAVIS) only within epoch 0.
    """
    if cfg.lr_schedule == "cosine_epoch":
        epoch = step // steps_per_epoch
        if epoch == 0 and step < cfg.warmup_steps:
            return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps)
        progress = epoch / cfg.epochs
    else:
        if step < cfg.warmup_steps:
            return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
        decay_steps = max(1, total_steps(cfg, steps_per_epoch) - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(cfg, steps_per_epoch):
    """InputError for a schedule that cannot run: no step per epoch, a non-positive LR, cosine_epoch by steps."""
    if cfg.lr <= 0:
        raise InputError(f"train.lr must be positive; got {cfg.lr}")
    if steps_per_epoch < 1:
        raise InputError("the train split is smaller than one optimiser step (train.batch_size x processes x "
                         "accumulation steps); lower train.batch_size or train.global_batch_size")
    if cfg.max_steps is not None and cfg.lr_schedule == "cosine_epoch":
        raise InputError("train.lr_schedule: cosine_epoch is planned in epochs; with train.max_steps use "
                         "lr_schedule: cosine (or set train.max_steps: null)")


def accumulation_steps(cfg):
    """Micro-batches per optimiser step so that batch_size x processes x steps == global_batch_size."""
    per_step = cfg.batch_size * get_world_size()
    if cfg.global_batch_size is None:
        return 1
    if cfg.global_batch_size % per_step:
        raise InputError(f"train.global_batch_size={cfg.global_batch_size} is not a multiple of train.batch_size "
                         f"x processes = {cfg.batch_size} x {get_world_size()}; change one of them")
    return cfg.global_batch_size // per_step


def grad_scaler(device, amp):
    """fp16 needs loss scaling; bf16 and fp32 do not (the scaler is then a pass-through)."""
    return torch.amp.GradScaler(device.type, enabled=amp == "fp16")


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
    """torch.save to a temporary file, fsync, then rename: a crash never leaves a half-written checkpoint, and a
    failed write (a full disk) removes its partial file, keeps the previous checkpoint and raises RunError."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with suppress(FileNotFoundError):
            os.remove(tmp)
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        kept = f"the previous {os.path.basename(path)} is kept" if os.path.exists(path) else "no earlier one exists"
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RunError(f"cannot write checkpoint {path} ({reason}); {free / 1e9:.1f} GB free on its disk. The partial "
                       f"file was removed and {kept}; free space (or move --output_dir) and resume") from None


def load_checkpoint_file(url_or_path):
    """A checkpoint dict from a local path or a URL (downloaded once into torch.hub's cache), tensors on CPU.
    Only tensors and plain containers are unpickled (weights_only): a file that holds other objects, a truncated
    or corrupt file, raise InputError naming it."""
    if url_or_path.startswith(("http://", "https://", "file://")):
        try:
            return torch.hub.load_state_dict_from_url(url_or_path, map_location="cpu", weights_only=True,
                                                      check_hash=False)
        except pickle.UnpicklingError:
            raise InputError(_refused_pickle(url_or_path)) from None
        except (OSError, RuntimeError) as e:
            raise InputError(f"cannot download checkpoint {url_or_path}: {e}. Download it elsewhere and set the "
                             "config to the local file's path") from None
    if not os.path.isfile(url_or_path):
        raise InputError(f"checkpoint {url_or_path} does not exist (a local file path or an http(s) URL is "
                         "expected)")
    try:
        return torch.load(url_or_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(_refused_pickle(url_or_path)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{url_or_path} is not a readable checkpoint (truncated or corrupt: "
                         f"{str(e).splitlines()[0][:200]}); use an intact copy") from None


def _refused_pickle(path):
    return (f"{path} holds objects other than tensors (pickled code or classes) and was not loaded: only "
            "tensors and plain containers are read. Do not open it with torch.load(weights_only=False) unless you "
            "trust its source; convert it where it was made to a plain state dict (torch.save(model.state_dict()))")


def evaluation_weights(run):
    """The one rule for the weights an evaluation loads: --checkpoint, else (a trainer's --evaluate)
    output_dir/checkpoint_best.pth, else model.pretrained."""
    best = os.path.join(run.output_dir, "checkpoint_best.pth")
    weights = run.args.checkpoint or (best if run.args.trainer and os.path.exists(best) else run.cfg.model.pretrained)
    if weights is None:
        raise InputError("evaluation needs weights: pass --checkpoint or set model.pretrained")
    return weights


# ----------------------------------------------------------------------------------------------------- training

@dataclass
class TrainState:
    """A training run from step to step: what it trains, how, and where it stands. Created by start_training,
    advanced by fit; checkpoint_last.pth holds all of it."""
    run: Run
    model: torch.nn.Module                    # eager: evaluation and checkpoints
    ddp_model: torch.nn.Module                # what the loop runs (DDP, torch.compile)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    accum_steps: int
    epoch: int = 0                            # the epoch in progress
    epoch_batches: int = 0                    # micro-batches of it done (a mid-epoch checkpoint resumes there)
    step: int = 0                             # optimiser steps done
    best_metric: float = -math.inf
    meters: MetricLogger = field(default_factory=MetricLogger)  # the epoch's running averages
    batches_per_epoch: typing.Optional[int] = None  # known once fit has the loader
    steps_per_epoch: typing.Optional[int] = None
    total_steps: typing.Optional[int] = None

    @property
    def cfg(self):
        return self.run.cfg

    @property
    def output_dir(self):
        return self.run.output_dir

    @property
    def device(self):
        return self.run.device

    def lr(self):
        return lr_at_step(self.step, self.steps_per_epoch, self.cfg.train)


def start_training(run, model, load_checkpoint, init=None):
    """The TrainState of a training run, with the one rule for where weights come from: output_dir's
    checkpoint_last.pth when resuming (weights, optimizer state, position), else `model.pretrained` through
    `load_checkpoint(model, path)`, else `init(model)` (the model's own initialisation beyond its constructor,
    e.g. BERT weights for the Q-Former). Writes output_dir/config.yaml once the config is checked."""
    cfg, output_dir = run.cfg, run.output_dir
    last = os.path.join(output_dir, "checkpoint_last.pth")
    if is_main_process():
        remove_partial_files(output_dir)
    resuming = bool(run.args.resume) and os.path.exists(last)
    if run.args.resume == "yes" and not resuming:
        raise InputError(f"--resume: {last} does not exist; run without --resume to start afresh (or with "
                         "--resume auto, which starts afresh when there is nothing to resume)")
    if not run.args.resume and os.path.exists(last):
        raise InputError(f"{output_dir} holds a run (checkpoint_last.pth); continue it with --resume (or --resume "
                         "auto), or use another --output_dir")
    model.to(run.device)
    if not resuming:
        if cfg.model.pretrained:
            load_checkpoint(model, cfg.model.pretrained)
        elif init is not None:
            init(model)
    state = train_state(run, model)
    if resuming:
        restore(state, last)
    elif is_main_process():
        truncate_log(output_dir, -1)  # lines of a run that died before its first checkpoint
    if is_main_process():
        write_run_config(cfg, output_dir, state.step)
    return state


def train_state(run, model):
    """A TrainState at step 0 for `model` (on the run's device, with the weights it starts from): AdamW, the grad
    scaler and the model as the loop runs it (wrap_ddp, which gives every rank rank 0's weights)."""
    cfg = run.cfg.train
    return TrainState(run, model, wrap_ddp(model, run.device, cfg), build_optimizer(model, cfg),
                      grad_scaler(run.device, cfg.amp), accumulation_steps(cfg))


def remove_partial_files(output_dir):
    """Delete checkpoint files that a killed run left half written (`*.pth.tmp`)."""
    for path in glob.glob(os.path.join(output_dir, "*.pth.tmp")):
        log(f"removing {path}: a checkpoint write that did not finish")
        os.remove(path)


def write_run_config(cfg, output_dir, step):
    """output_dir/config.yaml; a different one that a resumed run replaces is kept as
    config_until_step_<step>.yaml."""
    path, new = os.path.join(output_dir, "config.yaml"), os.path.join(output_dir, "config.yaml.new")
    save_config(cfg, new)
    with open(new) as f, open(path) if os.path.exists(path) else nullcontext() as old:
        changed = old is not None and old.read() != f.read()
    if changed and step > 0:
        os.replace(path, os.path.join(output_dir, f"config_until_step_{step}.yaml"))
    os.replace(new, path)


# What a resumed run may change of the config it was started with (dotted key prefixes, the longest match wins):
# "fixed" (what the checkpoint's weights and optimizer state are made of: refused), "ask" (the optimisation and
# the data trained on: refused unless named in --allow_changes, then applied), "free" (how the run executes or
# evaluates, and keys only read at the start: applied, and logged).
RESUME_RULES = {
    "model.": "fixed", "model.pretrained": "free", "model.bert": "free", "model.itg_attention": "free",
    "train.": "free", "train.no_decay_bias_norm": "fixed",
    "train.epochs": "ask", "train.max_steps": "ask", "train.batch_size": "ask", "train.global_batch_size": "ask",
    "train.lr": "ask", "train.min_lr": "ask", "train.warmup_steps": "ask", "train.warmup_lr": "ask",
    "train.lr_schedule": "ask", "train.weight_decay": "ask", "train.grad_clip": "ask", "train.amp": "ask",
    "train.seed": "ask",
    "data.": "free", "data.train": "ask", "data.train_file": "ask", "data.crop_scale": "ask", "data.hflip": "ask",
    "data.randaugment": "ask", "data.augment": "ask", "data.max_words": "ask",
    "eval.": "free",
}


def resume_rule(key):
    matches = [prefix for prefix in RESUME_RULES if key == prefix or (prefix.endswith(".") and key.startswith(prefix))]
    return RESUME_RULES[max(matches, key=len)] if matches else "ask"


def check_resumed_config(saved, cfg, allowed, path):
    """Compare the config a run was started with (`saved`, from its checkpoint) with this one; InputError for
    changes the rules refuse, a log line for each change applied."""
    old, new = _flat(saved), _flat(config_dict(cfg))
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    fixed = [key for key in changed if resume_rule(key) == "fixed"]
    asked = [key for key in changed if resume_rule(key) == "ask" and key not in allowed]
    described = {key: f"{key}: {old.get(key, '(absent)')!r} -> {new.get(key, '(absent)')!r}" for key in changed}
    if fixed:
        raise InputError(f"--resume: {path} was trained with another model; "
                         f"{'; '.join(described[k] for k in fixed)}. Resume with the config it was started with "
                         "(output_dir/config.yaml), or start a new run in another --output_dir")
    if asked:
        raise InputError(f"--resume: the config differs from the one {path} was trained with: "
                         f"{'; '.join(described[k] for k in asked)}. To continue with the new values, add "
                         f"--allow_changes {' '.join(asked)}; to continue as started, drop the changes")
    for key in changed:
        log(f"resume: {described[key]}" + (" (--allow_changes)" if key in allowed else ""))


def restore(state, path):
    """Continue from the checkpoint at `path` (written by `training_state`): weights, optimizer state (with the
    config's hyper-parameters: lr, weight decay, fused), grad scaler, RNG streams, position and running averages."""
    ckpt = load_checkpoint_file(path)
    check_resumed_config(ckpt["config"], state.cfg, state.run.args.allow_changes, path)
    mismatches = state_dict_mismatches(ckpt["model"], state.model.state_dict())
    if mismatches:
        raise InputError(f"--resume: {path} does not fit this model ({len(mismatches)} problems: "
                         f"{'; '.join(mismatches[:4])}); it was written by another version of the code or for another "
                         "model")
    try:
        state.model.load_state_dict(ckpt["model"])
        fresh = [{k: v for k, v in group.items() if k != "params"} for group in state.optimizer.param_groups]
        # The config's fused flag must be in place while loading: load_state_dict puts the `step` state by it.
        for saved, group in zip(ckpt["optimizer"]["param_groups"], fresh):
            saved["fused"] = group["fused"]
        state.optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise InputError(f"--resume: {path} does not fit this model and optimizer ({str(e).splitlines()[0][:300]}); "
                         "it was written by another version of the code or for another model") from None
    for group, settings in zip(state.optimizer.param_groups, fresh):
        group.update(settings)
    state.scaler.load_state_dict(ckpt["scaler"])
    state.epoch, state.epoch_batches = ckpt["position"]["epoch"], ckpt["position"]["batch"]
    state.step, state.best_metric = ckpt["step"], ckpt["best_metric"]
    state.meters.restore_totals(ckpt["meters"])
    if len(ckpt["rng"]) == get_world_size():
        set_rng_state(ckpt["rng"][get_rank()])
    else:
        log(f"warning: the checkpoint was written by {len(ckpt['rng'])} processes, this run has "
            f"{get_world_size()}; the RNG streams of dropout and sampling are reseeded (data order and augmentation "
            "follow the seed and are unchanged)")
        seed_everything(state.cfg.train.seed + get_rank() + state.step)
    log(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.epoch_batches})")
    if is_main_process():
        truncate_log(state.output_dir, state.step)


def state_dict_mismatches(theirs, ours):
    """What keeps state dict `theirs` from loading strictly into a model whose state dict is `ours`, in words."""
    problems = [f"missing {k}" for k in ours if k not in theirs]
    problems += [f"unexpected {k}" for k in theirs if k not in ours]
    return problems + [f"{k} is {list(v.shape)}, the model's {list(ours[k].shape)}" for k, v in theirs.items()
                       if k in ours and v.shape != ours[k].shape]


def training_state(state):
    """Everything --resume needs to continue exactly: call on every rank (it gathers their RNG states)."""
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scaler": state.scaler.state_dict(), "epoch": state.epoch, "step": state.step,
            "position": {"epoch": state.epoch, "batch": state.epoch_batches}, "meters": state.meters.totals(),
            "best_metric": state.best_metric, "rng": all_gather_object(get_rng_state()),
            "config": config_dict(state.cfg)}


def save_last(state):
    """checkpoint_last.pth of where `state` stands (every rank calls it; rank 0 writes)."""
    ckpt = training_state(state)
    if is_main_process():
        save_checkpoint(ckpt, os.path.join(state.output_dir, "checkpoint_last.pth"))
    barrier()


class StepRecords:
    """Every train.print_freq optimiser steps a record of the step: its losses (averaged over its micro-batches and
    the ranks), LR, gradient norm, samples/s since the last record, peak memory, and what the data report
    (`health`, e.g. the web data skipped), appended to output_dir/train_steps.jsonl and, with train.tensorboard,
    written as TensorBoard scalars to output_dir/tensorboard/ together with the validation metrics (rank 0). A
    resumed run's records continue those of the steps its checkpoint holds (truncate_log; TensorBoard's purge_step)."""

    def __init__(self, state, health=None):
        self.path = os.path.join(state.output_dir, "train_steps.jsonl")
        self.every, self.health = state.cfg.train.print_freq, health
        self.writer = None
        if state.cfg.train.tensorboard and is_main_process():
            self.writer = SummaryWriter(os.path.join(state.output_dir, "tensorboard"), purge_step=state.step + 1)
        self.clock = time.time(), state.step
        self.samples_per_step = state.cfg.train.batch_size * get_world_size() * state.accum_steps

    def due(self, step):
        return step % self.every == 0

    def add(self, state, losses, grad_norm):
        """The record of the step `state` has just taken (every rank calls it: the data's health is gathered)."""
        now, (then, step) = time.time(), self.clock
        record = {"step": state.step, "epoch": state.epoch, "lr": state.optimizer.param_groups[0]["lr"], **losses,
                  "grad_norm": grad_norm, "samples_per_s": (state.step - step) * self.samples_per_step / (now - then),
                  "max_memory_mb": max_memory_mb(), **(self.health() if self.health else {})}
        self.clock = now, state.step
        if is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self.scalars(state.step, {k: v for k, v in record.items() if k not in ("step", "epoch")}, "train")

    def scalars(self, step, values, group):
        if self.writer is not None:
            for name, value in _flat(values).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{group}/{name}", value, step)
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class StopSignals:
    """SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before preemption or the time limit) only set
    `received`; the train loop reads it at each optimiser step, all ranks alike, and then checkpoints and stops."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"{self.received} received (rank {get_rank()}): checkpointing at the end of this step", flush=True)


def fit(state, loader, loss_fn, validate, criterion):
    """Train from where `state` stands to the end of train.epochs (or train.max_steps).

    `loss_fn(model, batch)` returns a dict of scalar losses, of which "loss" is minimised; `validate(at)`
    returns the validation metrics {name: value} (`at`: "epoch 3" or "step 500", for progress lines); `criterion`
    names the one whose strict improvement writes checkpoint_best.pth. After every epoch and every
    train.eval_every_steps steps: validate, append a line to log.txt, then write the checkpoints (log line first: a
    run that dies in between resumes from the checkpoint before and writes that line again). checkpoint_last.pth
    also after every train.save_every_steps steps and when a stop signal arrives, which then ends the run with
    Preempted.
    """
    cfg = state.cfg.train
    sampler = loader.batch_sampler if hasattr(loader.batch_sampler, "set_position") else None
    if sampler is None and cfg.max_steps is None:
        raise InputError("the training data are a stream (webdataset shards): it has no epochs; plan the run with "
                         "train.max_steps")
    # A stream is one epoch of train.max_steps steps.
    batches = sampler.batches_per_epoch if sampler else cfg.max_steps * state.accum_steps
    state.batches_per_epoch = batches // state.accum_steps * state.accum_steps
    state.steps_per_epoch = state.batches_per_epoch // state.accum_steps
    check_schedule(cfg, state.steps_per_epoch)
    state.total_steps = total_steps(cfg, state.steps_per_epoch)
    records = StepRecords(state, getattr(loader.dataset, "health", None))
    with StopSignals() as signals:
        while state.step < state.total_steps:
            if sampler:
                sampler.set_position(state.epoch, state.epoch_batches)
            for _ in train_steps(state, loader, loss_fn, signals, records):
                epoch_done = state.epoch_batches == state.batches_per_epoch
                finished = state.step == state.total_steps
                if epoch_done or finished or _due(state.step, cfg.eval_every_steps):
                    validate_and_log(state, validate, criterion, epoch_done or finished, records)
                if epoch_done:
                    state.epoch, state.epoch_batches, state.meters = state.epoch + 1, 0, MetricLogger()
                stopping = _agree(signals.received is not None, state.device)
                if epoch_done or finished or stopping or _due(state.step, cfg.save_every_steps):
                    save_last(state)
                if stopping:
                    raise Preempted(f"stopped by {signals.received or 'a stop signal on another rank'} at step "
                                    f"{state.step}; {os.path.join(state.output_dir, 'checkpoint_last.pth')} holds "
                                    "it. Run the same command with --resume auto to continue")
    records.close()
    log(f"best {criterion} {state.best_metric:.4f}")


def validate_and_log(state, validate, criterion, with_train, records):
    """One log.txt line of `validate`'s metrics (and the epoch's training averages), also to `records`
    (StepRecords); checkpoint_best.pth when the criterion strictly improves."""
    stats = {"epoch": state.epoch, "step": state.step}
    if with_train:
        stats.update({f"train_{k}": v for k, v in state.meters.global_averages().items()})
    metrics = validate(f"epoch {state.epoch}" if with_train else f"step {state.step}")
    append_log(state.output_dir, {**stats, **metrics})
    records.scalars(state.step, metrics, "eval")
    if metrics[criterion] > state.best_metric:
        state.best_metric = metrics[criterion]
        save_best(state, {criterion: metrics[criterion]})


def _due(step, every):
    return every is not None and step % every == 0


def _agree(flag, device):
    """True on every rank when `flag` holds on any."""
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def train_steps(state, batches, loss_fn, signals, records=None):
    """Train on `batches`, the rest of epoch `state.epoch` from micro-batch `state.epoch_batches` on, yielding after
    each optimiser step at which fit has work: the epoch's end, train.max_steps, an eval or save point, or a stop
    signal on any rank (the flag rides on the loss all-reduce, so all ranks yield together); `records`
    (StepRecords) gets its steps. A non-finite loss raises FloatingPointError before any optimiser step uses it,
    naming the checkpoint that is left."""
    cfg, model, meters = state.cfg.train, state.ddp_model, state.meters
    step_losses = collections.Counter()
    model.train()
    state.optimizer.zero_grad(set_to_none=True)
    batches = meters.log_every(batches, cfg.print_freq, f"Train epoch {state.epoch}", cfg.batch_size * get_world_size(),
                               total=state.batches_per_epoch, start=state.epoch_batches)
    for batch in batches:
        is_step = (state.epoch_batches + 1) % state.accum_steps == 0
        sync = nullcontext() if is_step or not hasattr(model, "no_sync") else model.no_sync()
        with sync, attention_kernels(cfg.attention):
            with state.run.autocast():
                losses = loss_fn(model, batch)
            state.scaler.scale(losses["loss"] / state.accum_steps).backward()
        point = is_step and (_work_due(state, state.step + 1) or signals.received is not None)
        values = torch.stack([v.detach().float() for v in losses.values()] + [losses["loss"].new_tensor(point)])
        values = all_reduce_sum(values.float()).tolist()
        losses, stop = {k: v / get_world_size() for k, v in zip(losses, values)}, values[-1] > 0
        if not all(math.isfinite(v) for v in losses.values()):
            raise FloatingPointError(_diverged(state, losses))
        lr = state.lr()
        meters.update(lr=lr, **losses)
        step_losses.update(losses)
        state.epoch_batches += 1
        if not is_step:
            continue
        record = records is not None and records.due(state.step + 1)
        grad_norm = optimizer_step(state, lr, norm=record)
        if record:
            records.add(state, {k: v / state.accum_steps for k, v in step_losses.items()}, grad_norm)
        step_losses.clear()
        if stop and state.epoch_batches < state.batches_per_epoch:
            paused = time.time()
            yield  # fit validates and checkpoints
            meters.paused = time.time() - paused
            if state.step == state.total_steps:
                return
            model.train()  # validation left it in eval mode
    if state.epoch_batches == state.batches_per_epoch:
        yield  # the epoch's end, once log_every has printed its last line


def _work_due(state, step):
    cfg = state.cfg.train
    return step == state.total_steps or _due(step, cfg.eval_every_steps) or _due(step, cfg.save_every_steps)


def optimizer_step(state, lr, norm=False):
    """One optimiser step at `lr`: gradients clipped to train.grad_clip, the grad scaler's step. Returns the global
    gradient norm (before clipping) when clipping or `norm` asks for it, else None."""
    cfg, optimizer, scaler = state.cfg.train, state.optimizer, state.scaler
    for group in optimizer.param_groups:
        group["lr"] = lr
    grad_norm = None
    if cfg.grad_clip is not None or norm:
        scaler.unscale_(optimizer)
        params = [p for p in state.ddp_model.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip is not None
                          else torch.nn.utils.get_total_norm([p.grad for p in params]))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    return grad_norm


def _diverged(state, losses):
    last = os.path.join(state.output_dir, "checkpoint_last.pth")
    kept = f"{last} is left as it was" if os.path.exists(last) else "no checkpoint was written"
    return (f"non-finite loss at epoch {state.epoch}, iteration {state.epoch_batches} (step {state.step}): "
            + ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
            + f". Training stopped; {kept}. Lower train.lr, set train.grad_clip, or use train.amp: bf16 in place of "
              "fp16")


def save_best(state, metrics):
    """checkpoint_best.pth: the weights, where they were reached and `metrics` (rank 0)."""
    if is_main_process():
        save_checkpoint({"model": state.model.state_dict(), "epoch": state.epoch, "step": state.step, **metrics,
                         "config": config_dict(state.cfg)}, os.path.join(state.output_dir, "checkpoint_best.pth"))


def test_best(state, evaluate):
    """The final log line: `evaluate()`'s metrics of the weights in checkpoint_best.pth, with their epoch and step."""
    best = load_checkpoint_file(os.path.join(state.output_dir, "checkpoint_best.pth"))
    state.model.load_state_dict(best["model"])
    append_log(state.output_dir, {"best_epoch": best["epoch"], "best_step": best["step"], **evaluate()})


# --------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def generate_texts(text_fn, loader, header="Generating"):
    """One string per item of `loader.dataset`, in the dataset's order, on every rank: `text_fn(images, index)`
    gets a batch as loaded (on CPU; `index` the items' dataset indices) and returns one string per item. The loader
    shards the items over ranks (data.loader.eval_loader); each must be answered exactly once over all of them."""
    local = []
    for images, index in MetricLogger().log_every(loader, 50, header):
        texts = text_fn(images, index)
        if len(texts) != len(index):
            raise ValueError(f"text_fn returned {len(texts)} texts for a batch of {len(index)} items")
        local += zip(index.tolist(), texts)
    pairs = [pair for part in all_gather_object(local) for pair in part]
    counts = collections.Counter(index for index, _ in pairs)
    repeated = sorted(index for index, count in counts.items() if count > 1)
    missing = sorted(set(range(len(loader.dataset))) - counts.keys())
    if repeated or missing:
        raise RuntimeError(f"texts gathered over ranks cover the {len(loader.dataset)} items unevenly: repeated "
                           f"{repeated[:5]}, missing {missing[:5]}; evaluate with data.loader.eval_loader")
    texts = dict(pairs)
    return [texts[i] for i in range(len(loader.dataset))]


def write_evaluation(run, results):
    """Print `results` {split: {metric: value}} as a table and write them to output_dir/evaluate.txt as one JSON
    object {"<split>_<metric>": value}."""
    log(metrics_table(results))
    if is_main_process():
        with open(os.path.join(run.output_dir, "evaluate.txt"), "w") as f:
            f.write(json.dumps(flat_metrics(results)) + "\n")


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


# ----------------------------------------------------------------------------------------------------------- exit

def run_main(main):
    """Call `main()`; bad input (exit status 2), a diverged loss or a failed write (1) and a stop signal (75) end
    with a message, no traceback."""
    try:
        main()
    except InputError as e:
        _exit(e, 2)
    except (FloatingPointError, RunError) as e:
        _exit(e, 1)
    except Preempted as e:
        _exit(e, EXIT_PREEMPTED, "preempted: ")
    finally:
        cleanup_distributed()


def _exit(error, status, prefix="error: "):
    message = str(error)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker: keep the worker's own message
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    print(prefix + message, file=sys.stderr, flush=True)
    sys.exit(status)
