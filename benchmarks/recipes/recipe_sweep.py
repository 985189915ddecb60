#!/usr/bin/env python3
"""The SmolLM2 x HH harmless-base recipe: chosen on a validation split, then measured once on the eval rows.

    python benchmarks/recipes/recipe_sweep.py --model M --data-root SHARED --work /tmp/recipe --out recipe-h100.json

Rows of the harmless-base test file (2,312 raw rows; no train split can be had here), fixed so that nothing the
policy trains on or is chosen on is ever judged by a model that saw it:

    eval        0:300      touched once, by the final phase
    train     300:1812     every candidate policy trains here
    validation 1812:2012   candidates are compared here: DPO's own held-out metrics, and generations judged
    judge     2012:2312    the reward models that judge (one also reads helpful-base); disjoint from all above

Phases, each appending to one JSON (``--out``, rewritten atomically after every step, so a cut-off run keeps what
it finished): ``judges`` trains the reward models and keeps the one with the best validation accuracy;
``sweep`` trains each candidate and scores it on the validation rows; ``final`` picks the candidate by the rule in
``choose`` and compares it, the starting model, minialign at TRL's settings and TRL itself (bench_e2e.py, which
also gives the whole-command wall clock) on the eval rows. Every command is recorded with its wall clock.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: the harnesses these scripts drive
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import _read_json, child_env, run_timed  # noqa: E402
from recipe_report import headline, markdown  # noqa: E402

ROWS = {"eval": "0:300", "train": "300:1812", "validation": "1812:2012", "judge": "2012:2312"}
HELPFUL_ROWS = "2012:4666"  # harmless 2012:2312 followed by all 2,354 helpful-base rows (rows count over the list)
# TRL's DPO defaults as the e2e benchmark ran them (benchmarks/results/e2e-h200-smollm2.json): the baseline.
TRL_SETTINGS = ["--lora-r", "8", "--lora-alpha", "16", "--lr", "5e-4", "--beta", "0.1", "--epochs", "2",
                "--schedule", "linear", "--warmup-ratio", "0"]
SFT = ["--lora-r", "16", "--lora-alpha", "32", "--lr", "2e-4", "--epochs", "1"]
# name -> (SFT flags or None, DPO flags): one change at a time from TRL's settings.
CANDIDATES: dict[str, tuple[list[str] | None, list[str]]] = {
    "trl-settings": (None, TRL_SETTINGS),
    "rpo1": (None, [*TRL_SETTINGS, "--rpo-alpha", "1"]),
    "rpo1-beta0.25": (None, [*TRL_SETTINGS, "--rpo-alpha", "1", "--beta", "0.25"]),
    "rpo1-3ep": (None, [*TRL_SETTINGS, "--rpo-alpha", "1", "--epochs", "3"]),
    "rpo1-r16": (None, [*TRL_SETTINGS, "--rpo-alpha", "1", "--lora-r", "16", "--lora-alpha", "32"]),
    "rpo1-lr1e-3": (None, [*TRL_SETTINGS, "--rpo-alpha", "1", "--lr", "1e-3"]),
    "sft-dpo": (SFT, TRL_SETTINGS),
    "sft-dpo-rpo1": (SFT, [*TRL_SETTINGS, "--rpo-alpha", "1"]),
    # round 2 (recipe_round2.py): between round 1's loop-free and high-accuracy points, and full fine-tuning
    "rpo0.25-r16": (None, [*TRL_SETTINGS, "--rpo-alpha", "0.25", "--lora-r", "16", "--lora-alpha", "32"]),
    "rpo0.5-r16": (None, [*TRL_SETTINGS, "--rpo-alpha", "0.5", "--lora-r", "16", "--lora-alpha", "32"]),
    "full-dpo": (None, [*TRL_SETTINGS, "--full", "--lr", "5e-6"]),
    "full-rpo1": (None, [*TRL_SETTINGS, "--full", "--lr", "5e-6", "--rpo-alpha", "1"]),
    "lr2.5e-4": (None, [*TRL_SETTINGS, "--lr", "2.5e-4"]),  # the learning rate, round 1 held at TRL's 5e-4
    "lr1e-3": (None, [*TRL_SETTINGS, "--lr", "1e-3"]),
}
JUDGES = {  # name -> (dataset key, rows, extra flags)
    "judge-harmless": ("harmless", ROWS["judge"], ["--epochs", "2"]),
    "judge-hh": ("harmless+helpful", HELPFUL_ROWS, ["--epochs", "1"]),
}
TARGETS = {"reward_accuracy": 0.72, "win_rate": 0.60, "greedy_loop_share": 0.10}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the starting model (anything `minialign --model` takes)")
    p.add_argument("--data-root", required=True, help="the shared/ folder (data/hh-rlhf/...)")
    p.add_argument("--work", default="runs/recipe", help="run folders and logs")
    p.add_argument("--out", required=True, help="the JSON (+ .md beside it)")
    p.add_argument("--phases", default="judges,sweep,final")
    p.add_argument("--candidates", default="trl-settings,rpo1,rpo1-beta0.25,rpo1-3ep,rpo1-r16,sft-dpo-rpo1",
                   help=f"comma list of {', '.join(CANDIDATES)}")
    p.add_argument("--judges", default=",".join(JUDGES))
    p.add_argument("--n", type=int, default=100, help="prompts for the generation metrics")
    p.add_argument("--val-samples", type=int, default=2, help="sampled answers a prompt in the sweep")
    p.add_argument("--final-samples", type=int, default=4, help="sampled answers a prompt in the final phase")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--gen-batch-size", type=int, default=256, help="generation batch of `minialign eval`")
    p.add_argument("--extra", default="--chat-template", help="flags for every training command")
    p.add_argument("--timeout-s", type=float, default=300)
    p.add_argument("--no-trl", action="store_true", help="final phase without TRL (CPU smoke runs)")
    return p.parse_args(argv)


class Sweep:
    """The run's state: paths, the JSON document, and how to run one recorded command."""

    def __init__(self, args: argparse.Namespace, render=None):
        self.args = args
        self.render = render or markdown  # the .md written beside the JSON
        self.work = Path(args.work).resolve()
        self.out = Path(args.out)
        hh = Path(args.data_root) / "data" / "hh-rlhf"
        self.data = {"harmless": str(hh / "harmless-base" / "test.jsonl.gz")}
        self.data["harmless+helpful"] = f"{self.data['harmless']},{hh / 'helpful-base' / 'test.jsonl.gz'}"
        self.doc = _read_json(self.out) or {"rows": ROWS, "targets": TARGETS, "commands": [], "steps": [],
                                            "judges": {}, "candidates": {}}
        self.doc["invocations"] = [*self.doc.get("invocations", []), shlex.join([Path(sys.executable).name, *sys.argv])]
        self.env = child_env(self.work / "probe", False)

    def run(self, name: str, argv: list[str], timeout_s: float | None = None) -> bool:
        cmd = [sys.executable, *argv]
        print(f"[recipe] {name}: {shlex.join(argv)}", flush=True)
        done = run_timed(cmd, self.work / "logs" / f"{name}.log", timeout_s or self.args.timeout_s, self.env)
        row = {"name": name, "command": done["command"], "wall_s": round(done["elapsed_s"], 2),
               "returncode": done["returncode"], "timed_out": done["timed_out"], "log_tail": done.get("log_tail")}
        self.doc["steps"].append(row)
        print(f"[recipe] {name}: rc {row['returncode']} in {row['wall_s']:.1f} s", flush=True)
        self.save()
        return done["returncode"] == 0

    def minialign(self, name: str, *flags: str) -> bool:
        return self.run(name, ["-m", "minialign", *flags])

    def common(self, rows: str, eval_rows: str, dataset: str = "harmless") -> list[str]:
        return ["--model", self.args.model, "--dataset", self.data[dataset], "--train-rows", rows,
                "--eval-data", self.data["harmless"], "--eval-rows", eval_rows, "--eval-limit", "1000",
                "--batch-size", str(self.args.batch_size), "--eval-every", "0", "--overwrite",
                *shlex.split(self.args.extra)]

    def train_rm(self, name: str, rows: str, eval_rows: str, flags: list[str], dataset: str = "harmless") -> dict:
        """One `minialign rm` run: its folder, whether it finished, its held-out pair accuracy on ``eval_rows``."""
        run_dir = self.work / name
        ok = self.minialign(name, "rm", *self.common(rows, eval_rows, dataset), *flags, "--out", str(run_dir))
        summary = _read_json(run_dir / "summary.json") or {}
        return {"ok": ok, "run_dir": str(run_dir), "rows": rows, "flags": flags,
                "accuracy": summary.get("eval", {}).get("eval/accuracy"), "summary": summary}

    def eval_generations(self, name: str, policy: list[str], rows: str, samples: int, judge: str, out: Path) -> dict:
        ok = self.minialign(name, "eval", *policy, "--reference", self.args.model, "--judge", judge,
                            "--dataset", self.data["harmless"], "--rows", rows, "--n", str(self.args.n),
                            "--samples", str(samples), "--max-new-tokens", str(self.args.max_new_tokens),
                            "--batch-size", str(self.args.gen_batch_size), "--out", str(out), "--overwrite")
        return (_read_json(out / "eval.json") or {}) if ok else {"error": f"{name} failed"}

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1), encoding="utf-8")
        tmp.replace(self.out)
        self.out.with_suffix(".md").write_text(self.render(self.doc), encoding="utf-8")


# ----------------------------------------------------------------------------- phases


def phase_judges(s: Sweep) -> None:
    for name in s.args.judges.split(","):
        dataset, rows, flags = JUDGES[name]
        run = s.train_rm(name, rows, ROWS["validation"], flags, dataset)
        s.doc["judges"][name] = {"ok": run["ok"], "run_dir": run["run_dir"], "dataset": dataset, "rows": rows,
                                 "validation_accuracy": run["accuracy"], "summary": run["summary"]}
        s.save()
    usable = {k: v for k, v in s.doc["judges"].items() if v.get("validation_accuracy") is not None}
    if usable:
        s.doc["judge"] = max(usable, key=lambda k: usable[k]["validation_accuracy"])
        print(f"[recipe] judge: {s.doc['judge']} ({usable[s.doc['judge']]['validation_accuracy']:.3f} on validation)")
    s.save()


def chosen_judge(s: Sweep) -> str:
    if "judge" not in s.doc:
        raise SystemExit(f"recipe_sweep: no judge trained (see the judges' logs in {s.work / 'logs'}); run --phases judges")
    return s.doc["judges"][s.doc["judge"]]["run_dir"]


def phase_sweep(s: Sweep, judge: str | None = None) -> None:
    judge = judge or chosen_judge(s)
    for name in s.args.candidates.split(","):
        sft_flags, dpo_flags = CANDIDATES[name]
        run_dir = s.work / name
        start = []
        if sft_flags is not None:
            ok = s.minialign(f"{name}-sft", "sft", *s.common(ROWS["train"], ROWS["validation"]), *sft_flags,
                             "--out", str(run_dir / "sft"))
            start = ["--sft", str(run_dir / "sft")] if ok else None
        row = {"sft": sft_flags, "dpo": dpo_flags, "run_dir": str(run_dir / "dpo")}
        if start is not None and s.minialign(f"{name}-dpo", "dpo", *s.common(ROWS["train"], ROWS["validation"]),
                                             *start, *dpo_flags, "--out", str(run_dir / "dpo")):
            summary = _read_json(run_dir / "dpo" / "summary.json") or {}
            row["validation"] = {"dpo": summary.get("eval", {}), "train_s": summary.get("train_s"),
                                 "generations": headline(s.eval_generations(
                                     f"{name}-eval-val", ["--policy", str(run_dir / "dpo")], ROWS["validation"],
                                     s.args.val_samples, judge, run_dir / "eval-val"))}
        s.doc["candidates"][name] = row
        s.save()


def choose(candidates: dict) -> str | None:
    """Most targets met on the validation rows, then the higher win rate, then the higher reward accuracy."""
    def key(name: str):
        v = candidates[name].get("validation", {})
        acc = v.get("dpo", {}).get("eval/rewards/accuracies") or 0.0
        gen = v.get("generations", {})
        win, loops = gen.get("win_rate") or 0.0, gen.get("greedy_loop_share", 1.0)
        met = (acc >= TARGETS["reward_accuracy"]) + (win >= TARGETS["win_rate"]) + (loops < TARGETS["greedy_loop_share"])
        return met, win, acc
    scored = [n for n in candidates if "validation" in candidates[n]]
    return max(scored, key=key) if scored else None


def phase_final(s: Sweep) -> None:
    chosen = choose(s.doc["candidates"])
    s.doc["chosen"] = chosen
    judge = chosen_judge(s)
    final = s.doc.setdefault("final", {})
    final["judge_eval_accuracy"] = judge_accuracy(s, judge)
    s.save()
    recipe = s.work / chosen
    final["recipe_heldout"] = heldout(s, "final-recipe-heldout", recipe / "dpo",
                                      recipe / "sft" if CANDIDATES[chosen][0] is not None else None)
    policies = {"recipe": ["--policy", str(recipe / "dpo")]}
    if not s.args.no_trl:  # TRL itself at its settings, same rows and text; also the whole-command wall clock
        e2e = s.work / "e2e.json"
        s.run("e2e-trl-vs-minialign", [str(HERE / "bench_e2e.py"), "--task", "dpo", "--mode", "lora", "--model",
              s.args.model, "--tokenizer", s.args.model, "--data", s.data["harmless"], "--train-rows", ROWS["train"],
              "--eval-rows", ROWS["eval"], "--batch-size", str(s.args.batch_size), *TRL_SETTINGS,
              "--runners", "trl,minialign", "--label", "smollm2-dpo", "--work", str(s.work / "e2e"), "--out", str(e2e),
              "--timeout-s", "300", *(["--chat-template"] if "--chat-template" in s.args.extra else [])],
              timeout_s=900)
        final["e2e"] = _read_json(e2e)
        policies["minialign-trl-settings"] = ["--policy", str(s.work / "e2e" / "smollm2-dpo-minialign")]
        policies["trl"] = ["--policy", s.args.model, "--adapter", str(s.work / "e2e" / "smollm2-dpo-trl" / "final")]
    for name, argv in policies.items():
        final[name] = headline(s.eval_generations(f"final-{name}", argv, ROWS["eval"], s.args.final_samples, judge,
                                                  s.work / "final" / name), keep_samples=True)
        s.save()


def heldout(s: Sweep, name: str, run_dir: Path, sft_run: Path | None) -> dict | None:
    """DPO's held-out metrics on the eval rows (reward accuracy, margin), by the evaluator bench_e2e.py uses."""
    out = run_dir / "heldout-eval.json"
    ok = s.run(name, [str(HERE / "e2e_heldout.py"), "--task", "dpo", "--model", s.args.model, "--tokenizer",
                      str(run_dir / "final" / "tokenizer"), "--data", s.data["harmless"], "--eval-rows", ROWS["eval"],
                      *(["--adapter", str(run_dir / "final" / "adapter")] if (run_dir / "final" / "adapter").is_dir()
                        else ["--model-dir", str(run_dir / "final" / "model")]), "--beta", _flag(run_dir, "beta"),
                      *(["--sft-run", str(sft_run)] if sft_run else []),
                      *(["--chat-template"] if "--chat-template" in s.args.extra else []), "--out-json", str(out)])
    return _read_json(out) if ok else None


def _flag(run_dir: Path, key: str) -> str:
    import yaml

    return str((yaml.safe_load((run_dir / "config.yaml").read_text()) or {})[key])


def judge_accuracy(s: Sweep, judge: str, rows: str = ROWS["eval"], name: str = "judge-eval-accuracy") -> float | None:
    """The judge's own pair accuracy on ``rows`` (the eval rows: printed beside every win rate it gives)."""
    code = ("import sys, json; from minialign.evaluation.judge import load_judge; "
            "from minialign.data import load_preference_pairs;"
            "from minialign.data.chat import to_chat_format;"
            "j = load_judge(sys.argv[1], device='cuda' if __import__('torch').cuda.is_available() else 'cpu');"
            "p = load_preference_pairs(sys.argv[2], rows=sys.argv[3]);"
            "p = to_chat_format(p, j.tokenizer) if j.info.get('chat_template') else p;"
            "c = j.score([x.prompt for x in p], [x.chosen for x in p]); "
            "r = j.score([x.prompt for x in p], [x.rejected for x in p]);"
            "json.dump({'accuracy': (c > r).float().mean().item(), 'n': len(p)}, open(sys.argv[4], 'w'))")
    out = s.work / f"{name}.json"
    ok = s.run(name, ["-c", code, judge, s.data["harmless"], rows, str(out)])
    return (_read_json(out) or {}).get("accuracy") if ok else None


def main(argv=None) -> int:
    args = parse_args(argv)
    s = Sweep(args)
    t0 = time.time()
    phases = {"judges": phase_judges, "sweep": phase_sweep, "final": phase_final}
    for name in args.phases.split(","):
        phases[name](s)
        print(f"[recipe] phase {name} done at {time.time() - t0:.0f} s", flush=True)
    print(markdown(s.doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
