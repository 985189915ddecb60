"""Activation checkpointing whose kept block inputs wait in pinned CPU memory until backward (``--offload-activations``).

Checkpointing already drops everything a transformer block computes and recomputes it in backward; what stays on the
GPU is each block's input, one ``[tokens, hidden]`` tensor a block (~330 MiB for llama-1b at 5,000 tokens a step).
Unsloth's default moves those to the CPU, which is most of its lead in peak memory (benchmarks/NOTES.md entry 30).
Each block runs under torch's reentrant checkpoint, which keeps exactly its tensor inputs (``save_for_backward``) and
replays the block in backward under the forward's autocast and random state; saved-tensor hooks around it copy those
inputs to pinned host memory on a side stream (the GPU copy is freed once that copy is done, with no host wait) and
back on that stream one block ahead of backward: when backward reaches a block, the copy of the input it needs next
starts, so it arrives while this block recomputes. Nothing in a step reads a value back to the host.

``install(model)`` replaces the checkpointing function of every block that ``checkpoint_blocks`` (transformers' own
switch) set up, so the block classes, their eager forwards and their keyword inputs stay transformers' own. A block
whose gradient the reentrant checkpoint would not carry (no positional input needs one, or a keyword input does) gets
plain checkpointing instead. Off a GPU there is nothing to gain: the input stays where it is, and the rest runs as on a
GPU, which is what the CPU tests check against plain checkpointing.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from minialign.base.errors import UserError


def _needs_grad(values) -> bool:
    return any(torch.is_tensor(v) and v.requires_grad for v in values)


class _Kept:
    """One block input waiting on the host; ``before`` (a weak reference) is the input kept just before it, the one
    backward reaches next, and ``fetched`` its way back to the GPU once started: the GPU tensor and the event that
    marks its arrival."""

    def __init__(self, host: torch.Tensor, device: torch.device, before: weakref.ref | None) -> None:
        self.host, self.device, self.before = host, device, before
        self.fetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.used = False


class Offloader:
    """The checkpointing function of one model's blocks; holds the side stream its copies run on and the input it
    kept last (a weak reference: a graph that is dropped takes its kept inputs with it)."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.last: weakref.ref | None = None

    def __call__(self, function: Callable, *args):
        if not torch.is_grad_enabled():  # a frozen reference run in training mode: nothing to keep (transformers
            return function(*args)  # before 5.2x checkpoints it anyway)
        if _needs_grad(getattr(function, "keywords", {}).values()) or not _needs_grad(args):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
        with torch.autograd.graph.saved_tensors_hooks(self.to_host, self.to_device):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=True)

    def to_host(self, x: torch.Tensor) -> tuple:
        if not self.offloads(x):
            return (x, None)
        kept = _Kept(self.copy_to_host(x), x.device, self.last)
        self.last = weakref.ref(kept)
        return (kept.host, kept)

    def to_device(self, saved: tuple) -> torch.Tensor:
        """The kept input back on the GPU for its block's backward; and the copy of the input backward needs next
        started on the side stream, so that it arrives while this block recomputes."""
        tensor, kept = saved
        if kept is None:
            return tensor
        gpu, arrived = kept.fetched or self.copy_to_device(kept.host, kept.device)
        kept.fetched, kept.used = None, True
        self.use_on_compute_stream(gpu, arrived)
        before = kept.before() if kept.before is not None else None
        if before is not None and not before.used and before.fetched is None:
            before.fetched = self.copy_to_device(before.host, before.device)
        return gpu

    @staticmethod
    def offloads(x: torch.Tensor) -> bool:
        return x.device.type == "cuda"

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def copy_to_host(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` into pinned host memory on the side stream, once the compute stream has written it; its GPU memory
        is handed out again only after the copy has read it."""
        stream = self.side_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
        x.record_stream(stream)
        return host

    def copy_to_device(self, host: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``host`` back to ``device`` on the side stream (after its copy to the host, queued there before)."""
        stream = self.side_stream(device)
        with torch.cuda.stream(stream):
            gpu = host.to(device, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(stream)
        return gpu, arrived

    @staticmethod
    def use_on_compute_stream(gpu: torch.Tensor, arrived: torch.cuda.Event | None) -> None:
        """The compute stream waits for ``gpu`` to arrive (a GPU-side wait), and its memory, allocated on the side
        stream, is not handed out again before the compute stream is done with it."""
        stream = torch.cuda.current_stream(gpu.device)
        stream.wait_event(arrived)
        gpu.record_stream(stream)


def checkpoint_blocks(model: nn.Module) -> None:
    """Turn on transformers' activation checkpointing of every block (non-reentrant: it carries gradients whatever
    the block's inputs). Its switch was renamed ``activation_checkpointing_enable`` (the old name warns from
    transformers 5.2x and goes in v6); older releases have only ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def install(model: nn.Module) -> int:
    """Offload the kept inputs of every checkpointed block of ``model`` (after ``checkpoint_blocks``);
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
