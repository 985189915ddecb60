"""Device facts both the training loop and the benchmarks read: names, syncs, autocast, peak memory.

It sits in the base layer, so the loop, the benchmarks and evaluation read the same facts.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from pathlib import Path

import torch

from minialign.base import dist
from minialign.base.errors import UserError

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    """A factory of the autocast context training uses on ``device``: bf16 on CUDA, none elsewhere."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def peak_rss_mb() -> float:
    """The process's peak resident set: since the last ``reset_peak_memory`` where Linux allows resetting it."""
    hwm = _vm_hwm_mb()
    if hwm is not None:
        return hwm
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _vm_hwm_mb() -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak-memory count; False where the peak cannot be reset (then it covers the whole process).

    On a CPU the count is the resident set's high-water mark, which Linux resets on writing 5 to clear_refs: a
    second measurement in one process then reports its own peak (which still holds whatever the process keeps
    resident from before), not the first one's.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MB, what it is): the CUDA allocator's peak on a GPU, the peak resident set on a CPU (labelled apart)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return peak_rss_mb(), "cpu_peak_rss"


def host_to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device``; through pinned memory on CUDA, so the host does not wait for the work queued
    before the copy (a copy from pageable memory does) and can go on building the next piece of work."""
    device = torch.device(device)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def to_device(batch: dict, device) -> dict:
    """Copy a host batch to the device, each tensor as ``host_to_device`` does."""
    return {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible; use --device cpu.")
    if name == "cuda" and dist.enabled():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)
