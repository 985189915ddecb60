"""The one training loop, shared by SFT and DPO.

It knows nothing about a particular loss: a task (``minialign.training.tasks``) turns a batch into a summed loss
and summed metrics, plus the number of units (tokens or pairs) they are sums over. The loop divides by
the units of the whole optimiser step — across gradient accumulation and ranks — so the gradient is the
same however the global batch is split. Metrics stay on the device and are read back only every
``log_every`` steps, so the step itself never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minialign.base import dist
from minialign.base.devices import autocast as device_autocast
from minialign.base.devices import peak_memory, to_device
from minialign.base.errors import UserError
from minialign.config.schema import TrainConfig
from minialign.data import batch_indices, tokens_in
from minialign.ops.attention import flash_varlen_available
from minialign.ops.shapes import ShapePlan, plan_shapes
from minialign.training import checkpoint
from minialign.training.batches import prepare_batch
from minialign.training.graphs import ForwardBackward, GraphedStep, Update
from minialign.training.health import check_finite, check_learning
from minialign.training.optim import InBackwardAdamW, grad_norm_step, make_optimizer, make_scheduler, measure_first
from minialign.training.trackers import MetricsLog


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0
    micro: int = 0  # next micro-batch within the epoch
    tokens: int = 0
    global_batch: int = 0  # examples per optimiser step (0: unknown); a resumed run must keep it

    def as_dict(self) -> dict:
        return dict(step=self.step, epoch=self.epoch, micro=self.micro, tokens=self.tokens, global_batch=self.global_batch)


def step_functions(policy, task, optimizer, params: list[torch.nn.Parameter], cfg: TrainConfig,
                   autocast) -> tuple[ForwardBackward, Update]:
    """One optimiser step in two halves, so that ``GraphedStep`` can warm up the first alone.

    ``forward_backward(batches, scale)`` accumulates the gradient of ``scale`` x the summed loss of each micro-batch
    (``scale`` = ranks / units of the whole step) and returns the summed metrics; ``update()`` clips, steps AdamW
    and returns the gradient norm. Neither reads anything back from the device.
    """

    def accumulate(batches: list[dict], scale) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            with dist.no_sync(policy, last=i == len(batches) - 1), autocast():
                loss, metrics = task.loss(policy, batch)
                (loss * scale).backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float()
        return sums

    def forward_backward(batches: list[dict], scale) -> dict[str, torch.Tensor]:
        measure_first(optimizer, lambda: accumulate(batches, scale))  # in-backward clipping only
        return accumulate(batches, scale)

    def update() -> torch.Tensor:
        grad_norm = grad_norm_step(optimizer, params, cfg.max_grad_norm)
        optimizer.step()  # optim_in_backward: already done, in backward
        return grad_norm

    return forward_backward, update


class StopRequested:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            self.requested = True

        try:
            for s in previous:
                signal.signal(s, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = {}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def evaluate_task(policy, task, batches: Sequence[dict], device, autocast, target_multiple: int = 0, *,
                  shapes: ShapePlan | None = None, varlen: bool = False) -> dict[str, float]:
    """Mean of the task's metrics over held-out batches (``eval/`` prefixed), without gradients.

    ``target_multiple`` and ``shapes`` shape the batches as training does (``batches.prepare_batch``), so a compiled
    policy sees no new shapes.

    Under torchrun each rank scores every world-th batch. Every rank runs the same number of forward passes
    (FSDP gathers weights inside each), so a rank that has run out scores the first batch again and ignores it.
    """
    was_training = policy.training
    policy.eval()
    rank, world = dist.rank(), dist.world_size()
    mine = list(batches[rank::world])
    sums: dict[str, torch.Tensor] = {}
    units = 0
    with torch.no_grad(), autocast():
        for i in range(-(-len(batches) // world)):
            batch = mine[i] if i < len(mine) else batches[0]
            ready = prepare_batch(batch, target_multiple=target_multiple, shapes=shapes, varlen=varlen)
            _, metrics = task.loss(policy, to_device(ready, device))
            if i >= len(mine):
                continue
            units += task.units(batch)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.float()
    policy.train(was_training)
    units = dist.all_reduce_int(units)
    return {f"eval/{k}": dist.all_reduce_sum(v).item() / max(units, 1) for k, v in sums.items()}


def check_enough_examples(n: int, cfg: TrainConfig, world: int) -> int:
    """The examples one optimiser step takes; fewer than that in the whole dataset is a user error."""
    per_step = cfg.batch_size * world * cfg.grad_accum
    if n < per_step:
        raise UserError(
            f"One optimiser step needs {per_step} training examples (batch size {cfg.batch_size} x {world} rank(s) x "
            f"{cfg.grad_accum} accumulation) but there are only {n}; lower --batch-size or --grad-accum, "
            "or use more data (raise --limit)."
        )
    return per_step


def planned_steps(n: int, cfg: TrainConfig, rank: int, world: int) -> tuple[int, int, bool]:
    """(steps per epoch, the run's last step, drop_last) of a run over ``n`` examples, known before it starts.

    A short last global batch is kept, as one process keeps it, when every rank gets part of it; it is dropped
    when some rank would get nothing, since every rank must take part in every step.
    """
    drop_last = 0 < n % (cfg.batch_size * world) < world
    batches = len(batch_indices(n, cfg.batch_size, seed=cfg.seed, epoch=0, drop_last=drop_last, rank=rank,
                                world_size=world))
    steps_per_epoch = max(1, batches // cfg.grad_accum)
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch, drop_last


def flat_batch_size(batch: dict) -> tuple[int, int]:
    """(real positions, targets) of a padding-free batch: what ``plan_run_shapes`` plans for."""
    return int((batch["doc_ids"] >= 0).sum()), batch["n_targets"]


def plan_run_shapes(cfg: TrainConfig, sizes: list[tuple[int, int]]) -> ShapePlan:
    """The fixed batch shapes of a run whose batches have ``sizes`` (``flat_batch_size``), by ``cfg``'s buckets."""
    return plan_shapes(sizes, max_lengths=cfg.shape_buckets, max_targets=cfg.target_buckets,
                       target_multiple=cfg.pad_targets_to_multiple_of or 64, longest_sequence=cfg.max_length)


def train(
    policy: torch.nn.Module,
    task,
    examples: Sequence,
    collate: Callable[[list[int]], dict],
    cfg: TrainConfig,
    run_dir: Path | None,
    *,
    eval_batches: Sequence[dict] = (),
    lengths: Sequence[int] | None = None,
    sizes: Sequence[tuple[int, int]] | None = None,
    resume_from: Path | None = None,
) -> dict:
    """Train ``policy`` on ``examples`` and return the last logged metrics and a summary of the run.

    ``collate(indices)`` builds a host-side batch from dataset positions. ``policy`` is the (possibly
    DDP/FSDP-wrapped) module the task calls; its trainable parameters are the ones optimised. ``sizes`` (padding-free
    runs: each example's positions and targets, ``data.flat_sizes``) lets the loop fix every batch's shape before the
    first step (``shapes.plan_shapes``).
    """
    device = next(policy.parameters()).device
    rank, world = dist.rank(), dist.world_size()
    params = [p for p in policy.parameters() if p.requires_grad]
    per_step = check_enough_examples(len(examples), cfg, world)  # an epoch holds >= grad_accum micro-batches
    steps_per_epoch, total, drop_last = planned_steps(len(examples), cfg, rank, world)
    optimizer = make_optimizer(params, cfg, device, steps=total)
    scheduler = make_scheduler(optimizer, total, cfg)
    progress = Progress()
    if resume_from is not None:
        progress = Progress(**checkpoint.load_checkpoint(resume_from, dist.unwrap(policy), optimizer, scheduler))
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)  # a run resumed longer: its recomputed schedule's rate
        if progress.global_batch not in (0, per_step):
            raise UserError(
                f"{resume_from} was trained with a global batch of {progress.global_batch} examples, but this run has "
                f"{per_step} ({cfg.batch_size} x {world} rank(s) x {cfg.grad_accum}); resume with the same global batch."
            )
    progress.global_batch = per_step
    writes = run_dir is not None and rank == 0
    log = MetricsLog(run_dir / "metrics.jsonl" if writes else None)
    autocast = device_autocast(device)
    step = GraphedStep(*step_functions(policy, task, optimizer, params, cfg, autocast), optimizer, device,
                       enabled=cfg.cuda_graphs, warm_up=cfg.compile)

    def epoch_order(epoch: int) -> list[list[int]]:
        """Which examples form each micro-batch of ``epoch``: a pure function of (seed, epoch, rank)."""
        return batch_indices(len(examples), cfg.batch_size, seed=cfg.seed, epoch=epoch, drop_last=drop_last,
                             lengths=lengths, group_by_length=lengths is not None, rank=rank, world_size=world)

    order = epoch_order(progress.epoch)
    varlen = use_varlen(cfg, device)
    shapes = None
    if sizes is not None and cfg.shape_buckets > 0:
        run_sizes = _run_batch_sizes(sizes, epoch_order, progress, total, steps_per_epoch * cfg.grad_accum, cfg.grad_accum)
        run_sizes += [flat_batch_size(b) for b in eval_batches if "n_sequences" in b]
        shapes = plan_run_shapes(cfg, run_sizes)
        if rank == 0:
            print(f"minialign: shapes fixed for the run: {shapes.describe()}; at most {shapes.n_shapes} CUDA-graph "
                  f"captures{f' and {len(shapes.lengths)} compilations per module and mode' if cfg.compile else ''} "
                  "(a short last batch of an epoch adds its own).", file=sys.stderr)

    def next_micro() -> dict:
        nonlocal order
        if progress.micro >= steps_per_epoch * cfg.grad_accum:
            progress.epoch, progress.micro = progress.epoch + 1, 0
            order = epoch_order(progress.epoch)
        batch = collate(order[progress.micro])
        progress.micro += 1
        return batch

    last: dict = {}
    bar = tqdm(total=total, initial=progress.step, disable=rank != 0, desc=task.name, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    stop = StopRequested()
    policy.train()
    t0, tokens0, step0 = time.perf_counter(), progress.tokens, progress.step
    steady_from = _steady_from(step0, total)
    marks: dict[int, tuple[int, float]] = {}  # step -> (tokens, seconds): times read right after a device sync
    side = {"eval_s": 0.0, "checkpoint_s": 0.0}  # parts of the loop's time spent on other work than training steps
    with (stop.installed(), _hooks_removed_after(optimizer), room_for_shapes(bool(cfg.compile and cfg.padding_free)),
          log.tracking(cfg, run_dir), contextlib.closing(bar)):  # closed before an error is printed under it
        while progress.step < total:
            micro = [next_micro() for _ in range(cfg.grad_accum)]
            units, tokens = dist.all_reduce_ints([sum(task.units(b) for b in micro),
                                                  sum(tokens_in(b) for b in micro)])
            progress.tokens += tokens
            batches = [prepare_batch(b, target_multiple=cfg.pad_targets_to_multiple_of, shapes=shapes, varlen=varlen)
                       for b in micro]
            sums, grad_norm = step(batches, world / max(units, 1))  # moves them to the device
            lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)  # a host float, even if the lr is a tensor
            scheduler.step()
            progress.step += 1
            sums = {k: dist.all_reduce_sum(v) / max(units, 1) for k, v in sums.items()}
            log.add(progress.step, {**sums, "grad_norm": grad_norm, "lr": lr, "epoch": progress.epoch, "tokens": progress.tokens})
            done = progress.step == total
            eval_now = bool(eval_batches) and ((cfg.eval_every and progress.step % cfg.eval_every == 0) or done)
            stopping = dist.any_rank(stop.requested)  # also keeps the ranks in step, as a barrier would
            # The last step needs no checkpoint of its own unless checkpoints were asked for: the final weights are saved
            # anyway, and a full fine-tuning checkpoint (weights and AdamW moments, 12-16 bytes a parameter) costs seconds.
            save_now = run_dir is not None and (bool(cfg.save_every and (progress.step % cfg.save_every == 0 or done))
                                                or stopping)
            if progress.step % cfg.log_every == 0 or eval_now or save_now or done or progress.step == steady_from:
                rows = log.flush()
                check_finite(rows, run_dir)
                check_learning(rows)
                last = rows[-1]
                elapsed = time.perf_counter() - t0
                marks[progress.step] = (progress.tokens, elapsed)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{(progress.tokens - tokens0) / elapsed:,.0f}")
            bar.update(1)
            if eval_now:
                t_side = time.perf_counter()
                ev = evaluate_task(policy, task, eval_batches, device, autocast, cfg.pad_targets_to_multiple_of,
                                   shapes=shapes, varlen=varlen)
                log.write([{"step": progress.step, **ev}])
                last = {**last, **ev}
                side["eval_s"] += time.perf_counter() - t_side
            if save_now:  # every rank: FSDP shards are gathered; rank 0 writes
                t_side = time.perf_counter()
                checkpoint.save_checkpoint(run_dir, progress.step, dist.unwrap(policy), optimizer, scheduler,
                                           progress.as_dict(), cfg.keep_last)
                side["checkpoint_s"] += time.perf_counter() - t_side
            if stopping:
                bar.close()
                raise KeyboardInterrupt(f"stopped at step {progress.step}; checkpoint saved, resume with --resume")
    bar.close()
    elapsed = time.perf_counter() - t0
    last["tokens_per_s"] = (progress.tokens - tokens0) / max(elapsed, 1e-9)
    last["summary"] = {**_summary(marks, steady_from, progress, tokens0, step0, elapsed, device, step, shapes),
                       **{k: round(v, 3) for k, v in side.items()}}
    return last


def use_varlen(cfg: TrainConfig, device: torch.device) -> bool:
    """Varlen attention for padding-free and packed batches: asked for, or ``auto`` where FlashAttention runs it."""
    return cfg.attention == "varlen" or (cfg.attention == "auto" and flash_varlen_available(device))


def _steady_from(step0: int, total: int) -> int:
    """The step after which throughput counts as steady: the first multiple of 10 past a tenth of the run."""
    first = step0 + max(1, math.ceil(0.1 * (total - step0)))
    mark = -(-first // 10) * 10
    return mark if mark < total else step0


def _run_batch_sizes(sizes, epoch_order, progress: Progress, total: int, micro_per_epoch: int,
                     grad_accum: int) -> list[tuple[int, int]]:
    """(positions, targets) of every micro-batch the run will train on, from its current point to its last step."""
    out, epoch, micro = [], progress.epoch, progress.micro
    needed = (total - progress.step) * grad_accum
    while len(out) < needed:
        order = epoch_order(epoch)
        for indices in order[micro:micro_per_epoch]:
            out.append((sum(sizes[i][0] for i in indices), sum(sizes[i][1] for i in indices)))
        epoch, micro = epoch + 1, 0
    return out[:needed]


def _summary(marks: dict, steady_from: int, progress: Progress, tokens0: int, step0: int, elapsed: float, device,
             step: GraphedStep, shapes: ShapePlan | None) -> dict:
    """What a run costs, for ``summary.json``: the loop's time (``train_s``: every step, and the held-out evaluations
    and checkpoints inside it), throughput (whole loop, and after the first tenth of the steps, which holds the
    compilations and captures of a fast run), peak memory, how many step graphs and shapes it took."""
    start = marks.get(steady_from, (tokens0, 0.0)) if steady_from != step0 else (tokens0, 0.0)
    end = marks[max(marks)] if marks else (progress.tokens, elapsed)  # the last step, before a final evaluation
    peak, kind = peak_memory(device)
    return {
        "steps": progress.step - step0, "tokens": progress.tokens - tokens0, "train_s": elapsed,
        "tokens_per_s": (progress.tokens - tokens0) / max(elapsed, 1e-9),
        "steady_from_step": steady_from, "steady_tokens_per_s": (end[0] - start[0]) / max(end[1] - start[1], 1e-9),
        "peak_memory_mb": peak, "memory_kind": kind, "graphs": len(step.graphs),
        "shape_plan": shapes.describe() if shapes is not None else None,
        "unplanned_shapes": len(shapes.unplanned) if shapes is not None else 0,
    }


@contextlib.contextmanager
def room_for_shapes(static_shapes: bool):
    """Let a policy compiled for static shapes compile every distinct shape of the run, for this run only.

    Static shapes (padding-free rows, FlexAttention, see commands.common.compile_policy) compile one graph per row length
    and per mode: a DPO reference runs the same code under no_grad, a full-DPO reference is a second module, and
    held-out batches add their lengths, e.g. ~20 graphs for HH DPO at batch 8 with rows rounded to 512. torch's
    default of 8 graphs per function would run the later ones uncompiled.
    """
    if not static_shapes:
        yield
        return
    with torch._dynamo.config.patch(recompile_limit=256, accumulated_recompile_limit=1024):
        yield


@contextlib.contextmanager
def _hooks_removed_after(optimizer):
    """The model outlives training: an in-backward optimizer's hooks must not step it on a later backward."""
    try:
        yield
    finally:
        if isinstance(optimizer, InBackwardAdamW):
            optimizer.remove_hooks()
