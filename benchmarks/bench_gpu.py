#!/usr/bin/env python3
"""minialign vs TRL + PEFT, side by side on one GPU: throughput, peak memory and MFU.

    python benchmarks/bench_gpu.py --out benchmarks/results/h100.json [--steps 20 --warmup 5] [--small]

For each configuration (SFT on chosen, DPO; LoRA r=8 and full fine-tuning; SFT LoRA with packing) it runs
TRL at batch 16 and minialign at the same batch on the same batches, then minialign at larger batches
(64, 128, 256; the ladder stops at the first out-of-memory) to find its best. Every run starts from a
fresh model; one that fails is recorded with its error and the benchmark goes on. Results are written
after every run (so a cut-off run still leaves its rows), and a markdown table is printed at the end and
saved next to the JSON (``.md``). Without a CUDA GPU it runs the ``--small`` CPU workload (``tiny`` model,
built-in demo data, a few steps), which only checks that everything runs. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):  # minialign need not be installed; trl_peer lives beside this file
    if p not in sys.path:
        sys.path.insert(0, p)

import torch
import trl_peer
from bench_table import _f, write_markdown
from mfu import add_mfu, matmul_peak, model_shape
from minialign_runs import BETA, LORA_R, VARIANTS, run_minialign
from trl_peer import LR, load_workload, reset_memory

HH = "data/hh-rlhf/harmless-base/test.jsonl.gz"
TOKENIZER = "tokenizers/gpt-neox-20b/tokenizer.json"
# Where the read-only shared/ folder may be: beside the checkout (developer machine), inside it, or copied
# into a git-ignored folder that travels to the GPU machine (.whl/shared or .carry/shared).
SHARED_CANDIDATES = [ROOT.parent / "shared", ROOT / "shared", ROOT / ".whl" / "shared", ROOT / ".carry" / "shared"]
CONFIGS = {
    "sft-lora": ("sft", "lora", False),
    "sft-full": ("sft", "full", False),
    "dpo-lora": ("dpo", "lora", False),
    "dpo-full": ("dpo", "full", False),
    "sft-lora-packed": ("sft", "lora", True),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def find_shared(rel: str) -> str | None:
    env = os.environ.get("MINIALIGN_SHARED")
    for base in ([Path(env)] if env else []) + SHARED_CANDIDATES:
        if (base / rel).is_file():
            return str(base / rel)
    return None


def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the results file of that card."""
    words = [w for w in name.lower().replace("nvidia", "").split() if w]
    return words[0] if words else "gpu"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------- one guarded run


def torch_globals() -> dict:
    """Process-wide torch settings that change kernel choice: recorded before every run, so runs can be compared."""
    b = torch.backends
    return {"float32_matmul_precision": torch.get_float32_matmul_precision(), "cuda_matmul_tf32": b.cuda.matmul.allow_tf32,
            "cudnn_tf32": b.cudnn.allow_tf32, "bf16_reduced_reduction": b.cuda.matmul.allow_bf16_reduced_precision_reduction,
            "sdp": [b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(), b.cuda.math_sdp_enabled()],
            "deterministic": torch.are_deterministic_algorithms_enabled(), "grad_enabled": torch.is_grad_enabled(),
            "default_dtype": str(torch.get_default_dtype()), "autocast_cache": torch.is_autocast_cache_enabled()}


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def guarded(label: str, fn, base: dict, device) -> tuple[dict, bool]:
    """Run ``fn()``; on failure return ``base`` + ``error`` (and whether it was an OOM). Never raises."""
    log(f"start {label}")
    t0 = time.perf_counter()
    oom = False
    # What earlier runs left allocated is inside this run's peak: recorded, so a leak would show.
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    settings = torch_globals()
    try:
        row = fn()
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not stop the benchmark
        oom = is_oom(exc)
        text = "out of memory" if oom else f"{type(exc).__name__}: {str(exc).strip()[:800]}"
        if not oom:
            traceback.print_exc()
            sys.stderr.flush()
        row = dict(base, tokens_per_s=None, pairs_per_s=None, peak_memory_mb=None, final_loss=None, error=text)
        if oom:
            row["error_detail"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        del exc
    gc.collect()
    reset_memory(device)
    row["wall_s"] = time.perf_counter() - t0
    row["allocated_before_mb"] = before
    row["torch_globals_before"] = settings
    if row.get("error"):
        log(f"FAILED {label}: {row['error'][:200]} ({row['wall_s']:.1f} s)")
    else:
        pairs = f", {_f(row.get('pairs_per_s'), '{:,.1f}')} pairs/s" if row.get("pairs_per_s") else ""
        log(f"done {label}: {_f(row.get('tokens_per_s'))} tok/s{pairs}, peak {_f(row.get('peak_memory_mb'))} MiB, "
            f"loss {_f(row.get('final_loss'), '{:.4f}')} ({row['wall_s']:.1f} s)")
    return row, oom


def write_json(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="JSON to write (and .md); default benchmarks/results/<gpu>.json, e.g. h200.json "
                        "(--small: cpu-small.json)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default 20; --small 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5; --small 1)")
    p.add_argument("--small", action="store_true", help="tiny model, demo data, a few steps: a CPU smoke test")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--model", default=None, help="default pythia-70m (--small: tiny)")
    p.add_argument("--data", default=None, help=f"preference data (default: shared/{HH}; --small: demo)")
    p.add_argument("--tokenizer", default=None, help=f"tokenizer (default: shared/{TOKENIZER}; --small: demo)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--trl-batch-sizes", default=None, help="TRL batches (default 16; --small 4); ladder stops at OOM")
    p.add_argument("--batch-sizes", default=None,
                   help="minialign batches (default 16,64,128,256; --small 4,8); the ladder stops at the first OOM")
    p.add_argument("--no-trl", action="store_true", help="minialign only")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="also run TRL with gradient checkpointing on (TRL's own default) at its first batch size")
    p.add_argument("--variants", default="eager,cudagraphs,flat-static,flat-gc-oib",
                   help=f"minialign variants at the TRL batch size, from {', '.join(VARIANTS)}")
    p.add_argument("--ladder-variants", default="cudagraphs,flat-static",
                   help="minialign variants for the larger batches (comma list)")
    p.add_argument("--ladder-configs", default=None, help="configs that get the larger batches (default: all)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out (same device) and add this run's; its command is added too")
    p.add_argument("--loss-chunk-size", type=int, default=0,
                   help="minialign: output-projection rows per chunk of the loss (0: its default, ~2^25 logits)")
    p.add_argument("--process-warmup-s", type=float, default=None,
                   help="untimed short training runs for this long before the first timed one (default 45; --small 0); "
                        "see benchmarks/NOTES.md, entry 12")
    p.add_argument("--budget-s", type=float, default=0,
                   help="skip runs that would start after this many seconds (0: no limit); rows say 'skipped'")
    return p.parse_args(argv)


def main(argv=None) -> int:
    # The GPU machine has no network: never let the hub client wait on retries. Set before anything imports
    # huggingface_hub (nothing at module level does), so importing this module has no side effect.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda:
        log("no CUDA GPU found: running in --small mode on the CPU instead of the GPU benchmark "
            "(unless given: tiny model, demo data and tokenizer, 2 steps, batches 4 and 8)")
        args.small = True
    device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    small = args.small
    args.steps = args.steps if args.steps is not None else (2 if small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if small else 5)
    args.process_warmup_s = args.process_warmup_s if args.process_warmup_s is not None else (0 if small else 45)
    args.model = args.model or ("tiny" if small else "pythia-70m")
    args.data = args.data or ("demo" if small else find_shared(HH))
    args.tokenizer = args.tokenizer or ("demo" if small else find_shared(TOKENIZER))
    trl_sizes = ints(args.trl_batch_sizes or ("4" if small else "16"))
    sizes = ints(args.batch_sizes or ("4,8" if small else "16,64,128,256"))
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or args.data is None or args.tokenizer is None:
        msg = (f"unknown configs {unknown}; choose from {list(CONFIGS)}" if unknown else
               f"cannot find shared/{HH if args.data is None else TOKENIZER} in any of "
               f"{[str(c) for c in SHARED_CANDIDATES]}: pass --data and --tokenizer (or set MINIALIGN_SHARED)")
        print(f"error: {msg}", file=sys.stderr)
        return 2
    from minialign.training.bench import device_name

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{'cpu-small' if small else gpu_slug(device_name(device))}.json")

    # One line per run in the log, not a progress bar per dataset.map. datasets comes with trl: without it
    # only the TRL rows fail (and say why).
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()

    log(f"device {device_name(device)}; torch {torch.__version__}; model {args.model}; data {args.data}; "
        f"tokenizer {args.tokenizer}; steps {args.steps} after {args.warmup} warm-up")
    log("versions: " + ", ".join(f"{n} {_version(n)}" for n in (
        "transformers", "trl", "peft", "accelerate", "datasets", "pyarrow", "fsspec", "huggingface-hub")))
    peak, peak_how = matmul_peak(device)
    log(f"measured matmul peak: {peak / 1e12:.3g} TFLOP/s ({peak_how})")
    shape = model_shape(args.model)
    log(f"model shape: {shape}")
    trl_version = _version("trl")
    have_trl, trl_import_error = False, ""
    if not args.no_trl:
        try:
            import datasets
            import peft  # noqa: F401
            from trl import DPOTrainer, SFTTrainer  # noqa: F401

            have_trl = True
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            log(f"TRL cannot be imported ({type(exc).__name__}: {exc}); TRL rows will record the error")
            trl_import_error = f"trl not importable: {type(exc).__name__}: {exc}"
    doc = {
        "device": device_name(device), "torch": torch.__version__, "transformers": _version("transformers"),
        "trl": trl_version, "peft": _version("peft"), "accelerate": _version("accelerate"),
        "datasets": _version("datasets"), "pyarrow": _version("pyarrow"), "fsspec": _version("fsspec"),
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "small": small,
        "steps": args.steps, "warmup": args.warmup, "peak_tflops": peak / 1e12, "peak_measured_with": peak_how,
        "workload": {"model": args.model, "data": args.data, "tokenizer": args.tokenizer,
                     "max_length": args.max_length, "max_prompt_length": args.max_prompt_length, "lora_r": LORA_R,
                     "lora_alpha": 2 * LORA_R, "dpo_beta": BETA, "lr": LR, "precision": "bf16 autocast, fp32 weights"
                     if device.type == "cuda" else "fp32", "order": "minialign batch_indices(seed=0, epoch=0)"},
        "model_shape": shape, "flops_formula": "see benchmarks/README.md (MFU)", "results": [],
    }
    doc["commands"] = [doc["command"]]
    if args.append and out.is_file():
        earlier = json.loads(out.read_text(encoding="utf-8"))
        if earlier.get("device") != doc["device"]:
            print(f"error: --append: {out} holds results of {earlier.get('device')}, not {doc['device']}", file=sys.stderr)
            return 2
        doc["commands"] = earlier.get("commands", [earlier.get("command")]) + doc["commands"]
        doc["results"] = earlier["results"]
        for key, value in earlier.items():  # notes added to the file by hand (e.g. which commit made which call)
            doc.setdefault(key, value)

    # Tokenize once per task; the same ids in the same order feed both trainers.
    workloads: dict[str, tuple] = {}
    for name in configs:
        task = CONFIGS[name][0]
        if task not in workloads:
            t0 = time.perf_counter()
            workloads[task] = load_workload(task, args.data, args.tokenizer, args.max_length, args.max_prompt_length)
            log(f"{task}: {len(workloads[task][1])} examples tokenized in {time.perf_counter() - t0:.1f} s")

    # The plan: equal-batch comparisons of every config first (they matter most if time runs out), then
    # the minialign ladders, then extra TRL runs.
    plan: list[tuple[str, str, int, dict]] = []  # (phase, config, batch, extra)
    for name in configs:
        if not args.no_trl:
            plan.append(("trl", name, trl_sizes[0], {}))
        for variant in args.variants.split(","):
            plan.append(("minialign", name, sizes[0], {"variant": variant.strip()}))
    ladder = [c.strip() for c in args.ladder_configs.split(",")] if args.ladder_configs else configs
    for name in [c for c in configs if c in ladder]:
        for b in sizes[1:]:
            for variant in args.ladder_variants.split(","):
                plan.append(("minialign", name, b, {"variant": variant.strip()}))
        if not args.no_trl:
            for b in trl_sizes[1:]:
                plan.append(("trl", name, b, {}))
            if args.trl_gradient_checkpointing:
                plan.append(("trl", name, trl_sizes[0], {"gradient_checkpointing": True}))

    # The first training runs of a process ran 6-7x slower than later ones on the H200, TRL and eager minialign alike
    # (SFT full: TRL 7,436 then 60,550 tok/s; benchmarks/NOTES.md entry 12), with the same torch settings. So the
    # process is first warmed for --process-warmup-s with untimed short TRL runs (eager minialign runs without TRL).
    def trl_run(name: str, b: int, steps: int, warmup: int, ckpt: bool = False):
        task, mode, packing = CONFIGS[name]
        return functools.partial(
            trl_peer.run_trl, task, mode, b, steps, warmup, args.data, args.tokenizer, args.max_length, device,
            max_prompt_length=args.max_prompt_length, model_name=args.model, packing=packing,
            gradient_checkpointing=ckpt, lora_r=LORA_R, beta=BETA, workload=workloads[task])

    def minialign_run(name: str, b: int, variant: str):
        task, mode, packing = CONFIGS[name]
        return functools.partial(run_minialign, task, mode, packing, b, workloads[task], args, device, variant)

    # The warm-up takes turns over the plan's tasks: TRL's first DPOTrainer run of a process was cold (14k tok/s, then
    # 50-145k) even after ten SFTTrainer runs had warmed the process (NOTES.md entry 17).
    runs_before, trl_tasks_run = 0, set()
    firsts: dict[str, tuple[str, int]] = {}  # task -> its first (config, batch) in the plan
    for _, name, b, _ in plan:
        firsts.setdefault(CONFIGS[name][0], (name, b))
    warm_plan = list(firsts.values())
    t_warm = time.perf_counter()
    while plan and args.process_warmup_s > 0 and time.perf_counter() - t_warm < args.process_warmup_s:
        name, b = warm_plan[runs_before % len(warm_plan)]
        warm = trl_run(name, b, 8, 8) if have_trl else minialign_run(name, b, "eager")
        guarded(f"process warm-up {runs_before + 1} ({name}, untimed)", warm, {}, device)
        if have_trl:
            trl_tasks_run.add(CONFIGS[name][0])
        runs_before += 1
    doc["process_warmup"] = {"seconds": time.perf_counter() - t_warm, "runs": runs_before,
                             "with": "trl" if have_trl else "minialign eager"}

    oom_at: dict[tuple[str, str, bool], int] = {}  # (trainer, config, checkpointing) -> smallest OOM batch
    for i, (trainer, name, b, extra) in enumerate(plan, 1):
        task, mode, packing = CONFIGS[name]
        ckpt = bool(extra.get("gradient_checkpointing"))
        base = {"trainer": trainer, "task": task, "mode": mode, "batch_size": b, "packing": packing,
                "device": str(device), "steps": args.steps, "warmup": args.warmup, "mfu": None, "mfu_6n": None}
        if ckpt:
            base["gradient_checkpointing"] = True
        variant = extra.get("variant", "")
        if variant:
            base["variant"] = variant
        label = f"({i}/{len(plan)}) {trainer} {name} batch {b} {variant}" + (" checkpointing" if ckpt else "")
        key = (trainer, name, ckpt or variant)
        if key in oom_at and b > oom_at[key]:
            log(f"skip {label}: out of memory at batch {oom_at[key]}")
            continue
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            log(f"skip {label}: time budget of {args.budget_s:.0f} s spent")
            doc["results"].append(dict(base, tokens_per_s=None, pairs_per_s=None, peak_memory_mb=None,
                                       final_loss=None, error="skipped: time budget spent"))
            write_json(out, doc)
            continue
        if trainer == "trl" and not have_trl:
            row = dict(base, tokens_per_s=None, pairs_per_s=None, peak_memory_mb=None, final_loss=None,
                       error="skipped: --no-trl" if args.no_trl else trl_import_error)
        else:
            run = trl_run(name, b, args.steps, args.warmup, ckpt) if trainer == "trl" else minialign_run(name, b, variant)
            row, oom = guarded(label, run, base, device)
            if oom:
                oom_at[key] = min(b, oom_at.get(key, b))
        row["call"] = len(doc["commands"]) - 1  # which command made it
        row["runs_before_in_process"] = runs_before
        # The rule behind the committed results' flag (NOTES.md 12); compiled runs warm up while they compile.
        # A TRL run is cold too when it is the first of its task in the process.
        cold = runs_before < 3 or (trainer == "trl" and task not in trl_tasks_run)
        row["cold_process"] = cold and not (trainer == "minialign" and row.get("compile"))
        if trainer == "trl":
            trl_tasks_run.add(task)
        runs_before += 1
        doc["results"].append(add_mfu(row, shape, peak))
        doc["total_s"] = time.perf_counter() - t_start
        write_json(out, doc)
        write_markdown(out, doc)

    doc["total_s"] = time.perf_counter() - t_start
    write_json(out, doc)
    table = write_markdown(out, doc)
    print(table, flush=True)
    log(f"wrote {out} and {out.with_suffix('.md')} in {doc['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
