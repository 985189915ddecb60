"""Activation checkpointing whose kept block inputs wait in pinned CPU memory until backward (``--offload-activations``).

Checkpointing already drops everything a transformer block computes and recomputes it in backward; what stays on the
GPU is each block's input, one ``[tokens, hidden]`` tensor a block (~330 MiB for llama-1b at 5,000 tokens a step).
Unsloth's default moves those to the CPU, which is most of its lead in peak memory (benchmarks/NOTES.md entry 30).
Each block runs under torch's reentrant checkpoint, which keeps exactly its tensor inputs (``save_for_backward``) and
replays the block in backward under the forward's autocast and random state; saved-tensor hooks around it copy those
inputs to pinned host memory on a side stream (the GPU copy is freed once that copy is done, with no host wait) and
back on the compute stream when backward reaches the block. Nothing in a step reads a value back to the host.

``install(model)`` replaces the checkpointing function of every block transformers' ``gradient_checkpointing_enable``
set up, so the block classes, their eager forwards and their keyword inputs stay transformers' own. A block whose
gradient the reentrant checkpoint would not carry (no positional input needs one, or a keyword input does) gets plain
checkpointing instead. Off a GPU there is nothing to gain: the input stays where it is, and the rest runs as on a
GPU, which is what the CPU tests check against plain checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from minialign.base.errors import UserError


def _needs_grad(values) -> bool:
    return any(torch.is_tensor(v) and v.requires_grad for v in values)


class Offloader:
    """The checkpointing function of one model's blocks; holds the side stream its copies to the host run on."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, function: Callable, *args):
        if not torch.is_grad_enabled():  # a frozen reference run in training mode: nothing to keep (transformers
            return function(*args)  # before 5.2x checkpoints it anyway)
        if _needs_grad(getattr(function, "keywords", {}).values()) or not _needs_grad(args):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
        with torch.autograd.graph.saved_tensors_hooks(self.to_host, self.to_device):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)

    def to_host(self, x: torch.Tensor) -> tuple:
        if x.device.type != "cuda":
            return (x, None)
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
        return (host, (done, x.device))

    @staticmethod
    def to_device(saved: tuple) -> torch.Tensor:
        tensor, copy = saved
        if copy is None:
            return tensor
        done, device = copy
        torch.cuda.current_stream(device).wait_event(done)
        return tensor.to(device, non_blocking=True)


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
