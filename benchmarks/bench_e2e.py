#!/usr/bin/env python3
"""Whole-command wall clock, minialign's CLI vs a TRL + PEFT user script, on the identical run, one GPU.

    python benchmarks/bench_e2e.py --task dpo --mode lora --model M --tokenizer T --data FILE \
        --epochs 2 --batch-size 16 --lr 5e-4 --runners trl,minialign-eager,minialign --out benchmarks/results/e2e-h200.json

What users feel is not the steady step rate but how long the command takes: Python start, imports, loading,
tokenizing, compiling, every step, the final held-out evaluation. So each runner is a fresh Python process,
started one after another: wall clock = this process's ``time.time()`` at spawn -> the child's ``t_done`` (TRL:
right after its final ``trainer.evaluate``) or the child's exit (minialign: its final evaluation is inside the
command, and its checkpoint and final save are counted too; ``wall_to_eval_s`` stops at its last metrics write).
Before the first run, one process imports torch, transformers, TRL, PEFT and minialign, so that whichever runner
goes first does not pay alone for reading them from a cold disk. Each run gets fresh, empty torch.compile/Triton
caches by default (``--compile-cache fresh``): a user's first run.

After the timed runs, every result (adapter or full model) is scored by ``e2e_heldout.py`` with the same
evaluator, in its own process, not timed: ``heldout`` in each row. Each row also keeps the trainer's own held-out
metrics (``own_eval``). The JSON (``--append`` keeps earlier runs) gets per-label ratios against TRL, and a
markdown table is written next to it (same name, ``.md``). A failed or timed-out run is recorded with its return
code and the end of its log, and the next runner goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # bench_gpu (default data and results names) lives beside this file
    sys.path.insert(0, str(HERE))
from e2e_table import fmt, markdown, ratios  # noqa: E402
from trl_e2e import add_run_args  # noqa: E402

# Peer runners: (user script, its extra flags). Each writes the same JSON (trl_e2e.run_script).
PEERS: dict[str, tuple[str, list[str]]] = {
    "trl": ("trl_e2e.py", []),
    # TRL's trainer on minialign's token ids and loss mask (SFT): splits a learning gap into data and trainer
    "trl-minialign-data": ("trl_e2e.py", ["--minialign-data"]),
    # TRL's trainer on its own examples in minialign's order (SFT): beside minialign-keep-start only the step differs
    "trl-minialign-order": ("trl_e2e.py", ["--minialign-order"]),
    # Unsloth as its notebooks run it (its offloaded gradient checkpointing, 8-bit AdamW): its low-memory default
    "unsloth": ("unsloth_peer.py", ["--runner", "unsloth", "--grad-checkpointing", "unsloth", "--optim", "adamw_8bit"]),
    # Unsloth at minialign's setting: no recomputation, fused AdamW
    "unsloth-ours": ("unsloth_peer.py", ["--runner", "unsloth-ours", "--grad-checkpointing", "off",
                                         "--optim", "adamw_torch_fused"]),
}
# Runner name -> extra minialign flags (None: a peer script). `--fast` is minialign's one switch for its GPU setting.
RUNNERS: dict[str, list[str] | None] = {
    **{name: None for name in PEERS},
    "minialign-eager": ["--fast", "off"],
    "minialign": ["--fast", "on"],
    "minialign-auto": ["--fast", "auto"],
    "minialign-compile": ["--fast", "on", "--compile"],
    # full fine-tuning of bf16 weights (StochasticAdamW); under LoRA the frozen base is bf16 on CUDA already
    "minialign-bf16": ["--fast", "on", "--base-dtype", "bfloat16"],
    # a float32 frozen base under LoRA (bf16 autocast, TRL's setting), with and without the fast path: they split
    # the fast path from the base's precision when minialign's LoRA learns less than a peer (NOTES entry 24)
    "minialign-fp32base": ["--fast", "on", "--base-dtype", "float32"],
    "minialign-eager-fp32base": ["--fast", "off", "--base-dtype", "float32"],
    # the fast path without gradient clipping: what --optim-in-backward (minialign-lowmem) gave up before it clipped by
    # the previous step's norm, so a gap between this and `minialign` is clipping's, not the memory options'
    "minialign-noclip": ["--fast", "on", "--max-grad-norm", "0"],
    # minialign's memory options together, the rows matched against Unsloth's low-memory default: compiled activation
    # checkpointing and AdamW stepped inside backward (clipped by the previous step's norm); for full fine-tuning,
    # bf16 weights with stochastic-rounding AdamW (which steps after backward) instead. -unclipped: as measured
    # before in-backward clipping existed (NOTES entries 23, 25)
    "minialign-lowmem": ["--fast", "on", "--grad-checkpointing", "--compile", "--optim-in-backward"],
    "minialign-lowmem-unclipped": ["--fast", "on", "--grad-checkpointing", "--compile", "--optim-in-backward",
                                   "--max-grad-norm", "0"],
    "minialign-lowmem-bf16": ["--fast", "on", "--grad-checkpointing", "--compile", "--base-dtype", "bfloat16"],
    # the same memory options without --compile: eager checkpointing (no CUDA graphs), no compilation inside a short
    # run's training time, which is where minialign-lowmem lost its steady-state lead over one epoch (NOTES entry 23)
    "minialign-lowmem-eager": ["--fast", "on", "--grad-checkpointing", "--optim-in-backward"],
    # the same with the checkpoints' inputs in pinned CPU memory, as Unsloth's default keeps its checkpoints
    "minialign-lowmem-offload": ["--fast", "on", "--grad-checkpointing", "--optim-in-backward", "--offload-activations"],
    # and with 128-row loss chunks: the default's 682 rows of a 49k vocabulary hold ~256 MiB (bf16 logits, their
    # float32 copy, the bf16 gradient) at the peak, where offloading left minialign 201 MiB above Unsloth's default
    # (NOTES entry 31); 128 rows hold ~48 MiB
    "minialign-lowmem-lean": ["--fast", "on", "--grad-checkpointing", "--optim-in-backward", "--offload-activations",
                              "--loss-chunk-size", "128"],
    # SFT examples cut as TRL's SFTTrainer cuts them (first --max-length tokens, prompt-only examples dropped): TRL's
    # trainer on minialign's tokens learned as minialign does, so the held-out gap came with the data (NOTES 31)
    "minialign-keep-start": ["--fast", "on", "--truncation", "keep-start"],
}
PROBE = ("import json, platform, torch; from importlib.metadata import version; "
         "print(json.dumps({'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', "
         "'versions': {'python': platform.python_version(), 'torch': torch.__version__, "
         "**{n: version(n) for n in ('transformers', 'trl', 'peft', 'accelerate', 'datasets')}}}))")
WARM = "import torch, transformers, trl, peft, datasets, minialign.cli, minialign.evaluation.evaluate"
LOG_TAIL = 2000
CONFIG_KEYS = ("tokenizer", "data", "train_rows", "eval_rows", "limit", "epochs", "batch_size", "lr", "schedule",
               "warmup_ratio", "beta", "lora_r", "lora_alpha", "max_length", "max_prompt_length", "seed", "compile_cache",
               "chat_template")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_args(p)
    p.add_argument("--data", default=None, help="preference data (default: shared/ HH-RLHF harmless-base test file)")
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--runners", default="trl,minialign-eager,minialign", help=f"comma list of {', '.join(RUNNERS)}")
    p.add_argument("--minialign-args", default="", help="extra flags for every minialign runner (one string)")
    p.add_argument("--label", default="", help="names this configuration in the results (default model-task-mode)")
    p.add_argument("--out", default=None, help="JSON to write (and .md); default benchmarks/results/e2e-<gpu>.json")
    p.add_argument("--append", action="store_true", help="keep the runs already in --out and add this call's")
    p.add_argument("--timeout-s", type=float, default=600, help="per run; a run past it is stopped and recorded")
    p.add_argument("--work", default="runs/e2e", help="run folders and logs")
    p.add_argument("--compile-cache", choices=["fresh", "shared"], default="fresh",
                   help="fresh: empty torch.compile/Triton caches per run (a first run); shared: the user's caches")
    p.add_argument("--no-heldout", action="store_true", help="skip the shared held-out scoring")
    p.add_argument("--no-warm", action="store_true", help="skip the untimed process that reads every library once")
    p.add_argument("--unsloth-site", default=os.environ.get("UNSLOTH_SITE", ""),
                   help="a folder put first on the Unsloth runners' PYTHONPATH (its trl <= 1.15, datasets < 5)")
    p.add_argument("--checkpoint", default="", help="a built-in --model is first saved here (bf16 safetensors, "
                   "untimed, once) and every runner loads it as a user loads a pretrained model")
    args = p.parse_args(argv)
    args.runner_list = [r.strip() for r in args.runners.split(",") if r.strip()]
    unknown = [r for r in args.runner_list if r not in RUNNERS]
    if unknown or not args.runner_list:
        p.error(f"unknown runners {unknown}; choose from {', '.join(RUNNERS)}")
    return args


def child_env(run_dir: Path, fresh_cache: bool, site: str = "") -> dict[str, str]:
    """The children's environment: unbuffered logs, no tokenizer threads, no hub retries, minialign importable
    (``site``: a folder of packages ahead of the rest, for a peer that pins other versions)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), site, env.get("PYTHONPATH", "")) if p)
    if fresh_cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(run_dir / "cache" / "inductor")
        env["TRITON_CACHE_DIR"] = str(run_dir / "cache" / "triton")
    return env


def run_timed(cmd: list[str], log_path: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Run ``cmd`` with stdout+stderr to ``log_path``; times from just before spawn to exit (a blocking wait, so the
    exit time is exact). Past ``timeout_s`` its process group gets SIGTERM (minialign saves a checkpoint), then SIGKILL."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    timed_out = threading.Event()
    with open(log_path, "wb") as log:
        t_spawn = time.time()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

        def stop() -> None:
            timed_out.set()
            for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 0.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    return
                deadline = time.time() + grace
                while proc.returncode is None and time.time() < deadline:  # set by the main thread's wait
                    time.sleep(0.2)
                if proc.returncode is not None:
                    return

        timer = threading.Timer(timeout_s, stop)
        timer.daemon = True
        timer.start()
        rc = proc.wait()
        t_exit = time.time()
        timer.cancel()
    out = {"returncode": rc, "t_spawn": t_spawn, "t_exit": t_exit, "elapsed_s": t_exit - t_spawn,
           "timed_out": timed_out.is_set(), "log": str(log_path), "command": shlex.join(cmd)}
    if rc != 0 or timed_out.is_set():
        out["log_tail"] = log_path.read_text(errors="replace")[-LOG_TAIL:]
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def runner_command(args: argparse.Namespace, runner: str, run_dir: Path) -> list[str]:
    """The exact child command of one runner (same data rows, epochs, batch, optimiser, schedule, model shape)."""
    same = ["--model", args.model, "--tokenizer", args.tokenizer, "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--schedule", args.schedule,
            "--warmup-ratio", str(args.warmup_ratio), "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
            "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
            "--seed", str(args.seed), *(["--chat-template"] if args.chat_template else [])]
    limit = ["--limit", str(args.limit)] if args.limit else []
    if RUNNERS[runner] is None:
        script, flags = PEERS[runner]
        return [sys.executable, str(HERE / script), "--task", args.task, "--mode", args.mode, *same,
                "--data", args.data, "--train-rows", args.train_rows, "--eval-rows", args.eval_rows, "--beta",
                str(args.beta), *limit, "--out-json", str(run_dir / "trl.json"), "--adapter-out", str(run_dir / "final"),
                *flags]
    return [sys.executable, "-m", "minialign", args.task, *same, "--dataset", args.data, "--train-rows", args.train_rows,
            "--eval-data", args.data, "--eval-rows", args.eval_rows, "--eval-limit", "100000", *limit,
            *(["--beta", str(args.beta)] if args.task == "dpo" else []), "--full" if args.mode == "full" else "--no-full",
            "--weight-decay", "0", "--max-grad-norm", "1.0", "--grad-accum", "1", "--eval-every", "0",
            "--out", str(run_dir), "--overwrite", *RUNNERS[runner], *shlex.split(args.minialign_args)]


def collect(row: dict, runner: str, run_dir: Path) -> Path | None:
    """Fill ``row`` from the child's own files; return the trained result to score (None if there is none)."""
    if RUNNERS[runner] is None:
        trl = _read_json(run_dir / "trl.json")
        if trl is None:
            row["note"] = "trl.json missing"
            return None
        row["wall_s"] = trl["t_done"] - row["t_spawn"]
        row.update({k: trl.get(k) for k in ("train_s", "tokens", "steps", "tokens_per_s", "steady_tokens_per_s",
                                             "steady_from_step", "peak_memory_mb", "memory_kind", "phases_s",
                                             "final_train_loss", "train_rows_after_trl_filter", "gradient_checkpointing",
                                             "optim", "versions", "unsloth_gradient_checkpointing",
                                             "minialign_order")})
        row["own_eval"] = trl.get("trl_eval", {})
        return run_dir / "final"
    row["wall_s"] = row["t_exit"] - row["t_spawn"]
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        row["wall_to_eval_s"] = metrics.stat().st_mtime - row["t_spawn"]  # the final eval row is its last write
    summary = _read_json(run_dir / "summary.json")
    if summary is not None:
        row.update({k: summary.get(k) for k in ("train_s", "tokens", "steps", "tokens_per_s", "steady_tokens_per_s",
                                                 "steady_from_step", "peak_memory_mb", "memory_kind", "graphs",
                                                 "shape_plan", "final_loss")})
        row["final_train_loss"] = summary.get("final_loss")
        row["own_eval"] = summary.get("eval", {})
    elif metrics.is_file():  # an older minialign without summary.json: what metrics.jsonl holds
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        steps = [x for x in lines if "loss" in x]
        row.update(steps=max((x["step"] for x in steps), default=0),
                   tokens=max((x.get("tokens", 0) for x in steps), default=0))
        row["own_eval"] = {k: v for x in lines for k, v in x.items() if k.startswith("eval/")}
        row["note"] = "summary.json missing: steps, tokens and own_eval from metrics.jsonl; no speed or memory"
    final = run_dir / "final" / ("model" if row["mode"] == "full" else "adapter")
    return final if final.is_dir() else None


def score(args: argparse.Namespace, row: dict, result: Path, run_dir: Path, env: dict) -> dict:
    """The shared held-out evaluator (e2e_heldout.py) on one result, in its own process."""
    which = "--model-dir" if row["mode"] == "full" else "--adapter"
    cmd = [sys.executable, str(HERE / "e2e_heldout.py"), "--task", args.task, "--model", args.model, "--tokenizer",
           args.tokenizer, "--data", args.data, "--eval-rows", args.eval_rows, which, str(result), "--beta", str(args.beta),
           "--max-length", str(args.max_length), "--max-prompt-length", str(args.max_prompt_length),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--out-json", str(run_dir / "heldout.json"),
           *(["--chat-template"] if args.chat_template else [])]
    done = run_timed(cmd, run_dir.parent / "logs" / f"{run_dir.name}-heldout.log", args.timeout_s, env)
    found = _read_json(run_dir / "heldout.json") if done["returncode"] == 0 else None
    return found if found is not None else {"error": f"returncode {done['returncode']}", "log_tail": done.get("log_tail")}


def save_checkpoint(model: str, tokenizer: str, path: Path, seed: int, env: dict) -> str:
    """Write ``model`` (a built-in name's random weights, or a GGUF's) to ``path`` once, bf16 as pretrained checkpoints
    ship, with ``tokenizer`` beside it (Unsloth reads both from one folder); its path.

    Random init of a 1B model on the CPU takes ~17 s in either trainer, which no user of a pretrained model
    pays; loading a checkpoint is what they do."""
    steps = []
    if not (path / "config.json").is_file():
        steps.append("load_model(sys.argv[1], seed=int(sys.argv[4])).to(torch.bfloat16).save_pretrained(sys.argv[3])")
    if not (path / "tokenizer_config.json").is_file():  # also a folder an earlier version wrote without it
        steps.append("load_tokenizer(sys.argv[2]).save_pretrained(sys.argv[3])")
    if steps:
        code = "import sys, torch; from minialign.modeling.models import load_model, load_tokenizer; " + "; ".join(steps)
        subprocess.run([sys.executable, "-c", code, model, tokenizer, str(path), str(seed)], env=env, check=True)
    return str(path)


def write(doc: dict, out: Path) -> None:
    doc["ratios"] = ratios(doc["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(doc), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.data is None:
        from bench_gpu import HH, find_shared

        args.data = find_shared(HH)
        if args.data is None:
            print("error: no shared/ HH-RLHF file found; pass --data", file=sys.stderr)
            return 2
    work = Path(args.work)
    label = args.label or f"{Path(args.model).name}-{args.task}-{args.mode}"
    env = child_env(work / "probe", False)
    if args.checkpoint:
        args.model = args.tokenizer = save_checkpoint(args.model, args.tokenizer, Path(args.checkpoint), args.seed, env)
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=False)
    info = {"device": "unknown", "versions": {}}
    if probe.returncode == 0:
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    print(f"[e2e] device {info['device']}; {info['versions']}", flush=True)
    if not args.no_warm:  # page cache: the first runner must not pay alone for reading the libraries from disk
        subprocess.run([sys.executable, "-c", WARM], env=env, capture_output=True, check=False)
        if any(r.startswith("unsloth") for r in args.runner_list):  # its own packages, from its own site
            subprocess.run([sys.executable, "-c", "import unsloth"], capture_output=True, check=False,
                           env=child_env(work / "probe", False, args.unsloth_site))
    if args.out is None:
        from bench_gpu import gpu_slug

        slug = "cpu" if info["device"] == "cpu" else gpu_slug(info["device"])
        args.out = str(ROOT / "benchmarks" / "results" / f"e2e-{slug}.json")
    out = Path(args.out)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    doc = {"device": info["device"], "versions": info["versions"], "command": command, "commands": [], "runs": []}
    if args.append and out.is_file():
        earlier = json.loads(out.read_text())
        if earlier.get("device") != doc["device"]:
            print(f"error: --append: {out} holds runs on {earlier.get('device')}, not {doc['device']}", file=sys.stderr)
            return 2
        doc = {**earlier, "command": command, "versions": info["versions"]}
    doc["commands"] = [*doc.get("commands", []), command]
    call = len(doc["commands"]) - 1
    results: list[tuple[dict, Path | None, Path]] = []
    for runner in args.runner_list:
        run_dir = (work / f"{label}-{runner}").resolve()
        for stale in ("trl.json", "heldout.json"):
            (run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "cache", ignore_errors=True)
        if RUNNERS[runner] is None:
            shutil.rmtree(run_dir / "final", ignore_errors=True)
        cmd = runner_command(args, runner, run_dir)
        print(f"[e2e] {label} {runner}: {shlex.join(cmd)}", flush=True)
        row = {"runner": runner, "label": label, "task": args.task, "mode": args.mode, "model": args.model, "call": call,
               "config": {k: getattr(args, k) for k in CONFIG_KEYS}}
        site = args.unsloth_site if runner.startswith("unsloth") else ""
        row.update(run_timed(cmd, work / "logs" / f"{label}-{runner}.log", args.timeout_s,
                             child_env(run_dir, args.compile_cache == "fresh", site)))
        result = None
        if row["returncode"] != 0 and RUNNERS[runner] is None:  # a peer says which package or call failed
            row["error"] = (_read_json(run_dir / "trl.json") or {}).get("error")
        if row["returncode"] == 0:
            try:
                result = collect(row, runner, run_dir)
            except Exception as exc:  # noqa: BLE001 - a malformed result file must not stop the other runners
                row["note"] = f"could not read the run's results: {type(exc).__name__}: {exc}"
        print(f"[e2e] {runner}: rc {row['returncode']}, wall {fmt(row.get('wall_s'), '{:.1f}')} s", flush=True)
        doc["runs"].append(row)
        results.append((row, result, run_dir))
        write(doc, out)
    for row, result, run_dir in results:
        if result is not None and not args.no_heldout:
            row["heldout"] = score(args, row, result, run_dir, child_env(run_dir, False))
            shown = {k: v for k, v in row["heldout"].items() if k != "per_example"}
            print(f"[e2e] {row['runner']} held-out: {shown}", flush=True)
    write(doc, out)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
