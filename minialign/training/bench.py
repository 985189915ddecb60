"""Measure training speed and peak memory of one configuration on fixed batches.

Used by `minialign run` (LoRA vs full fine-tuning, ``compare_modes``) and by `benchmarks/bench_gpu.py` (against
TRL + PEFT). Throughput counts real (non-padding) tokens over steady-state steps only: the first ``warmup`` steps
(allocator growth, kernel selection, compilation) are excluded. Memory is the CUDA allocator's peak on a
GPU and the process's peak resident set on a CPU — a different quantity, so it is labelled.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minialign.base.devices import autocast, device_name, peak_memory, peak_rss_mb, reset_peak_memory, sync
from minialign.config.schema import TrainConfig
from minialign.data import tokens_in
from minialign.modeling import lora, offload
from minialign.modeling.policy import TokenLogps
from minialign.ops.losses import PreferenceLoss
from minialign.ops.shapes import ShapePlan
from minialign.training.batches import prepare_batch
from minialign.training.graphs import GraphedStep, graph_key
from minialign.training.optim import InBackwardAdamW, make_optimizer
from minialign.training.tasks import DPOTask, SFTTask, adapter_reference, frozen_copy, frozen_reference
from minialign.training.train import room_for_shapes, step_functions

__all__ = ["Measurement", "measure", "compare_modes", "alternating_schedule", "examples_in", "device_name",
           "peak_rss_mb"]


@dataclass
class Measurement:
    mode: str  # "lora" | "full"
    task: str  # "sft" | "dpo"
    batch_size: int
    tokens_per_s: float
    pairs_per_s: float | None
    peak_memory_mb: float
    memory_kind: str  # "cuda_max_allocated" | "cpu_peak_rss"
    device: str
    final_loss: float
    steps: int
    held_before_mb: float = 0.0  # CUDA memory still allocated when the run started (earlier runs of the process)


def measure(model, batches: list[dict], *, task: str, full: bool, lora_r: int = 8, steps: int = 20, warmup: int = 3,
            lr: float = 1e-4, beta: float = 0.1, device: torch.device | str = "cpu", compile: bool | str = False,
            grad_checkpointing: bool = False, optim_in_backward: bool = False,
            chunk_size: int | None = None, target_multiple: int = 64, cuda_graphs: bool = False,
            on_step: Callable[[], None] | None = None, compile_scope: str = "blocks",
            shapes: ShapePlan | None = None, varlen: bool = False, attention: str = "auto") -> Measurement:
    """Train ``model`` (consumed: LoRA is applied in place) for ``warmup + steps`` steps over ``batches``.

    Set up exactly as ``minialign sft|dpo`` do: on a GPU, LoRA's frozen base weights are bf16. Gradients are
    clipped to norm 1 (with ``optim_in_backward``, AdamW stepped inside backward, by the previous step's norm, as in
    training). ``chunk_size``: rows of the output projection computed at once (None: ``logprobs.default_chunk_size``);
    ``target_multiple``: their count is rounded up to a multiple of it (``add_target_index``), as training does.
    ``cuda_graphs``: each step replayed as one CUDA graph (``minialign.training.graphs``); every distinct batch shape is
    captured after the first step, before the timed ones, as a long run would have done by then.
    ``on_step``: called after every step, warm-up included (a profiler's step boundary).
    ``shapes`` / ``varlen``: padding-free batches padded to their planned shapes and run with varlen attention, as
    ``train.train`` prepares them (``batches.prepare_batch``); ``attention``: as ``--attention``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    held = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    if not full:
        if device.type == "cuda":
            model.to(torch.bfloat16)
        lora.apply_lora(model, lora.LoRAConfig(r=lora_r, alpha=2 * lora_r), dtype=torch.float32)
    model.to(device).train()
    if grad_checkpointing:
        offload.checkpoint_blocks(model)
    # compile: True (dynamic shapes), or a torch.compile mode such as "default" or "reduce-overhead" (static shapes:
    # one graph per distinct row length, as FlexAttention needs). The transformer is compiled, see compile_body.
    compile_kwargs = ({"mode": compile, "dynamic": False} if isinstance(compile, str) else {"dynamic": True}) if compile else None
    if compile_kwargs:
        compile_kwargs["scope"] = compile_scope
    policy = TokenLogps(model, chunk_size, attention=attention)
    if compile_kwargs:
        policy.compile_body(**compile_kwargs)
    if task == "sft":
        objective = SFTTask()
    else:
        if full:
            ref = TokenLogps(frozen_copy(model, device), chunk_size, attention=attention)
            if compile_kwargs:
                ref.compile_body(**compile_kwargs)
            reference = frozen_reference(ref, False)
        else:
            reference = adapter_reference(policy, False)
        objective = DPOTask(reference, PreferenceLoss(beta=beta))
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=lr, optim_in_backward=optim_in_backward, max_grad_norm=1.0)
    optimizer = make_optimizer(params, cfg, device)
    step = GraphedStep(*step_functions(policy, objective, optimizer, params, cfg, autocast(device)), optimizer, device,
                       enabled=cuda_graphs)
    tokens = pairs = 0
    loss = torch.zeros((), device=device)
    start = None
    # host work, once, outside the timing
    indexed = [prepare_batch(b, target_multiple=target_multiple, shapes=shapes, varlen=varlen) for b in batches]
    with room_for_shapes(isinstance(compile, str)):  # static shapes: one compiled graph per row length
        for i in range(warmup + steps):
            if i == 1 and cuda_graphs:
                for shape in {graph_key(b): b for b in indexed}.values():
                    step.prepare(shape)
            if i == warmup:
                sync(device)
                start = time.perf_counter()
            batch = indexed[i % len(batches)]
            if i >= warmup:
                tokens += tokens_in(batch)
                pairs += batch.get("n_pairs", 0)
            units = objective.units(batch)
            sums, _ = step([batch], 1.0 / units)
            loss = sums["loss"] / units
            if on_step is not None:
                on_step()
    sync(device)
    elapsed = time.perf_counter() - start
    if isinstance(optimizer, InBackwardAdamW):
        optimizer.remove_hooks()
    peak, kind = peak_memory(device)
    return Measurement(
        mode="full" if full else "lora", task=task, batch_size=examples_in(batches[0]),
        tokens_per_s=tokens / elapsed, pairs_per_s=pairs / elapsed if task == "dpo" else None,
        peak_memory_mb=peak, memory_kind=kind, device=device_name(device), final_loss=float(loss), steps=steps,
        held_before_mb=held,
    )


def examples_in(batch: dict) -> int:
    """Pairs of a DPO batch, sequences of an SFT one (one padding-free row holds them all)."""
    return batch.get("n_pairs") or batch.get("n_sequences") or batch["input_ids"].shape[0]


def alternating_schedule(modes: Sequence[str], repeats: int) -> list[tuple[str, bool]]:
    """(mode, timed) in the order the runs happen: one untimed warm-up run of each mode, then the modes in turn,
    ``repeats`` times (L F L F L F). The first run of a process is several times slower than later ones
    (benchmarks/NOTES.md, entry 12) and a machine's speed drifts; taking turns spreads both over every mode."""
    return [(mode, False) for mode in modes] + [(mode, True) for _ in range(repeats) for mode in modes]


def compare_modes(load: Callable[[], torch.nn.Module], batches: list[dict], *, repeats: int = 3,
                  modes: Sequence[str] = ("lora", "full"),
                  on_run: Callable[[str, bool, Measurement], None] | None = None, **kwargs) -> dict:
    """LoRA vs full fine-tuning measured fairly in this one process: ``alternating_schedule``'s runs, each on a fresh
    model from ``load()`` and the same ``batches`` (``measure``'s other settings in ``kwargs``).

    Returns ``runs`` (every run in order, warm-ups marked ``timed: False``) and ``modes``: per mode, the median
    tokens/s and peak memory of its timed runs with their spread (``*_min``, ``*_max``) and count (``repeats``).
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    device = torch.device(kwargs.get("device", "cpu"))
    runs = []
    for mode, timed in alternating_schedule(modes, repeats):
        gc.collect()  # the previous run's model, optimizer and graphs, before this run's peak is counted
        if device.type == "cuda":
            torch.cuda.empty_cache()
        m = measure(load(), batches, full=mode == "full", **kwargs)
        # Each run's own peak: what an earlier run of the process still holds is not this mode's memory.
        m = dataclasses.replace(m, peak_memory_mb=m.peak_memory_mb - m.held_before_mb)
        runs.append({**dataclasses.asdict(m), "timed": timed})
        if on_run is not None:
            on_run(mode, timed, m)
    return {"runs": runs, "modes": [_mode_summary([r for r in runs if r["mode"] == mode and r["timed"]])
                                    for mode in modes]}


def _mode_summary(runs: list[dict]) -> dict:
    """One row per mode: its first timed run's fields, with the median and spread of tokens/s, pairs/s and memory."""
    row = dict(runs[0])
    del row["timed"]
    for key in ("tokens_per_s", "pairs_per_s", "peak_memory_mb"):
        values = [r[key] for r in runs if r[key] is not None]
        if values:
            row[key] = statistics.median(values)
            row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
    row["repeats"] = len(runs)
    return row
