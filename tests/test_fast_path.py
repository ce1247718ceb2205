"""The fast-path switches compute what the reference path computes.

ITG attention: the bottom-right causal mask without a padding mask ("causal") gives the losses and gradients of the
explicit boolean mask ("masked") on right-padded text, while masks that let text see later tokens do not. Fused
AdamW: the same parameters as the for-each AdamW and as AdamW written out by hand; a resumed checkpoint keeps the
config's `fused`. SDPA kernel choice: the same losses, the kernel flags set inside the block only, and the choice
reaching the CPU dispatch. Loader keys: what DataLoader accepts, and persistent workers give the same batches.
wrap_ddp with one process: the model itself, or a torch.compile wrapper around it (never run: compiling is slow).
"""

import argparse
import copy

import pytest
import torch
from torch.nn.attention.bias import causal_upper_left
from torch.utils.data import DataLoader, TensorDataset

import models.blip2_qformer as blip2_qformer
from data.loader import LoaderConfig, train_loader
from tests.stage1_ddp import global_batch
from tests.test_train_loop import ToyConfig
from utils import (Autocast, InputError, Run, TrainConfig, attention_kernels, build_optimizer, restore,
                   training_state, train_state, unwrap, wrap_ddp)

CHOICES = ["auto", "math", "flash", "efficient", "cudnn"]


def stage1_model(itg_attention="causal"):
    """tests.stage1_ddp.tiny_stage1_model with the ITG attention chosen."""
    torch.manual_seed(0)
    return blip2_qformer.Blip2Qformer({"bos": 40, "pad": 0, "eos": 3}, vision="eva_tiny", image_size=32,
                                      qformer="tiny", vocab_size=41, num_query_tokens=4, embed_dim=32,
                                      vit_precision="fp32", itg_attention=itg_attention).eval()


def losses_and_grads(model):
    images, ids, mask, image_ids = global_batch()  # rows 1, 2, 4, 5 and 7 are right-padded
    torch.manual_seed(2)  # the ITM hard negatives
    losses = model(images, ids, mask, image_ids)
    losses["loss"].backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_all_close(ours, theirs, tol):
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], atol=tol, rtol=tol, msg=name)


# ------------------------------------------------------------------------------------------------ ITG attention

def test_itg_causal_attention_gives_the_losses_and_gradients_of_the_explicit_mask():
    causal, causal_grads = losses_and_grads(stage1_model("causal"))
    masked, masked_grads = losses_and_grads(stage1_model("masked"))
    assert_all_close(causal, masked, 1e-6)
    assert all(g is not None and g.abs().sum() > 0 for g in masked_grads.values())
    assert_all_close(causal_grads, masked_grads, 1e-6)


@pytest.mark.parametrize("wrong_mask", [
    lambda length, keys: torch.ones(length, keys, dtype=torch.bool),  # text sees later text
    causal_upper_left,                                                # aligned top-left: text misses queries
], ids=["no_causal_mask", "top_left_causal"])
def test_the_itg_comparison_tells_attention_patterns_apart(monkeypatch, wrong_mask):
    masked, _ = losses_and_grads(stage1_model("masked"))
    monkeypatch.setattr(blip2_qformer, "causal_lower_right", wrong_mask)
    wrong, _ = losses_and_grads(stage1_model("causal"))
    torch.testing.assert_close(wrong["loss_itc"], masked["loss_itc"], atol=1e-6, rtol=1e-6)  # ITG only differs
    assert (wrong["loss_itg"] - masked["loss_itg"]).abs() > 1e-5


# -------------------------------------------------------------------------------------------------- fused AdamW

def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def step_with_fixed_grads(model, optimizer, steps, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator).to(p.device)
        optimizer.step()


def adamw_by_hand(model, steps, cfg, seed=0, betas=(0.9, 0.999), eps=1e-8):
    """AdamW written out, with weight decay off for 1-D parameters (no_decay_bias_norm)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p.detach().clone() for p in model.parameters()]
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=generator)
            p.mul_(1 - cfg.lr * (cfg.weight_decay if p.ndim >= 2 else 0.0))
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat, v_hat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            p.sub_(cfg.lr * m_hat / (v_hat.sqrt() + eps))
    return params


def test_fused_adamw_updates_as_the_for_each_adamw_and_by_hand():
    start = small_model()
    results = {}
    for fused in (False, True):
        cfg = TrainConfig(lr=1e-2, weight_decay=0.5, no_decay_bias_norm=True, fused_adamw=fused)
        model = copy.deepcopy(start)
        optimizer = build_optimizer(model, cfg)
        assert bool(optimizer.param_groups[0]["fused"]) is fused
        one_d = {id(p) for p in model.parameters() if p.ndim < 2}  # biases and the LayerNorm weight
        assert [{id(p) for p in g["params"]} for g in optimizer.param_groups] == [
            {id(p) for p in model.parameters()} - one_d, one_d]
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
        step_with_fixed_grads(model, optimizer, 3)
        results[fused] = list(model.parameters())
    by_hand = adamw_by_hand(start, 3, cfg)  # cfg: the same lr and weight decay for both kinds
    for before, loop, fused, hand in zip(start.parameters(), results[False], results[True], by_hand):
        assert (fused - before).abs().min() > 1e-4  # every entry moved
        torch.testing.assert_close(fused, loop, atol=1e-6, rtol=0)
        torch.testing.assert_close(fused, hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("saved_fused", [False, True])
def test_resuming_keeps_the_configs_fused_flag_and_the_optimizer_state(saved_fused, device, tmp_path):
    """A checkpoint of one AdamW kind restored into the other: the config's kind stays, the moments come along,
    and the next step is the one the saved optimizer takes."""
    def setup(fused):
        cfg = ToyConfig(train=TrainConfig(lr=1e-2, fused_adamw=fused))
        args = argparse.Namespace(output_dir=str(tmp_path), resume="yes", allow_changes=[])
        return train_state(Run(args, cfg, torch.device(device), Autocast(torch.device(device), "fp32")),
                           small_model().to(device))

    saved = setup(saved_fused)
    step_with_fixed_grads(saved.model, saved.optimizer, 2)
    saved.step = 2
    torch.save(training_state(saved), tmp_path / "last.pth")
    resumed = setup(not saved_fused)
    restore(resumed, str(tmp_path / "last.pth"))
    assert resumed.step == 2
    assert [bool(g["fused"]) for g in resumed.optimizer.param_groups] == [not saved_fused]
    if not saved_fused:  # the fused kernel keeps `step` with the parameter (a CUDA tensor on GPU)
        assert all(s["step"].device == p.device for p, s in resumed.optimizer.state.items())
    step_with_fixed_grads(saved.model, saved.optimizer, 1, seed=1)
    step_with_fixed_grads(resumed.model, resumed.optimizer, 1, seed=1)
    for ours, theirs in zip(resumed.model.parameters(), saved.model.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------- SDPA kernels

def sdp_flags():
    b = torch.backends.cuda
    return {"math": b.math_sdp_enabled(), "flash": b.flash_sdp_enabled(),
            "efficient": b.mem_efficient_sdp_enabled(), "cudnn": b.cudnn_sdp_enabled()}


@pytest.mark.parametrize("choice", CHOICES)
def test_attention_kernel_choice_sets_the_flags_inside_the_block_only(choice):
    before = sdp_flags()
    with attention_kernels(choice):
        inside = sdp_flags()
    assert sdp_flags() == before
    expected = before if choice == "auto" else {name: name in ("math", choice) for name in before}
    assert inside == expected


def test_attention_kernel_choice_reaches_the_cpu_dispatch():
    q = torch.randn(2, 2, 5, 8)
    kernels = {}
    for choice in ("auto", "math", "flash"):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with attention_kernels(choice):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
        kernels[choice] = any("flash_attention" in event.key for event in prof.key_averages())
    assert kernels == {"auto": True, "math": False, "flash": True}


def test_every_attention_kernel_gives_the_losses_of_auto():
    model = stage1_model()
    losses = {}
    for choice in CHOICES:  # on CPU efficient and cudnn fall back to math, without an error
        with attention_kernels(choice):
            losses[choice], _ = losses_and_grads(model)
        model.zero_grad(set_to_none=True)
    for choice in CHOICES[1:]:
        assert_all_close(losses[choice], losses["auto"], 1e-5)


# ------------------------------------------------------------------------------------------------------ loaders

@pytest.mark.parametrize("pin", [True, False])
def test_pin_memory_only_on_cuda(pin):
    cfg = LoaderConfig(pin_memory=pin)
    assert cfg.loader_kwargs(torch.device("cpu"))["pin_memory"] is False
    assert cfg.loader_kwargs(torch.device("cuda"))["pin_memory"] is pin  # the device object needs no GPU


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_kwargs_are_accepted_by_dataloader(workers):
    kwargs = LoaderConfig(num_workers=workers, persistent_workers=True, prefetch_factor=3).loader_kwargs(
        torch.device("cpu"))
    assert kwargs["persistent_workers"] is (workers > 0)
    assert kwargs["prefetch_factor"] == (3 if workers else None)
    dataset = TensorDataset(torch.arange(10))
    batches = [b[0].tolist() for b in DataLoader(dataset, batch_size=4, **kwargs)]
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def two_epochs(workers, persistent):
    kwargs = LoaderConfig(num_workers=workers, persistent_workers=persistent).loader_kwargs(torch.device("cpu"))
    loader = train_loader(TensorDataset(torch.arange(22)), 4, seed=0, **kwargs)
    epochs = []
    for epoch in range(2):
        loader.batch_sampler.set_position(epoch)
        epochs.append([b[0].tolist() for b in loader])
    return epochs


def test_persistent_workers_give_the_batches_of_fresh_workers_and_of_none():
    persistent = two_epochs(2, True)
    assert persistent == two_epochs(2, False) == two_epochs(0, False)
    assert persistent[0] != persistent[1]  # set_epoch reshuffled
    for epoch in persistent:
        assert len(epoch) == 5 and len({i for batch in epoch for i in batch}) == 20  # drop_last, no repeats


# ------------------------------------------------------------------------------------------------------ wrap_ddp

def test_wrap_ddp_with_one_process_and_compile_keeps_the_model_reachable():
    model = small_model()
    assert wrap_ddp(model, torch.device("cpu"), TrainConfig()) is model
    assert unwrap(model) is model
    compiled = wrap_ddp(model, torch.device("cpu"), TrainConfig(compile=True))
    assert compiled is not model and isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)
    assert unwrap(compiled) is model
    assert list(compiled.parameters()) == list(model.parameters())  # the optimiser sees the same tensors


def test_static_graph_with_gradient_accumulation_is_refused():
    """DDP's static graph fails inside no_sync (PyTorch's reducer asserts), so the config combination is an error."""
    model = torch.nn.Linear(2, 2)
    with pytest.raises(InputError, match="ddp_static_graph"):
        wrap_ddp(model, torch.device("cpu"), TrainConfig(ddp_static_graph=True, batch_size=4, global_batch_size=8))
    assert wrap_ddp(model, torch.device("cpu"), TrainConfig(ddp_static_graph=True, batch_size=4)) is model
