"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

The training loop calls these unconditionally, so one code path serves one process and torchrun.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as tdist


def enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if enabled() else 0


def world_size() -> int:
    return tdist.get_world_size() if enabled() else 1


def barrier() -> None:
    if enabled():
        tdist.barrier()


def all_reduce_int(value: int) -> int:
    """Sum a host-side count over ranks (token or pair counts that normalise the loss)."""
    if not enabled():
        return value
    device = "cuda" if tdist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], dtype=torch.long, device=device)
    tdist.all_reduce(t)
    return int(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not enabled():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def no_sync(module: torch.nn.Module, *, last: bool):
    """Skip DDP's gradient all-reduce on every accumulation micro-batch but the last."""
    if not last and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def wrap(policy: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    """Wrap the policy for data parallelism when running under torchrun; unchanged otherwise."""
    if not enabled() or mode == "none":
        return policy
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)
