"""Where does a training step's time go? Profile minialign's step for one configuration on the GPU.

    python benchmarks/profile_step.py --config sft-full --batch-size 16 --variant graph-buckets [--trace t.json.gz]

Runs exactly what ``bench_gpu.py`` times (same workload, batches and variants), profiles only steady-state
steps (after warm-up and compilation), and prints per step: the wall time, the summed kernel time and the
top kernels / CPU ops, so the CPU-dispatch wall and the GPU wall can be told apart (benchmarks/NOTES.md
records what was found).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="sft-lora", choices=list(bench_gpu.CONFIGS))
    p.add_argument("--variant", default="cudagraphs", choices=list(bench_gpu.VARIANTS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--trace", default=None, help="write a Chrome trace here (.json or .json.gz)")
    args = p.parse_args()
    bench_args = bench_gpu.parse_args(["--steps", str(args.steps), "--warmup", str(args.warmup)])
    bench_args.model = "pythia-70m"
    task, mode, packing = bench_gpu.CONFIGS[args.config]
    data, tok = bench_gpu.find_shared(bench_gpu.HH), bench_gpu.find_shared(bench_gpu.TOKENIZER)
    workload = bench_gpu.load_workload(task, data, tok, bench_args.max_length, bench_args.max_prompt_length)
    device = torch.device(args.device)
    # The profiler advances once per training step (measure's on_step) and records only the last ``steps`` steps.
    # Graph variants over batches of several shapes warm up over every distinct batch (see run_minialign).
    v = bench_gpu.VARIANTS[args.variant]
    warmup = args.warmup + args.steps if v["compile"] == "reduce-overhead" and not v.get("static") else args.warmup
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                   schedule=schedule(wait=warmup - 1, warmup=1, active=args.steps, repeat=1))
    t0 = time.perf_counter()
    with prof:
        row = bench_gpu.run_minialign(task, mode, packing, args.batch_size, workload, bench_args, device, args.variant,
                                      on_step=prof.step)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    steps = [e for e in prof.events() if e.name.startswith("ProfilerStep")]
    step_ms = [e.time_range.elapsed_us() / 1e3 for e in steps]
    print(f"== {args.config} {args.variant} batch {args.batch_size}: {row['tokens_per_s']:,.0f} tok/s, "
          f"peak {row['peak_memory_mb']:,.0f} MiB, run {time.perf_counter() - t0:.0f} s")
    print(f"   profiled steps (wall ms, host side): {[round(x, 2) for x in step_ms]}; "
          f"kernel time per step {kernel_us / 1e3 / max(len(steps), 1):.2f} ms")
    print(events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
