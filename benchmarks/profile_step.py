"""Where does a training step's time go? Profile minialign's step for one configuration on the GPU.

    python benchmarks/profile_step.py --task sft --mode lora --batch-size 16 [--compile] [--out trace.json]

Prints the wall time per step, the GPU-busy time per step (sum of kernel times) and the top kernels/ops,
so the CPU-dispatch wall and the GPU wall can be told apart (benchmarks/NOTES.md records what was found).
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from minialign.bench import measure
from minialign.data import collate_pairs, collate_sft, load_preference_pairs, tokenize_pairs, tokenize_sft
from minialign.models import load_model, load_tokenizer


def batches(args, tok, n: int = 8) -> list[dict]:
    pairs = load_preference_pairs(args.data, limit=n * args.batch_size)
    kw = dict(max_length=512, max_prompt_length=256)
    if args.task == "sft":
        ex = tokenize_sft(pairs, tok, **kw)
        return [collate_sft(ex[i * args.batch_size:(i + 1) * args.batch_size], pad_id=0, pad_to_multiple_of=args.pad) for i in range(n)]
    ex = tokenize_pairs(pairs, tok, **kw)
    return [collate_pairs(ex[i * args.batch_size:(i + 1) * args.batch_size], pad_id=0, pad_to_multiple_of=args.pad) for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sft", choices=["sft", "dpo"])
    p.add_argument("--mode", default="lora", choices=["lora", "full"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pad", type=int, default=64)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--data", default="../shared/data/hh-rlhf/harmless-base/test.jsonl.gz")
    p.add_argument("--tokenizer", default="../shared/tokenizers/gpt-neox-20b/tokenizer.json")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", default=None, help="write a Chrome trace here")
    args = p.parse_args()
    bs = batches(args, load_tokenizer(args.tokenizer))
    kwargs = dict(task=args.task, full=args.mode == "full", device="cuda", compile=args.compile)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        m = measure(load_model("pythia-70m"), bs, steps=args.steps, warmup=4, **kwargs)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") if hasattr(events[0], "device_type") else 0
    print(f"{args.task} {args.mode} bs={args.batch_size} compile={args.compile}: {m.tokens_per_s:,.0f} tok/s, "
          f"{m.peak_memory_mb:,.0f} MB; profiled {args.steps + 4} steps in {wall:.2f} s; GPU busy {gpu_us / 1e6:.3f} s")
    print(events.table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
    if args.out:
        prof.export_chrome_trace(args.out)


if __name__ == "__main__":
    main()
