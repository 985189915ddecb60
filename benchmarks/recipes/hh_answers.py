#!/usr/bin/env python3
"""What the reward models and the judges reward, read from answers a study kept (no GPU, no model).

    python benchmarks/recipes/hh_answers.py --online RUN [RUN ...] --eval EVAL.json [EVAL.json ...] [--json-out F]

``--online``: `minialign online` run folders; every round's ``samples.jsonl`` and ``pairs.jsonl`` are read and, per
axis (the reward model that scored a prompt, ``--rm-routes`` order), the mean score of answers that ended before
``max_new_tokens`` against those cut there (answers that loop left out of both), the mean score of ended answers by
length, and how the chosen and rejected answers of the pairs the round trained on differ in length, cuts, loops and
evasion. ``--eval``: `minialign eval --suite` results; per axis the win rate (ties 1/2) split by whether the starting
model's answer looped and whether the policy's evaded, and the judge's mean score of each side's answers by how they
ended.

It answers why a policy that wins on one axis loses on the other: which answers the signal it trained on prefers.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from statistics import mean

LENGTH_BINS = ((0, 20), (20, 40), (40, 70), (70, 100), (100, 10**9))
AXES = ("harmless", "helpful")  # the study's --rm-routes order: scores[i] is axis i's reward model


def _mean(xs) -> float | None:
    xs = list(xs)
    return round(mean(xs), 3) if xs else None


def cut(answer: dict) -> bool:
    """The answer ran into max_new_tokens instead of ending."""
    return answer.get("stop") == "length"


def by_length(answers: list[dict], score) -> dict[str, dict]:
    """Mean ``score(answer)`` of answers that ended, by length in tokens."""
    out = {}
    for lo, hi in LENGTH_BINS:
        got = [score(a) for a in answers if not cut(a) and lo <= a["n_tokens"] < hi]
        if got:
            out[f"{lo}-{hi if hi < 10**9 else ''}"] = {"n": len(got), "mean": _mean(got)}
    return out


def sample_stats(samples: list[dict], pairs: list[dict], axes=AXES) -> dict[str, dict]:
    """Per axis: the reward model's score of ended against cut answers (answers that loop left out), ended answers
    by length, and the make-up of the round's pairs (``pairs.jsonl``: the pairs `minialign online` trained on)."""
    by_text = {}
    for s in samples:
        by_text.setdefault((s["row"], s["text"]), s)
    out = {}
    for i, axis in enumerate(axes):
        mine = [s for s in samples if s["scores"][i] is not None]
        if not mine:
            continue
        score = lambda s, i=i: s["scores"][i]  # noqa: E731
        rows = {s["row"] for s in mine}
        kept = [(by_text[p["row"], p["chosen"]], by_text[p["row"], p["rejected"]]) for p in pairs if p["row"] in rows]
        side = {name: {"tokens": _mean(p[k]["n_tokens"] for p in kept), "cut": _mean(cut(p[k]) for p in kept),
                       "loops": _mean(bool(p[k]["loops"]) for p in kept),
                       "evades": _mean(bool(p[k].get("evades")) for p in kept)}
                for k, name in ((0, "chosen"), (1, "rejected"))}
        clean = [s for s in mine if not s["loops"]]
        out[axis] = {"answers": len(mine), "ended_mean": _mean(score(s) for s in clean if not cut(s)),
                     "cut_mean": _mean(score(s) for s in clean if cut(s)), "cut_share": _mean(cut(s) for s in mine),
                     "ended_by_length": by_length(clean, score), "pairs": len(kept), **side}
    return out


def won(rows: list[tuple[dict, dict]]) -> float | None:
    """The policy's win rate over (policy, reference) answers by judge score: `minialign eval`'s own (ties 1/2)."""
    from minialign.evaluation.textmetrics import win_rate

    if not rows:
        return None
    return round(win_rate([q["judge_score"] for q, _ in rows], [r["judge_score"] for _, r in rows]).rate, 3)


def eval_stats(ev: dict) -> dict[str, dict]:
    """Per axis of a suite eval.json: win rate by the reference's loops and the policy's evasion; the judge's mean
    score of each side's ended and cut answers (answers that loop apart) and of its ended answers by length."""
    out = {}
    for axis, body in ev["axes"].items():
        rows = [(p["policy"]["greedy"][0], p["reference"]["greedy"][0]) for p in body["prompts"]]
        sides = {}
        for k, name in ((0, "policy"), (1, "reference")):
            answers = [pair[k] for pair in rows]
            plain = [a for a in answers if not a["loops"]]
            sides[name] = {"ended_mean": _mean(a["judge_score"] for a in plain if not cut(a)),
                           "cut_mean": _mean(a["judge_score"] for a in plain if cut(a)),
                           "loops_mean": _mean(a["judge_score"] for a in answers if a["loops"]),
                           "ended_by_length": by_length(plain, lambda a: a["judge_score"])}
        out[axis] = {"n": len(rows), "win": won(rows),
                     "win_reference_loops": won([x for x in rows if x[1]["loops"]]),
                     "win_reference_clean": won([x for x in rows if not x[1]["loops"]]),
                     "win_policy_evades": won([x for x in rows if x[0].get("evades")]),
                     "win_policy_engages": won([x for x in rows if not x[0].get("evades")]), **sides}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--online", nargs="*", default=[], help="minialign online run folders")
    p.add_argument("--eval", nargs="*", default=[], help="minialign eval --suite eval.json files")
    p.add_argument("--json-out", help="write the numbers here")
    p.add_argument("--source", default="", help="where the answers came from (a device call, a NOTES entry), recorded")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/recipes/hh_answers.py", *(sys.argv[1:] if argv is None else argv)])
    result: dict = {"command": command, "source": args.source, "online": {}, "eval": {}}
    for run in map(Path, args.online):
        rounds = sorted(f.parent for f in run.glob("round-*/samples.jsonl") if (f.parent / "pairs.jsonl").is_file())
        if not rounds:
            p.error(f"--online {run}: no round-*/ with samples.jsonl and pairs.jsonl (not a `minialign online` run "
                    "folder?)")
        result["online"][str(run)] = {d.name: sample_stats(*[[json.loads(x) for x in (d / f).open()]
                                                            for f in ("samples.jsonl", "pairs.jsonl")]) for d in rounds}
    for f in map(Path, args.eval):
        result["eval"][str(f)] = eval_stats(json.loads(f.read_text()))
    text = json.dumps(result, indent=1)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
