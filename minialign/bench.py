"""Measure training speed and peak memory of one configuration on fixed batches.

Used by `minialign run` (LoRA vs full fine-tuning) and by `benchmarks/bench_gpu.py` (against TRL + PEFT).
Throughput counts real (non-padding) tokens over steady-state steps only: the first ``warmup`` steps
(allocator growth, kernel selection, compilation) are excluded. Memory is the CUDA allocator's peak on a
GPU and the process's peak resident set on a CPU — a different quantity, so it is labelled.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minialign import lora
from minialign.config import TrainConfig
from minialign.data import tokens_in
from minialign.tasks import DPOTask, SFTTask, TokenLogps, adapter_reference, add_target_index, frozen_copy, frozen_reference
from minialign.graphs import GraphedStep, graph_key
from minialign.optim import InBackwardAdamW, make_optimizer
from minialign.train import _autocast, room_for_shapes, step_functions


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


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def measure(model, batches: list[dict], *, task: str, full: bool, lora_r: int = 8, steps: int = 20, warmup: int = 3,
            lr: float = 1e-4, beta: float = 0.1, device: torch.device | str = "cpu", compile: bool | str = False,
            grad_checkpointing: bool = False, optim_in_backward: bool = False,
            chunk_size: int | None = None, target_multiple: int = 64, cuda_graphs: bool = False,
            on_step: Callable[[], None] | None = None, compile_scope: str = "blocks") -> Measurement:
    """Train ``model`` (consumed: LoRA is applied in place) for ``warmup + steps`` steps over ``batches``.

    Set up exactly as ``minialign sft|dpo`` do: on a GPU, LoRA's frozen base weights are bf16. Gradients are
    clipped to norm 1, except with ``optim_in_backward`` (AdamW stepped inside backward: no clipping, as in
    training). ``chunk_size``: rows of the output projection computed at once (None: ``losses.default_chunk_size``);
    ``target_multiple``: their count is rounded up to a multiple of it (``add_target_index``), as training does.
    ``cuda_graphs``: each step replayed as one CUDA graph (``minialign.graphs``); every distinct batch shape is
    captured after the first step, before the timed ones, as a long run would have done by then.
    ``on_step``: called after every step, warm-up included (a profiler's step boundary).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if not full:
        if device.type == "cuda":
            model.to(torch.bfloat16)
        lora.apply_lora(model, lora.LoRAConfig(r=lora_r, alpha=2 * lora_r), dtype=torch.float32)
    model.to(device).train()
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # compile: True (dynamic shapes), or a torch.compile mode such as "default" or "reduce-overhead" (static shapes:
    # one graph per distinct row length, as FlexAttention needs). The transformer is compiled, see compile_body.
    compile_kwargs = ({"mode": compile, "dynamic": False} if isinstance(compile, str) else {"dynamic": True}) if compile else None
    if compile_kwargs:
        compile_kwargs["scope"] = compile_scope
    policy = TokenLogps(model, chunk_size)
    if compile_kwargs:
        policy.compile_body(**compile_kwargs)
    if task == "sft":
        objective = SFTTask()
    else:
        if full:
            ref = TokenLogps(frozen_copy(model, device), chunk_size)
            if compile_kwargs:
                ref.compile_body(**compile_kwargs)
            reference = frozen_reference(ref, False)
        else:
            reference = adapter_reference(policy, False)
        objective = DPOTask(reference, beta=beta)
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = TrainConfig(lr=lr, optim_in_backward=optim_in_backward, max_grad_norm=0.0 if optim_in_backward else 1.0)
    optimizer = make_optimizer(params, cfg, device)
    step = GraphedStep(*step_functions(policy, objective, optimizer, params, cfg, _autocast(device)), optimizer, device,
                       enabled=cuda_graphs)
    tokens = pairs = 0
    loss = torch.zeros((), device=device)
    start = None
    indexed = [add_target_index(dict(b), target_multiple) for b in batches]  # host work, once, outside the timing
    with room_for_shapes(isinstance(compile, str)):  # static shapes: one compiled graph per row length
        for i in range(warmup + steps):
            if i == 1 and cuda_graphs:
                for shape in {graph_key(b): b for b in indexed}.values():
                    step.prepare(shape)
            if i == warmup:
                _sync(device)
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
    _sync(device)
    elapsed = time.perf_counter() - start
    if isinstance(optimizer, InBackwardAdamW):
        optimizer.remove_hooks()
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        peak, kind = peak_rss_mb(), "cpu_peak_rss"
    return Measurement(
        mode="full" if full else "lora", task=task, batch_size=examples_in(batches[0]),
        tokens_per_s=tokens / elapsed, pairs_per_s=pairs / elapsed if task == "dpo" else None,
        peak_memory_mb=peak, memory_kind=kind, device=device_name(device), final_loss=float(loss), steps=steps,
    )


def examples_in(batch: dict) -> int:
    """Pairs of a DPO batch, sequences of an SFT one (one padding-free row holds them all)."""
    return batch.get("n_pairs") or batch.get("n_sequences") or batch["input_ids"].shape[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_fresh(model_name: str, seed: int, batches: list[dict], **kwargs) -> Measurement:
    """``measure`` on a freshly loaded model; on a CPU in a fresh process, so its peak RSS is its own."""
    from minialign.models import load_model

    if torch.device(kwargs.get("device", "cpu")).type == "cuda":
        return measure(load_model(model_name, seed=seed), batches, **kwargs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure_in_child, model_name, seed, batches, kwargs).result()


def _measure_in_child(model_name: str, seed: int, batches: list[dict], kwargs: dict) -> Measurement:
    from minialign.models import load_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return measure(load_model(model_name, seed=seed), batches, **kwargs)
