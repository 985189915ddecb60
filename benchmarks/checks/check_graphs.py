"""`minialign sft|dpo --cuda-graphs` on a GPU: the same training as without it, step for step.

    python benchmarks/checks/check_graphs.py [--steps 24] [--task sft] [--mode full] [--out check_graphs.json]

Trains twice through the CLI on the real HH pairs (Pythia's tokenizer, built-in pythia-70m, padding-free rows
rounded to 1024 tokens: a few shapes, each captured once), uncompiled by default as `--fast` runs (``--compile``:
compiled both times), once with every step replayed as a CUDA graph: per-step losses, gradient norms and learning
rates, and the final weights, must agree (the same kernels on the same batches; bf16 atomics in backward may differ
in the last bits). The graphed run is then resumed from its mid checkpoint, which checks that the learning rate
reaches the replays after a checkpoint is loaded. Prints and writes a JSON summary; exits 1 if a difference exceeds
the tolerance.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

from bench_gpu import HH, TOKENIZER, find_shared  # noqa: E402


def train(out: Path, args, *extra: str) -> float:
    cmd = [sys.executable, "-m", "minialign", args.task, "--model", args.model, "--tokenizer", find_shared(TOKENIZER),
           "--dataset", find_shared(HH), "--train-rows", "300:", "--out", str(out),
           "--batch-size", "16", "--max-steps", str(args.steps), "--padding-free", "--pad-to-multiple-of", str(args.pad_to),
           "--compile" if args.compile else "--no-compile", "--lr", "1e-4", "--warmup-ratio", "0.25", "--schedule", "cosine",
           "--log-every", "1", "--save-every", str(max(1, args.steps // 2)),  # both runs' weights, and a mid checkpoint
           "--device", args.device, *([] if args.mode == "full" else ["--lora-r", "8"]), *extra]
    if args.mode == "full":
        cmd.append("--full")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def rows(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def weights(run: Path):
    from safetensors.torch import load_file

    ckpts = sorted(run.glob("checkpoints/step-*"))
    return load_file(str(ckpts[-1] / "trainable.safetensors"))


def compare(a: Path, b: Path) -> dict:
    ra, rb = rows(a), rows(b)
    steps = sorted(set(ra) & set(rb))
    rel = lambda k: max(abs(ra[s][k] - rb[s][k]) / max(abs(ra[s][k]), 1e-12) for s in steps)  # noqa: E731
    wa, wb = weights(a), weights(b)
    wdiff = max(float((wa[n].float() - wb[n].float()).abs().max()) for n in wa)
    return {"steps": len(steps), "loss_rel": rel("loss"), "grad_norm_rel": rel("grad_norm"), "lr_rel": rel("lr"),
            "weights_max_abs": wdiff, "final_loss": [ra[steps[-1]]["loss"], rb[steps[-1]]["loss"]]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--task", default="sft", choices=["sft", "dpo"])
    p.add_argument("--mode", default="full", choices=["full", "lora"])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--model", default="pythia-70m")
    p.add_argument("--pad-to", type=int, default=1024, help="rows rounded up to this many tokens (a few shapes)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="compile both runs (default: not, as --fast runs; uncompiled, only the first capture is "
                   "preceded by a warm-up, the path where a later capture once summed stale gradients: NOTES entry 24)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (no graphs are captured there)")
    p.add_argument("--tolerance", type=float, default=1e-3, help="largest relative loss / grad-norm difference")
    p.add_argument("--out", default=None, help="JSON summary (default: print only)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="check_graphs_"))
    try:
        t_plain = train(tmp / "plain", args)
        half = args.steps // 2
        t_graph = train(tmp / "graphs", args, "--cuda-graphs")
        straight = compare(tmp / "plain", tmp / "graphs")
        captures = json.loads((tmp / "graphs" / "summary.json").read_text()).get("graphs")
        if not captures or captures < 2:
            print(f"warning: {captures} capture(s): a check of one shape cannot see one graph disturb another")
        # Resume the graphed run from its mid checkpoint: the lr must reach the replays after a checkpoint load.
        shutil.rmtree(tmp / "graphs" / "checkpoints" / f"step-{args.steps:06d}")
        kept = [r for r in (tmp / "graphs" / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= half]
        (tmp / "graphs" / "metrics.jsonl").write_text("\n".join(kept) + "\n")
        subprocess.run([sys.executable, "-m", "minialign", args.task, "--resume", str(tmp / "graphs")], check=True,
                       cwd=ROOT)
        doc = {"task": args.task, "mode": args.mode, "steps": args.steps, "pad_to_multiple_of": args.pad_to,
               "compile": args.compile, "captures": captures, "wall_s": {"plain": t_plain, "graphs": t_graph},
               "graphs_vs_plain": straight, "resumed_vs_plain": compare(tmp / "plain", tmp / "graphs")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(doc, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    bad = [k for k in ("graphs_vs_plain", "resumed_vs_plain")
           if max(doc[k]["loss_rel"], doc[k]["grad_norm_rel"]) > args.tolerance or doc[k]["lr_rel"] > 1e-6]
    print("OK" if not bad else f"DIFFERENT: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
