#!/usr/bin/env python3
"""Round 2 of the SmolLM2 x HH harmless-base recipe (round 1: recipe_sweep.py): a judge worth its win rates, the
reward-model number on the eval rows, round 1's final answers judged again, and the candidates between round 1's
loop-free and high-accuracy points.

    python benchmarks/recipes/recipe_round2.py --round1 benchmarks/results/recipe-h200.json --answers examples/hh-smollm2/eval \
        --model M --data-root SHARED --work /tmp/r2 --out /tmp/r2/recipe-round2.json

Rows are round 1's (``recipe_sweep.ROWS``). Round 1's judge (300 pairs, rows 2012:2312) ranked held-out pairs near
chance (0.515 on validation, 0.537 on the eval rows), so its win rates could not rank policies. Phases, appending to
one JSON as round 1 does:

``judges``  reward models on rows no policy trains on (1812:2312, the validation and judge rows; and round 1's judge
            again), compared on rows 300:800, which are policy training rows and so were never any judge's. The best
            is *the* judge; its accuracy on the eval rows is measured once.
``rm``      the reward-model number the issue asks for: every row but the eval rows (300:2312), with the setting
            that gave round 1's best validation accuracy, scored once on rows 0:300. It shares rows with every policy,
            so its win rates are only shown beside the disjoint judge's.
``rescore`` round 1's final answers (the recipe, minialign at TRL's settings, TRL; committed under --answers) scored by
            both with `minialign eval --answers`: the same answers, no generation.
``sweep``   new candidates, trained on 300:1812 and scored on the validation rows by round 1's judge command (so the
            two rounds' rows of the table are judged alike); ``recipe_sweep.choose`` runs over both rounds.
``final``   only when a round-2 candidate is chosen: its metrics on the eval rows, their second use (round 1's was
            the first; nothing was chosen on them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: the harnesses these scripts drive
sys.path.insert(0, str(HERE))
import recipe_report as report  # noqa: E402
import recipe_sweep as r1  # noqa: E402
from bench_e2e import _read_json  # noqa: E402

VALIDATE_JUDGES = "300:800"
STRONG = ["--epochs", "4", "--lr", "5e-4", "--lora-r", "16", "--lora-alpha", "32"]  # round 1: 0.591 vs 0.505-0.515
JUDGES = {  # name -> (rows, flags); each validated on VALIDATE_JUDGES
    "judge-harmless": (r1.ROWS["judge"], ["--epochs", "2"]),  # round 1's command
    "judge-500": ("1812:2312", STRONG),
    "judge-500-full": ("1812:2312", ["--full", "--lr", "1e-5", "--epochs", "2"]),
}
RM_ALL = ("300:2312", STRONG)
ANSWERS = ("recipe", "minialign-trl-settings", "trl")  # round 1's final phase, <name>.json under --answers


def parse_args(argv=None) -> tuple[argparse.Namespace, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Other flags: recipe_sweep.py's.")
    p.add_argument("--round1", required=True, help="round 1's JSON (its candidates join the choice)")
    p.add_argument("--answers", required=True, help="folder of round 1's final eval JSONs (recipe.json, ...)")
    p.add_argument("--phases", default="judges,rm,rescore,sweep,final")
    p.add_argument("--candidates", default="rpo0.25-r16,rpo0.5-r16,lr2.5e-4,lr1e-3,full-dpo,full-rpo1")
    own, rest = p.parse_known_args(argv)
    return own, r1.parse_args(rest)


def phase_judges(s: r1.Sweep) -> None:
    for name, (rows, flags) in JUDGES.items():
        run = s.train_rm(name, rows, VALIDATE_JUDGES, flags)
        s.doc["judges"][name] = {"ok": run["ok"], "run_dir": run["run_dir"], "rows": rows, "flags": flags,
                                 "validated_on": VALIDATE_JUDGES, "validation_accuracy": run["accuracy"],
                                 "train_s": run["summary"].get("train_s")}
        s.save()
    usable = {k: v for k, v in s.doc["judges"].items() if v.get("validation_accuracy") is not None}
    if not usable:
        raise SystemExit(f"recipe_round2: no judge finished (logs in {s.work / 'logs'})")
    s.doc["judge"] = max(usable, key=lambda k: usable[k]["validation_accuracy"])
    judge = s.doc["judges"][s.doc["judge"]]
    judge["eval_accuracy"] = r1.judge_accuracy(s, judge["run_dir"], name=f"{s.doc['judge']}-eval-accuracy")
    print(f"[recipe] judge: {s.doc['judge']} ({judge['validation_accuracy']:.3f} on rows {VALIDATE_JUDGES}, "
          f"{report.fmt(judge['eval_accuracy'])} on the eval rows)", flush=True)
    s.save()


def phase_rm(s: r1.Sweep) -> None:
    rows, flags = RM_ALL
    run = s.train_rm("rm-all", rows, r1.ROWS["eval"], flags)
    accuracy = run.pop("accuracy")
    s.doc["rm_all"] = {**run, "scored_on": r1.ROWS["eval"], "eval_accuracy": accuracy}
    s.save()


def answer_judges(s: r1.Sweep) -> dict[str, str]:
    """{name: run folder} of the judges that score answers: the chosen judge and, when it finished, rm-all."""
    out = {s.doc["judge"]: s.doc["judges"][s.doc["judge"]]["run_dir"]}
    if (s.doc.get("rm_all") or {}).get("ok"):
        out["rm-all"] = s.doc["rm_all"]["run_dir"]
    return out


def rescore(s: r1.Sweep, label: str, answers: Path, judges: dict[str, str]) -> dict:
    """``answers`` (an eval.json) scored by each of ``judges`` with `minialign eval --answers`: {judge: headline}."""
    found = {}
    for jname, jdir in judges.items():
        out = s.work / "rescored" / f"{label}-{jname}"
        ok = s.minialign(f"rescore-{label}-{jname}", "eval", "--answers", str(answers), "--judge", jdir,
                         "--tokenizer", s.args.model, "--judge-batch-size", "64", "--out", str(out), "--overwrite")
        found[jname] = report.headline(_read_json(out / "eval.json") or {}) if ok else {"error": "failed"}
    return found


def phase_rescore(s: r1.Sweep, folder: Path) -> None:
    s.doc["rescored"] = {name: rescore(s, name, folder / f"{name}.json", answer_judges(s)) for name in ANSWERS}
    s.save()


def phase_final(s: r1.Sweep, round1: dict) -> None:
    every = {**round1["candidates"], **s.doc["candidates"]}
    s.doc["chosen"] = chosen = r1.choose(every)
    print(f"[recipe] chosen over both rounds: {chosen}", flush=True)
    if chosen not in s.doc["candidates"]:
        s.save()
        return
    run_dir = s.work / chosen
    final = s.doc.setdefault("final", {})
    final["heldout"] = r1.heldout(s, "final-heldout", run_dir / "dpo",
                                  run_dir / "sft" if r1.CANDIDATES[chosen][0] is not None else None)
    judges = answer_judges(s)  # the answers are generated and scored by the chosen judge, then by the others
    ev = s.eval_generations("final-eval", ["--policy", str(run_dir / "dpo")], r1.ROWS["eval"], s.args.final_samples,
                            judges.pop(s.doc["judge"]), s.work / "final")
    final["generations"] = report.headline(ev, keep_samples=True)
    final["rescored"] = {s.doc["judge"]: report.headline(ev), **rescore(s, chosen, s.work / "final" / "eval.json", judges)}
    s.save()


def markdown(doc: dict) -> str:
    f = report.fmt
    lines = ["# SmolLM2-135M-Instruct x HH harmless-base: recipe, round 2", "",
             f"Device: {doc.get('device', '-')}. Rows of harmless-base: {doc['rows']}. Round 1: {doc.get('round1')}.",
             "", f"Judges (validated on rows {VALIDATE_JUDGES}, which no judge trained on):", ""]
    for name, j in doc.get("judges", {}).items():
        chosen = f" (chosen; eval rows 0:300: {f(j.get('eval_accuracy'))})" if doc.get("judge") == name else ""
        lines.append(f"- {name}: rows {j['rows']}, `{' '.join(j['flags'])}`: {f(j.get('validation_accuracy'))}{chosen}")
    rm = doc.get("rm_all")
    if rm:
        lines.append(f"- rm-all: rows {rm['rows']}, `{' '.join(rm['flags'])}`: **{f(rm.get('eval_accuracy'))} on the "
                     "eval rows 0:300** (held-out pair accuracy; it shares rows with the policies)")
    if doc.get("rescored"):
        lines += ["", "Round 1's final answers on the eval rows (100 prompts; greedy, and 4 samples a prompt), scored "
                  "again by each judge:", "", "| answers | judge | win greedy | win sampled | policy score | "
                  "reference score |", "|---|---|---:|---:|---:|---:|"]
        final_rescored = ({f"{doc['chosen']} (round 2)": doc["final"]["rescored"]}
                          if "rescored" in doc.get("final", {}) else {})
        for name, by_judge in {**doc["rescored"], **final_rescored}.items():
            for jname, g in by_judge.items():
                lines.append(f"| {name} | {jname} | {report.win(g, 'greedy')} | {report.win(g, 'sampled')} | "
                             f"{f(g.get('greedy_policy_judge_score'))} | {f(g.get('greedy_reference_judge_score'))} |")
    if doc.get("candidates"):
        lines += ["", *report.candidate_lines(doc["candidates"])]
    if doc.get("chosen"):
        lines += ["", f"Chosen over both rounds: **{doc['chosen']}**."]
    final = doc.get("final")
    if final:
        g = final.get("generations", {})
        lines += ["", f"Final (eval rows 0:300): reward accuracy {f((final.get('heldout') or {}).get('reward_accuracy'))}"
                  f", greedy loops {f(g.get('greedy_policy_loop_share'), '{:.2f}')}, win greedy {report.win(g, 'greedy')}, "
                  f"win sampled {report.win(g, 'sampled')}."]
    lines += ["", "Commands:", "", *[f"    {c}" for c in doc.get("invocations", [])],
              *[f"    {c}" for c in doc.get("device_commands", [])]]
    if doc.get("note"):
        lines += ["", doc["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    own, args = parse_args(argv)
    args.candidates = own.candidates
    s = r1.Sweep(args, render=markdown)
    s.doc.setdefault("round1", own.round1)
    s.doc.setdefault("device", _device())
    round1 = _read_json(Path(own.round1)) or {}
    t0 = time.time()
    for phase in own.phases.split(","):
        if phase == "judges":
            phase_judges(s)
        elif phase == "rm":
            phase_rm(s)
        elif phase == "rescore":
            phase_rescore(s, Path(own.answers))
        elif phase == "sweep":
            r1.phase_sweep(s, judge=s.doc["judges"]["judge-harmless"]["run_dir"])
        elif phase == "final":
            phase_final(s, round1)
        print(f"[recipe] phase {phase} done at {time.time() - t0:.0f} s", flush=True)
    print(markdown(s.doc))
    return 0


def _device() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
