"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

The training loop calls these unconditionally, so one code path serves one process and torchrun.
Under torchrun (``WORLD_SIZE`` > 1) ``session`` joins the process group and ``wrap`` replicates the policy
(DDP) or shards it (FSDP2). Checkpoints keep the single-process format whatever the launch: FSDP shards are
gathered whole on save (``full_tensor``) and cut again on load (``shard_like``).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as tdist

from minialign.base.errors import UserError

MODES = ("auto", "none", "ddp", "fsdp")


def enabled() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if enabled() else 0


def world_size() -> int:
    return tdist.get_world_size() if enabled() else 1


def launched_world() -> int:
    """How many processes torchrun started (its ``WORLD_SIZE``); known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    if enabled():
        tdist.barrier()


# ----------------------------------------------------------------------------- joining a torchrun job


def resolve_mode(mode: str, world: int) -> str:
    """``auto`` -> ddp under torchrun, none alone; refuse modes that cannot do what they promise."""
    if mode not in MODES:
        raise UserError(f"--dist {mode!r} is not a distribution mode; use one of {', '.join(MODES)}.")
    if mode == "auto":
        return "ddp" if world > 1 else "none"
    if mode != "none" and world == 1:
        raise UserError(
            f"--dist {mode} needs several processes, but this is a single one. Launch with "
            f"`torchrun --nproc_per_node N -m minialign ... --dist {mode}`, or drop --dist (auto) to train in one process."
        )
    if mode == "none" and world > 1:
        raise UserError(
            f"--dist none was given to each of {world} torchrun processes: every one would train its own copy and "
            "write the same run folder. Use --dist ddp or fsdp, or start a single process without torchrun."
        )
    return mode


def _uses_cuda(device: str) -> bool:
    return device in ("auto", "cuda") and torch.cuda.is_available()


@contextlib.contextmanager
def session(mode: str, device: str):
    """Join torchrun's process group for one command (NCCL on CUDA, gloo on CPU) and always leave it.

    Host-side counts (tokens, pairs, stop requests) go through gloo even on GPUs ("cpu:gloo,cuda:nccl"),
    so summing them never waits for the GPU. A run in one process (or one already set up by a library
    caller) is left alone.
    """
    mode = resolve_mode(mode, launched_world())
    if mode == "none" or enabled():
        yield
        return
    if _uses_cuda(device):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        tdist.init_process_group("gloo")
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:  # every rank is done before any closes its connections (after an error: leave at once)
            tdist.barrier()
        tdist.destroy_process_group()


def check_same_config(config: dict) -> None:
    """Refuse to start when ranks were given different settings (a flag or preset differing between nodes).

    Every rank raises the same UserError, naming the differing fields, so the job stops at once instead of
    training replicas that silently disagree.
    """
    if not enabled():
        return
    configs: list = [None] * world_size()
    tdist.all_gather_object(configs, config)
    first = configs[0]
    diffs = [f"rank {r} has {k}={c.get(k)!r} where rank 0 has {first.get(k)!r}"
             for r, c in enumerate(configs) for k in sorted(set(c) | set(first)) if c.get(k) != first.get(k)]
    if diffs:
        raise UserError(
            "The processes of this torchrun job were given different configurations: " + "; ".join(diffs[:5]) +
            ". Start every process with the same flags and config file."
        )


# ----------------------------------------------------------------------------- sums over ranks


def _count_device() -> str:
    return "cpu" if "gloo" in str(tdist.get_backend()) else "cuda"


def all_reduce_ints(values: list[int]) -> list[int]:
    """Sum host-side counts over ranks in one collective (token or pair counts that normalise the loss)."""
    if not enabled():
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=_count_device())
    tdist.all_reduce(t)
    return t.tolist()


def all_reduce_int(value: int) -> int:
    return all_reduce_ints([value])[0]


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any: ranks must agree on when to stop (a signal reaches one)."""
    return all_reduce_int(int(flag)) > 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if not enabled():
        return t
    t = t.clone()
    tdist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- wrapping the policy


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / torch.compile wrappers (FSDP2 shards in place: nothing to unwrap)."""
    while True:
        inner = getattr(module, "module", None) or getattr(module, "_orig_mod", None)
        if inner is None:
            return module
        module = inner


def wrap(policy: torch.nn.Module, mode: str, device: torch.device,
         blocks: list[torch.nn.Module] | None = None) -> torch.nn.Module:
    """Wrap the policy for data parallelism when running under torchrun; unchanged otherwise. ``blocks``: the
    transformer blocks FSDP shards one by one (``modeling.blocks.transformer_blocks``)."""
    mode = resolve_mode(mode, world_size())
    if mode == "none":
        return policy
    if mode == "fsdp":
        return shard(policy, blocks or [])
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def shard(policy: torch.nn.Module, blocks: list[torch.nn.Module]) -> torch.nn.Module:
    """FSDP2, in place: every transformer block is a unit of its own, and the root holds the rest.

    A block's weights are gathered just for its forward and backward. The root (``TokenLogps``) owns the
    embeddings, final norm and output head, so they are whole throughout its forward — where the head
    weight is read directly, not through the head's own forward. Frozen (LoRA base) and trainable weights
    share units; only the trainable ones get gradients. The caller finds the blocks (by the model's own
    ``_no_split_modules``, e.g. GPTNeoXLayer, LlamaDecoderLayer), so this module needs no model code.
    """
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(policy)
    return policy


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def is_sharded(module: torch.nn.Module) -> bool:
    """True if any weight of ``module`` is an FSDP shard (even if the FSDP unit is a parent, like the root)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def no_sync(module: torch.nn.Module, *, last: bool):
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP2) on every accumulation micro-batch but the last."""
    if last:
        return contextlib.nullcontext()
    if _is_fsdp(module):
        return _fsdp_no_sync(module)
    if hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (a collective: every rank calls it, in the same order); else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_to_rank0(items) -> dict:
    """Whole CPU copies of (key, value) pairs on rank 0 ({} elsewhere); non-tensor values pass through.

    Every rank must iterate, in the same order: FSDP shards are all-gathered one tensor at a time, so the
    peak memory is one whole tensor beyond the shards.
    """
    out = {}
    for key, value in items:
        if torch.is_tensor(value):
            value = full_tensor(value.detach()).contiguous().cpu()
        if rank() == 0:
            out[key] = value
    return out


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``full`` laid out as ``like`` (a sharded parameter or its optimizer state); else ``full``.

    Every rank read the same file, so each cuts its own piece without communicating.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
