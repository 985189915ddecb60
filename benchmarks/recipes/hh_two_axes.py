#!/usr/bin/env python3
"""Issue 31, helpful and harmless: policies judged on two axes (harmless-base, helpful-base), the online recipe
against the offline ones and TRL, and the online round's speed.

    python benchmarks/recipes/hh_two_axes.py --model M --data-root SHARED --work /tmp/hh2 \
        --out benchmarks/results/hh-two-axes.json
    python benchmarks/recipes/hh_two_axes.py --small --data-root ../shared --work /tmp/hh2-small --out /tmp/s.json

Rows: ``hh_plan.ROW_PLAN`` (eval rows once, at the end; judges on their own rows; helpful-online and
helpful-rejection-sampled read by nothing trained). Phases, in the order that keeps the most wanted numbers when
a run is cut off; each skips the runs whose output exists, so a second call resumes (times: one H100, SmolLM2-135M):

``judges``        harmless and helpfulness judges (LoRA, round 2's setting) on judge rows, accuracy on the eval pairs
                  (~2 x 50 s)
``harmless-only`` today's recipe (configs/smollm2-hh.yaml) on harmless train rows; evaluated on both axes: its
                  eval's reference gives the starting model's evasion and loops (~40 s + ~25 s)
``online-rm``     the online reward model on the helpful+harmless train mix, --full so TRL loads it (~60 s)
``online``        the online candidates on the mix (validation suite each), the choice, the chosen one on the eval
                  rows (2 candidates: ~2 x 120 s + 25 s)
``offline-mix``   the recipe's DPO on the mix (~40 s + 25 s)
``trl-online``    TRL OnlineDPOTrainer matched to the chosen candidate (trl_online.py; ~200 s + 25 s)
``trl-dpo``       TRL DPO on the mix (benchmarks/trl_e2e.py; ~100 s + 25 s)
``timing``        online_round_s from the 1-round candidate's rounds.jsonl; whole-command walls of the chosen
                  candidate and TRL online (their phase runs; ``--timing-repeats N`` reruns both N times, alternating)
``heldout``       the independent final check: every policy whose run is on this machine, on helpful-online and
                  helpful-rejection-sampled prompts (read by nothing trained), by the helpfulness judge (~25 s each)

About 16-18 minutes in all. Every command, its wall clock and return code land in the JSON (``--out``, rewritten
atomically after each step with its Markdown beside it; the study's state is ``WORK/state.json``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
import hh_plan as plan  # noqa: E402
import hh_results as results  # noqa: E402
from bench_e2e import _read_json  # noqa: E402
from hh_study import Study, finished, fresh, read_jsonl  # noqa: E402

from minialign.config.online import OnlineConfig  # noqa: E402
from minialign.config.presets import load_run_config  # noqa: E402

PHASES = ("judges", "harmless-only", "online-rm", "online", "offline-mix", "trl-online", "trl-dpo", "timing",
          "heldout")
JUDGE_TARGET = 0.62
TOGETHER = ("judges", "online-rm")  # phases that --jobs runs side by side (the four reward models at once)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="starting model (a GGUF path on the GPU machine)")
    p.add_argument("--data-root", required=True, help="folder holding data/hh-rlhf/... (the shared/ folder)")
    p.add_argument("--work", default="runs/hh-two-axes", help="run folders, logs, state.json")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hh-two-axes.json"), help="JSON (+ .md)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    p.add_argument("--candidates", default="r1-rpo1-lp4,r2-rpo1-lp4", help=f"comma list of {', '.join(plan.CANDIDATES)}")
    p.add_argument("--online-rm", choices=sorted(plan.ONLINE_RMS), default="full",
                   help="the online reward model's setting (hh_plan.ONLINE_RMS); trl-online needs full or routed")
    p.add_argument("--n", type=int, default=100, help="eval prompts an axis")
    p.add_argument("--val-n", type=int, default=100, help="validation prompts an axis (online candidates)")
    p.add_argument("--timing-repeats", type=int, default=0, help="extra alternating minialign/TRL online runs")
    p.add_argument("--timeout-s", type=float, default=600, help="per command")
    p.add_argument("--jobs", type=int, default=1, help="N > 1: the four reward models at once, then N "
                   "candidates at once, on the one GPU; less device time, but no timings (the timing phase skips them)")
    p.add_argument("--small", action="store_true", help="CPU smoke run: tiny-llama, a few rows, one short round")
    args = p.parse_args(argv)
    unknown = [x for x in args.phases.split(",") if x not in PHASES]
    unknown += [x for x in args.candidates.split(",") if x not in plan.CANDIDATES]
    if unknown:
        p.error(f"unknown phases or candidates: {unknown}")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: give 1 (one command at a time) or more")
    args.data_root = str(Path(args.data_root).resolve())  # suite YAMLs and children read it from anywhere
    if args.small:
        args.model = "tiny-llama" if args.model == "smollm2-135m-instruct" else args.model
        args.n = args.val_n = min(args.n, 4)
    return args


# ----------------------------------------------------------------------------- phases


def phase_judges(s: Study) -> None:
    def train(axis: str) -> None:
        run_dir, rows, eval_rows = s.work / f"judge-{axis}", s.plan[axis]["judge"], s.plan[axis]["eval"]
        if not finished(run_dir):
            s.minialign(f"judge-{axis}", "rm", "--model", s.args.model, *s.chat, "--dataset", s.data(axis),
                        "--train-rows", rows, "--eval-data", s.data(axis), "--eval-rows", eval_rows, "--eval-limit",
                        "1000", "--batch-size", "16", "--eval-every", "0", *plan.JUDGE_FLAGS, *s.cut, "--overwrite",
                        "--out", str(run_dir))
        acc = ((_read_json(run_dir / "summary.json") or {}).get("eval") or {}).get("eval/accuracy")
        with s.lock:  # other jobs save the state too
            s.state["judges"][axis] = {"dataset": s.data(axis), "rows": rows, "heldout_rows": eval_rows,
                                       "heldout_accuracy": acc, "run_dir": str(run_dir), "flags": plan.JUDGE_FLAGS,
                                       "target": JUDGE_TARGET, "target_met": None if acc is None else acc >= JUDGE_TARGET}
            s.save()

    s.each(train, plan.AXES)


def recipe_dpo(s: Study, name: str, dataset: str, rows: str, eval_rows: str) -> Path:
    """Today's recipe (configs/smollm2-hh.yaml) on ``rows`` of ``dataset``; its run folder."""
    run_dir = s.work / name
    if not finished(run_dir):
        s.minialign(name, "dpo", "--config", str(ROOT / plan.RECIPE), "--model", s.args.model, "--dataset", dataset,
                    "--train-rows", rows, "--eval-data", dataset, "--eval-rows", eval_rows,
                    *(["--no-chat-template"] if s.args.small else []), *s.cut,
                    "--overwrite", "--out", str(run_dir))
    return run_dir


def phase_harmless_only(s: Study) -> None:
    h = s.plan["harmless"]
    run_dir = recipe_dpo(s, "harmless-only", s.data("harmless"), h["train"], h["validation"])
    s.record_policy("harmless-only", ["--policy", str(run_dir)], str(run_dir))


def phase_online_rm(s: Study) -> None:
    mix, setting = s.mix(), s.args.online_rm
    if setting in ("per-axis", "routed"):
        phase_online_rm_per_axis(s, setting)
        return
    flags = plan.ONLINE_RMS[setting]
    run_dir = s.work / ("online-rm" if setting == "full" else f"online-rm-{setting}")
    if not finished(run_dir):
        s.minialign("online-rm", "rm", "--model", s.args.model, *s.chat, "--dataset", mix["file"], "--train-rows",
                    plan.halves(mix["rows"]["train"])[0], "--eval-data", mix["file"], "--eval-rows", mix["rows"]["validation"],
                    "--eval-limit", "1000", "--batch-size", "16", "--eval-every", "0", *flags, *s.cut,
                    "--overwrite", "--out", str(run_dir))
    acc = ((_read_json(run_dir / "summary.json") or {}).get("eval") or {}).get("eval/accuracy")
    with s.lock:
        s.state["online_rm"] = {"run_dir": str(run_dir), "dataset": mix["file"], "rows": plan.halves(mix["rows"]["train"])[0],
                                "source_rows": mix["parts_from"]["train"], "validation_accuracy": acc,
                                "flags": flags, "setting": setting, "model_dir": str(run_dir / "final" / "model"),
                                "weights": "1"}
        s.save()


def phase_online_rm_per_axis(s: Study, setting: str) -> None:
    """One reward model per axis on that axis's rows of the mix's first half (the rows the single model reads), each
    validated on its axis's validation rows; `minialign online` combines them by zsum with equal weights (per-axis)
    or scores each prompt with its own axis's model, by the mix's `source` field (routed)."""
    mix, flags = s.mix(), plan.ONLINE_RMS[setting]
    first = plan.halves(mix["rows"]["train"])[0]
    rows = plan.source_spans(mix["file"], first)
    missing = [axis for axis in plan.AXES if axis not in rows]
    if missing:
        raise SystemExit(f"hh_two_axes: the mix's first half ({first}) holds no {', '.join(missing)} rows: "
                         f"--online-rm {setting} needs both axes there; use --online-rm lora")
    def train(axis: str) -> float | None:
        run_dir = s.work / f"online-rm-{axis}"
        if not finished(run_dir):
            s.minialign(f"online-rm-{axis}", "rm", "--model", s.args.model, *s.chat, "--dataset", s.data(axis),
                        "--train-rows", rows[axis], "--eval-data", s.data(axis), "--eval-rows", s.plan[axis]["validation"],
                        "--eval-limit", "1000", "--batch-size", "4" if s.args.small else "16", "--eval-every", "0",
                        *flags, *s.cut, "--overwrite", "--out", str(run_dir))
        return ((_read_json(run_dir / "summary.json") or {}).get("eval") or {}).get("eval/accuracy")

    accs = dict(zip(plan.AXES, s.each(train, plan.AXES)))
    dirs = [str(s.work / f"online-rm-{axis}") for axis in plan.AXES]
    routed = {"combine": "route", "routes": ",".join(plan.FOLDERS[axis] for axis in plan.AXES)}
    with s.lock:
        s.state["online_rm"] = {"run_dir": ",".join(dirs), "rows": rows, "mix_rows": first,
                                "source_rows": mix["parts_from"]["train"], "validation_accuracy": accs, "flags": flags,
                                "setting": setting, **({"weights": ",".join(["0.5"] * len(dirs))}
                                                       if setting == "per-axis" else routed)}
        s.save()


def train_online(s: Study, name: str, settings: dict, run_dir: Path) -> dict:
    """One `minialign online` run on the mix's train rows with the online reward model; its step record."""
    mix = s.mix()
    s.need("online_rm", "online-rm")
    rm = s.state["online_rm"]
    combine = rm.get("combine", "zsum")
    if finished(run_dir):
        cfg = load_run_config(run_dir, OnlineConfig)
        want = ",".join(str(Path(d).resolve()) for d in rm["run_dir"].split(","))
        if (cfg.reward_models, cfg.combine) != (want, combine):  # another --online-rm's run: never reuse it
            raise SystemExit(f"hh_two_axes: {run_dir} was trained with the reward models {cfg.reward_models} "
                             f"({cfg.combine}), not this study's {want} ({combine}); move it away or use another --work")
        return s.last_step(name)
    fresh(run_dir)
    scoring = ["--rm-routes", rm["routes"]] if combine == "route" else ["--rm-weights", rm.get("weights", "1")]
    return s.minialign(name, "online", "--model", s.args.model, *s.chat, "--dataset", mix["file"], "--train-rows",
                       plan.halves(mix["rows"]["train"])[1], "--reward-models", rm["run_dir"], *scoring,
                       "--combine", combine, *plan.online_flags(settings), "--out", str(run_dir))


def candidate_key(s: Study, cand: str) -> str:
    """A candidate's name in the state and its run folder: with another reward-model setting than the first study's
    (full), the setting is part of it, so a study seeded with earlier results keeps them beside the new ones."""
    setting = s.state["online_rm"].get("setting", "full")
    return cand if setting == "full" else f"{cand}-{setting}"


def phase_online(s: Study) -> None:
    s.need("online_rm", "online-rm")
    keys = {cand: candidate_key(s, cand) for cand in s.args.candidates.split(",")}
    scoped = [cand for cand in keys if plan.online_settings(cand).get("evasion_axes")]
    if scoped and s.state["online_rm"].get("combine") != "route":
        raise SystemExit(f"hh_two_axes: {', '.join(scoped)} penalise evasion on some axes' prompts only, which needs "
                         f"each prompt routed to its axis's reward model (--online-rm routed); this study's online "
                         f"reward model is {s.state['online_rm'].get('setting', 'full')}")
    s.mix()  # the mix and the validation suite written once, before any job reads them
    s.suite("validation")

    def run(item: tuple[str, str]) -> None:
        cand, key = item
        settings, run_dir = plan.online_settings(cand, s.args.small), s.work / f"online-{key}"
        step = train_online(s, f"online-{key}", settings, run_dir)
        rm = s.state["online_rm"]
        entry = {"settings": settings, "run_dir": str(run_dir), "wall_s": step.get("wall_s"),
                 "shared_gpu": bool(step.get("shared_gpu")), "rounds": read_jsonl(run_dir / "rounds.jsonl"),
                 "online_rm": {k: rm.get(k) for k in ("run_dir", "setting", "validation_accuracy")}}
        ev = s.evaluate(key, ["--policy", str(run_dir)], part="validation") if finished(run_dir) else None
        with s.lock:
            if ev is not None:
                entry["validation"] = {axis: results.axis_headline(ev, axis) for axis in plan.AXES}
                s.state.setdefault("validation_start", {a: results.reference_headline(ev, a) for a in plan.AXES})
            s.state["candidates"][key] = entry
            s.save()

    s.each(run, keys.items())
    ran = {k: s.state["candidates"][k] for k in keys.values() if k in s.state["candidates"]}
    name, why = results.choose_online(ran, s.state.get("validation_start") or {})  # among this call's runs only
    s.state["chosen"] = {"name": name, "why": why, "settings": (s.state["candidates"].get(name) or {}).get("settings")}
    s.save()
    if name is not None:
        run_dir = s.work / f"online-{name}"
        s.record_policy("online", ["--policy", str(run_dir)], str(run_dir))


def phase_offline_mix(s: Study) -> None:
    mix = s.mix()
    run_dir = recipe_dpo(s, "offline-mix", mix["file"], mix["rows"]["train"], mix["rows"]["validation"])
    s.record_policy("offline-mix", ["--policy", str(run_dir)], str(run_dir))


def matched_candidate(s: Study) -> str:
    """The online candidate TRL's peer matches: the one it was matched to before (a study read back keeps its peer's
    match), else the chosen one, else the first."""
    return (s.state.get("trl_online_candidate") or (s.state.get("chosen") or {}).get("name")
            or s.args.candidates.split(",")[0])


def matched_settings(s: Study) -> dict:
    name = matched_candidate(s)  # a candidate key may carry its reward-model setting (candidate_key)
    return (s.state["candidates"].get(name) or {}).get("settings") or plan.online_settings(name, s.args.small)


def train_trl_online(s: Study, name: str, out: Path) -> dict:
    s.state["trl_online_candidate"] = matched_candidate(s)
    mix, settings = s.mix(), matched_settings(s)
    s.need("online_rm", "online-rm")
    rm = s.state["online_rm"]
    if rm.get("combine", "zsum") == "route":  # minialign's routed scoring as TRL's reward function
        scoring = ["--reward-models", rm["run_dir"], "--rm-routes", rm["routes"], "--loop-penalty",
                   str(settings.get("loop_penalty", 0.0)), "--evasion-penalty", str(settings.get("evasion_penalty", 0.0)),
                   "--evasion-routes", plan.evasion_routes(settings)]
    elif rm.get("setting", "full") == "full":
        scoring = ["--reward-model", rm["model_dir"]]
    else:
        raise SystemExit("hh_two_axes: trl-online loads one online reward model as a full model folder or routes "
                         f"between per-axis ones; this study's is {rm['setting']} (use --online-rm full or routed)")
    match = plan.trl_online_plan(settings)
    if finished(out, "trl_online.json"):
        return s.last_step(name)
    fresh(out)
    return s.run(name, [str(HERE / "trl_online.py"), "--model", s.args.model, "--tokenizer", s.tokenizer,
                        "--dataset", mix["file"], "--train-rows", plan.halves(mix["rows"]["train"])[1], "--prompts",
                        str(settings["prompts_per_round"]), "--rounds", str(settings["rounds"]), *scoring, "--epochs",
                        str(match["epochs"]), "--batch-size", str(match["batch_size"]), "--beta", str(settings["beta"]),
                        "--lr", str(settings["lr"]), "--temperature", str(settings["temperature"]), "--top-p",
                        str(settings["top_p"]), "--max-new-tokens", str(settings["max_new_tokens"]), "--lora-r",
                        str(settings["lora_r"]), "--lora-alpha", str(settings["lora_alpha"]), "--missing-eos-penalty",
                        str(settings.get("missing_eos_penalty", 0.0)), *(["--chat-template"] if s.chat else []),
                        "--out", str(out)])


def trl_online_key(s: Study) -> str:
    """TRL's online policy's name, with the reward-model setting as in ``candidate_key``."""
    setting = s.state["online_rm"].get("setting", "full")
    return "trl-online" if setting == "full" else f"trl-online-{setting}"


def phase_trl_online(s: Study) -> None:
    s.need("online_rm", "online-rm")
    key = trl_online_key(s)
    out = s.work / key
    train_trl_online(s, key, out)
    s.state["trl_online_match"] = plan.trl_online_plan(matched_settings(s))
    note = ("TRL online: 2 samples a prompt (fixed in TRL 1.16's OnlineDPOTrainer) where minialign samples 4, "
            "and no NLL term (rpo_alpha) in its loss; prompts, reward model, temperature, top-p, max new tokens, "
            "LoRA, learning rate and steps matched")
    notes = [note]
    if s.state["online_rm"].get("combine") == "route":
        notes.append("TRL online routed: minialign's two reward models and routing as one TRL reward function "
                     "(minialign's combine_scores and loop penalty), each model's scores standardised over a "
                     "step's batch where minialign standardises over the round's samples")
    s.state["notes"] += [n for n in notes if n not in s.state["notes"]]
    if finished(out, "trl_online.json"):
        s.record_policy(key, s.adapter_policy(out / "adapter"), str(out))


def phase_trl_dpo(s: Study) -> None:
    mix, out = s.mix(), s.work / "trl-dpo"
    if not finished(out, "trl.json"):
        fresh(out)
        s.run("trl-dpo", [str(HERE.parent / "trl_e2e.py"), "--task", "dpo", "--mode", "lora", "--model", s.args.model,
                          "--tokenizer", s.tokenizer, "--data", mix["file"], "--train-rows", mix["rows"]["train"],
                          "--eval-rows", mix["rows"]["validation"], *plan.TRL_DPO_FLAGS, *s.cut,
                          *(["--chat-template"] if s.chat else []), "--out-json", str(out / "trl.json"),
                          "--adapter-out", str(out / "final")])
    note = "TRL DPO on the mix: plain DPO (TRL 1.16's DPOTrainer has no rpo_alpha), the recipe's other settings"
    if note not in s.state["notes"]:
        s.state["notes"].append(note)
    if finished(out, "trl.json"):
        s.record_policy("trl-dpo", s.adapter_policy(out / "final"), str(out))


def round_seconds(rounds: list[dict]) -> float | None:
    """One online round's seconds (generate + score + DPO) from its rounds.jsonl row: the first round's."""
    if not rounds:
        return None
    r = rounds[0]
    parts = [r.get(k) for k in ("generate_s", "score_s", "train_s")]
    return None if None in parts else float(sum(parts))


def phase_timing(s: Study) -> None:
    cands = s.state["candidates"]
    chosen = (s.state.get("chosen") or {}).get("name")
    # the round: this call's candidate with the most prompts a round (the chosen one among equals), never one an
    # earlier call (a seeded state) ran on another machine or with another reward model
    mine = [k for k in (candidate_key(s, c) for c in s.args.candidates.split(","))
            if k in cands and not cands[k].get("shared_gpu")]  # a run that shared the GPU (--jobs) is no timing
    big = max(mine, key=lambda c: (cands[c]["settings"]["prompts_per_round"], c == chosen), default=None)
    round_s = round_seconds(cands[big]["rounds"]) if big else None
    m_walls = [cands[chosen]["wall_s"]] if chosen in mine and cands[chosen].get("wall_s") else []
    t_walls = [s.last_step(trl_online_key(s)).get("wall_s")] if s.last_step(trl_online_key(s)) else []
    for i in range(s.args.timing_repeats):  # alternating, in this same call
        step = train_online(s, f"timing-online-{i}", matched_settings(s), s.work / "timing" / f"online-{i}")
        m_walls.append(step.get("wall_s"))
        t_walls.append(train_trl_online(s, f"timing-trl-online-{i}", s.work / "timing" / f"trl-{i}").get("wall_s"))
    s.state["timing"] = {**results.timing_summary(round_s, m_walls, t_walls), "round_from": big,
                         "round_prompts": cands[big]["settings"]["prompts_per_round"] if big else None,
                         "round_samples": cands[big]["settings"]["samples"] if big else None}
    s.save()


def phase_heldout(s: Study) -> None:
    """Each recorded policy whose run folder is here (a seeded state's are not) against the starting model on the
    held-out helpful files, judged for helpfulness: prompts no model of the study has read."""
    s.state["heldout_setup"] = {"files": list(plan.HELD_OUT), "rows": plan.HELD_OUT_ROWS}
    checks = s.state.setdefault("heldout", {})
    for name, p in s.state["policies"].items():
        run = p.get("run")
        if not p.get("flags") or not run or not Path(run).exists():  # seeded from another machine's state
            continue
        ev = s.evaluate(name, p["flags"], part="heldout")
        if ev is not None:
            checks[name] = {folder: results.axis_headline(ev, folder) for folder in plan.HELD_OUT}
            s.state.setdefault("heldout_start", {f: results.reference_headline(ev, f) for f in plan.HELD_OUT})
        s.save()


def phase_groups(phases: list[str], jobs: int) -> list[tuple[str, ...]]:
    """The phases in order, one at a time, except TOGETHER's side by side where --jobs allows and both are asked."""
    together = jobs > 1 and set(TOGETHER) <= set(phases)
    return [TOGETHER if together and x == TOGETHER[0] else (x,) for x in phases if not together or x not in TOGETHER[1:]]


def main(argv=None) -> int:
    args = parse_args(argv)
    s = Study(args)
    phases = {"judges": phase_judges, "harmless-only": phase_harmless_only, "online-rm": phase_online_rm,
              "online": phase_online, "offline-mix": phase_offline_mix, "trl-online": phase_trl_online,
              "trl-dpo": phase_trl_dpo, "timing": phase_timing, "heldout": phase_heldout}
    for names in phase_groups(args.phases.split(","), args.jobs):
        s.each(lambda name: phases[name](s), names)
        print("\n".join(f"[hh2] phase {name} done" for name in names), flush=True)
    s.save()
    print(results.markdown(results.build_summary(s.state)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
