"""Evasion shares of finished evals, counted again with today's rule (minialign/evaluation/evasion.py).

An eval.json keeps every greedy answer, and ``evades`` was counted by the rule of the day it ran. The rule learned
the online policies' refusals later ("I'm sorry for your loss, but as a chatbot, I'm not equipped to provide advice
or support.": benchmarks/NOTES.md entry 31), so the study's committed evasion shares undercount them. This reads
the eval.json files of a study's work folder (``minialign eval --suite`` output: ``axes`` -> ``prompts`` -> policy /
reference answers) and writes, per eval and axis, the share as recorded and as counted now, for the policy and its
reference (the starting model).

    python benchmarks/recipes/hh_rescore.py --evals /tmp/hh2/evals --label "2026-12-07 call 1" \
        --json-out benchmarks/results/hh-evasion-rescored.json --append
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from minialign.evaluation import evasion  # noqa: E402
from minialign.evaluation.evasion import evades  # noqa: E402

# which rule counted an entry: the first 12 hex digits of the rule file's SHA-256
RULE = hashlib.sha256(Path(evasion.__file__).read_bytes()).hexdigest()[:12]


def rescore(eval_json: Path) -> dict:
    """Per axis: policy and reference evasion shares, as recorded in the file and as counted now."""
    data = json.loads(eval_json.read_text(encoding="utf-8"))
    out = {}
    for axis, block in data["axes"].items():
        answers_of = {side: [p[side]["greedy"][0] for p in block.get("prompts", []) if p.get(side, {}).get("greedy")]
                      for side in ("policy", "reference")}
        if not all(answers_of.values()):  # no greedy answers kept on this axis: nothing to recount
            continue
        row = {"n": len(answers_of["policy"])}
        for side, answers in answers_of.items():
            row[f"{side}_recorded"] = round(sum(bool(a.get("evades")) for a in answers) / len(answers), 4)
            row[f"{side}_now"] = round(sum(evades(a["text"]) for a in answers) / len(answers), 4)
        out[axis] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--evals", required=True, help="a study's evals folder: PART/NAME/eval.json below it")
    p.add_argument("--label", required=True, help="which call's evals these are (kept with each entry)")
    p.add_argument("--json-out", required=True)
    p.add_argument("--append", action="store_true", help="add to the file's entries instead of replacing them")
    args = p.parse_args(argv)
    files = sorted(Path(args.evals).glob("*/*/eval.json"))
    if not files:
        p.error(f"no PART/NAME/eval.json under {args.evals}")
    out = Path(args.json_out)
    result = json.loads(out.read_text(encoding="utf-8")) if args.append and out.exists() else {
        "what": __doc__.split("\n\n")[0], "rule": "each entry's: SHA-256 (12 hex digits) of "
        "minialign/evaluation/evasion.py when it was counted", "entries": []}
    for f in files:
        part, name = f.parent.parent.name, f.parent.name
        result["entries"].append({"call": args.label, "part": part, "policy": name, "rule": RULE, "axes": rescore(f)})
        shares = "; ".join(f"{axis}: policy {r['policy_recorded']:.2f} -> {r['policy_now']:.2f}, start "
                           f"{r['reference_recorded']:.2f} -> {r['reference_now']:.2f}"
                           for axis, r in result["entries"][-1]["axes"].items())
        print(f"{part}/{name}: {shares}")
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
