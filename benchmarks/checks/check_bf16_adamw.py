"""StochasticAdamW on a GPU, on parameters shaped like llama-1b's (1.07B, bf16): cost and correctness.

    python benchmarks/checks/check_bf16_adamw.py [--out check_bf16_adamw.json] [--model llama-1b]

* time per step: the fused (compiled) update, the op-by-op one, and torch's fused AdamW on float32 weights (what
  full fine-tuning runs without ``--base-dtype bfloat16``), after a warm-up;
* the first compiled step in a fresh process with empty compile caches (what a run's first step pays), with
  inductor's default compile workers and with ``TORCHINDUCTOR_COMPILE_THREADS=1``;
* correctness: compiled against op-by-op on the same gradients (moments equal; weights within a few bf16
  spacings), and one update captured in a CUDA graph and replayed: each replay draws new rounding noise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # minialign need not be installed

import torch

from minialign.training.optim import StochasticAdamW


def shapes(model: str) -> list[tuple[int, ...]]:
    from minialign.modeling.models import load_model

    with torch.device("meta"):
        return [tuple(p.shape) for p in load_model(model).parameters()]


def params(sizes, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen).mul_(0.02).to(dtype)) for s in sizes]


def set_grads(ps, seed=1):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen, dtype=p.dtype)


def time_steps(opt, ps, n=10) -> float:
    set_grads(ps)
    opt.step()  # warm-up (and compilation)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


def first_step(model: str) -> dict:
    """One compiled step in this (fresh) process: seconds, compilation included."""
    ps = params(shapes(model), torch.bfloat16)
    set_grads(ps)
    opt = StochasticAdamW(ps, lr=1e-5, compiled=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    return {"first_step_s": time.perf_counter() - t0}


def fresh_first_step(model: str, threads: str | None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
        if threads:
            env["TORCHINDUCTOR_COMPILE_THREADS"] = threads
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--first-step", "--model", model], env=env,
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["process_s"] = time.perf_counter() - t0
        return row


def correctness(sizes) -> dict:
    small = sizes[:20]
    a, b = params(small, torch.bfloat16), params(small, torch.bfloat16)
    eager, fused = StochasticAdamW(a, lr=1e-2, compiled=False), StochasticAdamW(b, lr=1e-2, compiled=True)
    for step in range(3):
        set_grads(a, seed=10 + step)
        set_grads(b, seed=10 + step)
        eager.step()
        fused.step()
    moments = max((eager.state[p][k] - fused.state[q][k]).abs().max().item()
                  for p, q in zip(a, b) for k in ("exp_avg", "exp_avg_sq"))
    spacings = max(((p.float() - q.float()).abs() / (p.float().abs().clamp(min=1e-3) * 2 ** -7)).max().item()
                   for p, q in zip(a, b))
    # one update captured and replayed: different noise each replay, so replays of the same update disagree
    w = torch.nn.Parameter(torch.full((1 << 20,), 1.0, device="cuda", dtype=torch.bfloat16))
    w.grad = torch.ones_like(w)
    opt = StochasticAdamW([w], lr=torch.tensor(1e-4, device="cuda"), compiled=True)
    opt.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    start = w.detach().clone()
    graph.replay()
    once = w.detach().clone()
    graph.replay()
    moved_1, moved_2 = (start - once).float().mean().item(), (once - w.detach()).float().mean().item()
    same_noise = torch.equal((start - once), (once - w.detach()))
    return {"max_moment_diff": moments, "max_weight_diff_in_spacings": spacings, "replay_mean_step": [moved_1, moved_2],
            "replays_drew_the_same_noise": same_noise}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--out", default="")
    ap.add_argument("--first-step", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_step:
        print(json.dumps(first_step(args.model)))
        return 0
    sizes = shapes(args.model)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model,
              "params": sum(torch.Size(s).numel() for s in sizes)}
    result["first_compiled_step"] = {"default_workers": fresh_first_step(args.model, None),
                                     "compile_threads_1": fresh_first_step(args.model, "1")}
    result["correctness"] = correctness(sizes)
    ms = {}
    for name, make in {
        "compiled_bf16": lambda: (ps := params(sizes, torch.bfloat16), StochasticAdamW(ps, lr=1e-5, compiled=True)),
        "op_by_op_bf16": lambda: (ps := params(sizes, torch.bfloat16), StochasticAdamW(ps, lr=1e-5, compiled=False)),
        "torch_fused_adamw_fp32": lambda: (ps := params(sizes, torch.float32), torch.optim.AdamW(ps, lr=1e-5, fused=True)),
    }.items():
        ps, opt = make()
        ms[name] = time_steps(opt, ps)
        del ps, opt
        torch.cuda.empty_cache()
    result["step_ms"] = ms
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
