"""Activation checkpointing whose kept block inputs wait in pinned CPU memory until backward (``--offload-activations``).

Checkpointing already drops everything a transformer block computes and recomputes it in backward; what stays on the
GPU is each block's input, one ``[tokens, hidden]`` tensor a block (~330 MiB for llama-1b at 5,000 tokens a step).
Unsloth's default moves those to the CPU, which is most of its lead in peak memory (benchmarks/NOTES.md entry 30).
Here each block's input is copied to pinned host memory on a side stream as soon as the block has run (the GPU copy
is freed once that copy is done, with no host wait) and copied back on the compute stream when backward reaches the
block. Nothing in a step reads a value back to the host.

``install(model)`` replaces the checkpointing function of every block transformers' ``gradient_checkpointing_enable``
set up, so the block classes, their eager forwards and their keyword inputs stay transformers' own. Off a GPU there
is nothing to gain: the input stays where it is, and the rest (recomputation under the forward's autocast
and random state) runs as on a GPU, which is what the CPU tests check against plain checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from minialign.base.errors import UserError


class Offloader:
    """The checkpointing function of one model's blocks; holds the side stream its copies to the host run on."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, function: Callable, *args):
        if not torch.is_grad_enabled():  # a frozen reference run in training mode: nothing to keep (transformers
            return function(*args)  # before 5.2x checkpoints it anyway)
        if not args or not torch.is_tensor(args[0]):
            raise UserError("--offload-activations keeps a block's hidden states, which this model passes its blocks "
                            "by keyword: drop --offload-activations.")
        x, rest = args[0], args[1:]
        others = [*rest, *getattr(function, "keywords", {}).values()]
        if any(torch.is_tensor(a) and a.requires_grad for a in others):
            raise UserError("--offload-activations keeps one input a block (its hidden states); this model's blocks "
                            "take other inputs that need gradients: drop --offload-activations.")
        if not x.requires_grad:  # the output would need no gradient and the block's adapters would get none
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
        return _OffloadedBlock.apply(self, function, x, *rest)

    def to_host(self, x: torch.Tensor) -> tuple:
        if x.device.type != "cuda":
            return (x.detach(), None)
        if x.device not in self.streams:
            self.streams[x.device] = torch.cuda.Stream(x.device)
        stream = self.streams[x.device]
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before it is read
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(stream)  # its memory is not handed out again before the copy has read it
        done = torch.cuda.Event()
        done.record(stream)
        return (host, done)

    @staticmethod
    def to_device(saved: tuple, device: torch.device) -> torch.Tensor:
        tensor, done = saved
        if done is None:
            return tensor
        torch.cuda.current_stream(device).wait_event(done)
        return tensor.to(device, non_blocking=True)


class _OffloadedBlock(torch.autograd.Function):
    """``function(x, *rest)`` run without keeping anything but ``x`` (on the host), recomputed in backward."""

    @staticmethod
    def forward(ctx, offloader: Offloader, function: Callable, x: torch.Tensor, *rest):
        device = x.device
        ctx.offloader, ctx.function, ctx.rest, ctx.device = offloader, function, rest, device
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = _rng_state(device)
        with torch.no_grad():
            out = function(x, *rest)
        if not torch.is_tensor(out):
            raise UserError(f"--offload-activations needs blocks that return one tensor; this model's return "
                            f"{type(out).__name__}: drop --offload-activations.")
        ctx.saved = offloader.to_host(x)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x = Offloader.to_device(ctx.saved, ctx.device).detach().requires_grad_(True)
        ctx.saved = None
        enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            _set_rng_state(ctx.rng, ctx.device)
            with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=dtype, enabled=enabled):
                out = ctx.function(x, *ctx.rest)
        torch.autograd.backward(out, grad_out)
        return (None, None, x.grad, *(None for _ in ctx.rest))


def _rng_state(device: torch.device) -> tuple:
    """The random state the forward ran under, so dropout draws the same masks when the block is recomputed."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def install(model: nn.Module) -> int:
    """Offload the kept inputs of every checkpointed block of ``model`` (after ``gradient_checkpointing_enable``);
    returns how many blocks now do."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    offloader = Offloader()
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not blocks:
        raise UserError(f"--offload-activations found no checkpointed block in {type(model).__name__}: it needs "
                        "--grad-checkpointing on a transformers model whose blocks support it.")
    for block in blocks:
        block._gradient_checkpointing_func = offloader
    return len(blocks)
