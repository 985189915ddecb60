"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder ``checkpoints/step-000042`` written as ``step-000042.tmp`` first and renamed
only once every file is flushed; the previous ones are pruned only after that rename. So at every
instant the newest *complete* checkpoint on disk is usable, and a half-written one is ignored.
Weights are safetensors; the optimizer state is loaded with ``weights_only=True``.

The format is the single-process one whatever the launch: under FSDP every rank takes part in gathering
the whole tensors, rank 0 writes them, and loading cuts each rank's shard back out (``minialign.base.dist``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from minialign.base import dist
from minialign.base.errors import UserError
from minialign.base.files import fsync_path, publish_dir
from minialign.training.graphs import plain_lr

PREFIX = "step-"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dist.gather_to_rank0((n, p) for n, p in model.named_parameters() if p.requires_grad)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with whole CPU state tensors (FSDP-sharded moments are gathered)."""
    state = plain_lr(optimizer.state_dict())  # CUDA-graphed steps keep the lr in a device tensor
    state["state"] = {i: dist.gather_to_rank0(per_param.items()) for i, per_param in sorted(state["state"].items())}
    return state


def scheduler_state(scheduler) -> dict:
    """``scheduler.state_dict()`` with float learning rates (a tensor lr leaves tensors in ``_last_lr``)."""
    state = scheduler.state_dict()
    state["_last_lr"] = [float(x) for x in state.get("_last_lr", [])]
    return state


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, progress: dict, keep_last: int) -> Path | None:
    """Write checkpoint ``step``; call it on every rank (FSDP shards are gathered), only rank 0 writes."""
    weights, optim = trainable_state(model), optimizer_state(optimizer)
    if dist.rank() != 0:
        return None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f"{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optim, "scheduler": scheduler_state(scheduler), "rng": rng_state()}, tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps(progress))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    publish_dir(tmp, final)  # re-saving the same step (e.g. final save right after a periodic one) replaces it
    fsync_path(root)
    for old in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
            and (p / "progress.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; return the progress record (step, data position)."""
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        extra = torch.load(path / "optimizer.pt", weights_only=True)
        progress = json.loads((path / "progress.json").read_text())
    except (OSError, EOFError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as exc:
        raise UserError(f"Checkpoint {path} is damaged or incomplete ({exc}); delete it to resume from an earlier one.") from None
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise UserError(f"Checkpoint {path} does not fit this model: no weights for {missing[:3]}...")
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in params or params[name].shape != tensor.shape:
                raise UserError(f"Checkpoint {path} does not fit this model: parameter {name} differs.")
            params[name].copy_(dist.shard_like(tensor, params[name]))
    optimizer.load_state_dict(_shard_optimizer_state(extra["optimizer"], optimizer))
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return progress


def _shard_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """Whole saved moments cut to this rank's FSDP shards (matched to parameters by position); unchanged otherwise."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in saved["param_groups"] for i in group["params"]]
    for i, param in zip(ids, params):
        per_param = saved["state"].get(i, {})
        for key, value in per_param.items():
            if torch.is_tensor(value) and value.shape == param.shape:
                per_param[key] = dist.shard_like(value, param)
    return saved


def read_progress(path: Path) -> dict:
    """A checkpoint's progress record (step, data position, global batch) without loading any weights."""
    try:
        return json.loads((Path(path) / "progress.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"Checkpoint {path} is damaged or incomplete ({exc}); delete it to resume from an earlier one.") from None
