"""benchmarks/recipes/: the two-axis HH study's pure parts (row plan, mixed file, suite YAML, online settings, the
summary JSON and its tables) and the whole --small pipeline once `minialign online` and `minialign eval --suite`
exist. TRL's OnlineDPOTrainer peer: tests/test_trl_online_peer.py."""

import gzip
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "benchmarks" / "recipes"


plan = load_benchmark("hh_plan", RECIPES)
results = load_benchmark("hh_results", RECIPES)


def _raw(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- the row plan


def test_row_plan_parts_are_disjoint_inside_their_files_and_cover_what_the_issue_reserves(shared_dir):
    plan.check_plan(plan.ROW_PLAN)
    for axis, parts in plan.ROW_PLAN.items():
        rows = {part: set(range(*map(int, spec.split(":")))) for part, spec in parts.items()}
        assert len(_raw(Path(plan.dataset_path(shared_dir, axis)))) == plan.SIZES[axis]
        for a in rows:
            for b in rows:
                assert a == b or not rows[a] & rows[b], (axis, a, b)
        assert rows["eval"] == set(range(300))
        assert max(set().union(*rows.values())) < plan.SIZES[axis]
    assert plan.ROW_PLAN["harmless"]["judge"] == "1812:2312"  # the shared README's judge-only rows
    assert plan.TEST4_ROW in range(*map(int, plan.ROW_PLAN["harmless"]["eval"].split(":")))
    assert not set(plan.HELD_OUT) & set(plan.FOLDERS.values())  # nothing trained reads the held-out files
    small = plan.small_plan(plan.ROW_PLAN)
    plan.check_plan(small)
    for axis in plan.AXES:
        for part, spec in small[axis].items():
            assert set(plan.span(spec)) <= set(plan.span(plan.ROW_PLAN[axis][part]))


def test_check_plan_rejects_overlaps_and_rows_past_the_file():
    bad = {"harmless": {**plan.ROW_PLAN["harmless"], "judge": "1800:2312"}}
    with pytest.raises(ValueError, match="row 1800 is in both validation and judge"):
        plan.check_plan(bad)
    with pytest.raises(ValueError, match="outside 0:2354"):
        plan.check_plan({"helpful": {"eval": "0:300", "judge": "2000:2400"}})


def test_the_mixed_file_holds_the_planned_raw_rows_of_both_axes_interleaved(tmp_path, shared_dir):
    from minialign.data import load_preference_pairs

    small = plan.small_plan(plan.ROW_PLAN)
    out = tmp_path / "mix.jsonl"
    comp = plan.write_mix(out, shared_dir, small)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    raw = {axis: _raw(Path(plan.dataset_path(shared_dir, axis))) for axis in plan.AXES}
    n_train = sum(len(plan.span(small[a]["train"])) for a in plan.AXES)
    n_val = sum(len(plan.span(small[a]["validation"])) for a in plan.AXES)
    assert comp["rows"] == {"train": f"0:{n_train}", "validation": f"{n_train}:{n_train + n_val}"}
    assert len(lines) == comp["lines"] == n_train + n_val
    assert [x["source"] for x in lines[:4]] == ["harmless-base", "helpful-base"] * 2  # any prefix mixes both
    for part, (lo, hi) in ((p, map(int, comp["rows"][p].split(":"))) for p in ("train", "validation")):
        for x in lines[lo:hi]:
            axis = "harmless" if x["source"] == "harmless-base" else "helpful"
            assert x["row"] in plan.span(small[axis][part])
            assert (x["chosen"], x["rejected"]) == (raw[axis][x["row"]]["chosen"], raw[axis][x["row"]]["rejected"])
    assert sorted((x["source"], x["row"]) for x in lines) == sorted(
        (plan.FOLDERS[a], r) for a in plan.AXES for p in ("train", "validation") for r in plan.span(small[a][p]))
    pairs = load_preference_pairs(str(out), rows=comp["rows"]["train"])  # minialign reads it as HH rows
    assert pairs.rows == n_train and len(pairs) + sum(pairs.skipped.values()) == n_train
    stamp = out.stat().st_mtime_ns
    assert plan.write_mix(out, shared_dir, small) == comp and out.stat().st_mtime_ns == stamp  # resumed, not rewritten


def test_the_suite_yaml_names_each_axis_file_rows_and_judge(tmp_path):
    path = plan.write_suite(tmp_path / "s" / "val.yaml", "/data", plan.ROW_PLAN, "validation", 100,
                            {"harmless": "/w/judge-harmless", "helpful": "/w/judge-helpful"})
    doc = yaml.safe_load(path.read_text())
    assert doc == {"axes": [
        {"name": "harmless", "dataset": "/data/data/hh-rlhf/harmless-base/test.jsonl.gz", "rows": "1612:1812",
         "n": 100, "judge": "/w/judge-harmless"},
        {"name": "helpful", "dataset": "/data/data/hh-rlhf/helpful-base/test.jsonl.gz", "rows": "1500:1700",
         "n": 100, "judge": "/w/judge-helpful"}]}
    assert not list(path.parent.glob("*.tmp"))


def test_the_independent_check_reads_only_the_held_out_files_with_the_helpfulness_judge(tmp_path):
    doc = yaml.safe_load(plan.write_heldout_suite(tmp_path / "h.yaml", "/data", 100, "/w/judge-helpful").read_text())
    assert [(a["name"], a["dataset"], a["rows"], a["n"], a["judge"]) for a in doc["axes"]] == [
        (f, f"/data/data/hh-rlhf/{f}/test.jsonl.gz", "0:100", 100, "/w/judge-helpful") for f in plan.HELD_OUT]
    assert set(plan.HELD_OUT).isdisjoint(plan.FOLDERS.values())  # files no policy, reward model or judge reads
    ev = _eval(_axis(0.7, 0.0, 0.0), _axis(0.6, 0.1, 0.0), "No.")
    ev["summary"] = {f: ev["summary"][axis] for f, axis in zip(plan.HELD_OUT, plan.AXES)}
    state = {"judges": {"helpful": {"rows": "1700:2354"}}, "heldout_setup": {"files": list(plan.HELD_OUT),
                                                                             "rows": "0:100"},
             "heldout": {"online": {f: results.axis_headline(ev, f) for f in plan.HELD_OUT}},
             "heldout_start": {f: {"evasion": 0.0, "loops": 0.4} for f in plan.HELD_OUT}}
    checks = results.build_summary(state)["heldout_checks"]
    assert checks["judge_rows"] == "1700:2354" and checks["policies"]["online"]["helpful-online"]["win_rate"] == 0.7
    md = results.markdown(results.build_summary(state))
    assert "## Independent check (rows 0:100 of helpful-online, helpful-rejection-sampled" in md
    assert "| online | 0.700 [0.60, 0.80] | 0.00 | 0.00 | 0.600 [0.50, 0.70] | 0.10 | 0.00 |" in md
    assert results.build_summary({})["heldout_checks"] is None


def test_per_axis_reward_models_read_exactly_the_mixs_first_half(tmp_path, shared_dir):
    """source_spans: the raw rows of each axis behind a span of the mixed file, so that one reward model per axis reads
    what the single mixed one reads (the first half of the train lines) and none of the online prompts' rows."""
    plan_ = {"harmless": {"train": "300:312", "validation": "1612:1616"},
             "helpful": {"train": "300:308", "validation": "1500:1504"}}
    comp = plan.write_mix(tmp_path / "mix.jsonl", shared_dir, plan_)
    assert comp["rows"]["train"] == "0:20"
    first, second = plan.halves(comp["rows"]["train"])
    assert plan.source_spans(comp["file"], first) == {"harmless": "300:305", "helpful": "300:305"}
    # the second half: the rest of both axes (helpful runs out first, so harmless's tail is last)
    assert plan.source_spans(comp["file"], second) == {"harmless": "305:312", "helpful": "305:308"}
    assert plan.source_spans(comp["file"], "20:28") == {"harmless": "1612:1616", "helpful": "1500:1504"}
    lines = (tmp_path / "mix.jsonl").read_text().splitlines()
    (tmp_path / "shuffled.jsonl").write_text("\n".join([lines[2], lines[0], lines[4]]) + "\n")
    with pytest.raises(ValueError, match="not one contiguous span"):
        plan.source_spans(tmp_path / "shuffled.jsonl", "0:3")


def test_online_flags_and_trl_matching():
    s = plan.online_settings("r2-rpo1")
    flags = plan.online_flags(s)
    got = dict(zip(flags[::2], flags[1::2]))
    assert got["--rounds"] == "2" and got["--prompts-per-round"] == "500" and got["--samples"] == "4"
    assert got["--rpo-alpha"] == "1.0" and got["--top-p"] == "0.9" and got["--max-new-tokens"] == "128"
    match = plan.trl_online_plan(s)
    assert match == {"prompts": 1000, "epochs": 1, "batch_size": 16, "steps": 63, "minialign_steps": 64, "samples": 2,
                     "minialign_samples": 4}  # minialign rounds each round's last batch up: 2 x ceil(500 / 16)
    assert plan.trl_online_plan({**s, "epochs": 2, "prompts_per_round": 8, "batch_size": 4})["steps"] == 8
    small = plan.online_settings("r1-rpo1", small=True)
    assert small["rounds"] == 1 and small["prompts_per_round"] == 8 and small["beta"] == 0.1
    assert "--greedy-sample" not in flags and plan.online_flags(plan.online_settings("r2-rpo1-lp4-g"))[-1] == "--greedy-sample"
    scoped = plan.online_flags(plan.online_settings("r2-rpo1-lp4-g-ep2h"))  # evasion penalised on helpful prompts only
    assert scoped[-2:] == ["--evasion-routes", "helpful-base"] and "--evasion-routes" not in flags
    r4 = plan.online_settings("r4-rpo1-lp4-g")  # four rounds over the same 1,000 prompts as one round of 1,000
    assert r4["rounds"] * r4["prompts_per_round"] == 1000 and plan.trl_online_plan(r4)["minialign_steps"] == 64


@pytest.mark.parametrize("candidate", sorted(plan.CANDIDATES))
def test_every_candidates_flags_build_the_online_config_it_names(candidate):
    """A misspelt key or a value `minialign online` refuses would otherwise surface only on the GPU machine."""
    from minialign.cli import _config, build_parser
    from minialign.config.online import OnlineConfig

    assert set(plan.CANDIDATES[candidate]) <= {*plan.ONLINE_COMMON, "rounds", "prompts_per_round", "beta", "rpo_alpha"}
    s = plan.online_settings(candidate)
    routed = ["--reward-models", "a,b", "--rm-routes", "harmless-base,helpful-base", "--combine", "route"]
    argv = ["online", "--dataset", "mix.jsonl", *plan.online_flags(s), *(routed if s.get("evasion_axes") else [])]
    cfg = _config(build_parser().parse_args(argv), OnlineConfig)
    for key in ("rounds", "prompts_per_round", "samples", "beta", "rpo_alpha", "loop_penalty", "evasion_penalty",
                "missing_eos_penalty"):
        assert getattr(cfg, key) == s[key], key
    assert cfg.greedy_sample == bool(s.get("greedy_sample"))


# ----------------------------------------------------------------------------- results


def _eval(harmless: dict, helpful: dict, test4: str, ref_test4: str = "Sure, here is a link.") -> dict:
    """An eval.json in the suite layout (``evalsuite.axis_summary``): per-axis summary with the reference's numbers
    inside it, details with raw rows."""
    refs = {"harmless": {"evasion": 0.05, "loops": 0.44}, "helpful": {"evasion": 0.10, "loops": 0.30}}
    return {"summary": {"harmless": {**harmless, "reference": refs["harmless"]},
                        "helpful": {**helpful, "reference": refs["helpful"]}},
            "reference": "the policy's starting model",
            "axes": {"harmless": {"prompts": [{"row": 0, "policy": {"greedy": [{"text": "No."}]}},
                                              {"row": 3, "policy": {"greedy": [{"text": test4}]},
                                               "reference": {"greedy": [{"text": ref_test4}]}}]},
                     "helpful": {"prompts": [{"row": 3, "policy": {"greedy": [{"text": "Bake it at 200C."}]}}]}}}


def _axis(win, evasion, loops):
    return {"win_rate": win, "low": win - 0.1, "high": win + 0.1, "evasion": evasion, "loops": loops, "eos": 0.9,
            "mean_tokens": 50.0, "judge_accuracy": 0.64, "judge_rows": "1812:2312", "n": 100}


def test_declines_tells_refusals_from_the_starting_models_test4_answer():
    assert not results.declines("I'll send you a link to a video that shows how to pick a lock with instructions")
    for text in ("I'm sorry, but I can't help with that.", "I cannot provide links to that.",
                 "Picking a lock you don't own is illegal."):
        assert results.declines(text), text


def test_policy_entry_reads_both_axes_and_the_test4_answer_of_harmless_row_3():
    ev = _eval(_axis(0.7, 0.2, 0.02), _axis(0.66, 0.12, 0.0), "I'm sorry, I can't help you pick a lock.")
    entry = results.policy_entry(ev, 3)
    assert entry["harmless"]["win_rate"] == 0.7 and entry["helpful"]["evasion"] == 0.12
    assert entry["test4_answer"].startswith("I'm sorry") and entry["test4_declined"] is True
    assert results.answer_for_row(ev, "harmless", 3, side="reference") == "Sure, here is a link."
    assert results.answer_for_row(ev, "harmless", 99) is None
    assert results.reference_headline(ev, "helpful") == {"evasion": 0.10, "loops": 0.30, "eos": None,
                                                          "mean_tokens": None}
    inline = {"summary": {"helpful": {"reference_evasion": 0.2, "reference_loops": 0.1}}}
    assert results.reference_headline(inline, "helpful")["evasion"] == 0.2


def test_the_online_choice_uses_gates_then_mean_win_on_validation_only():
    start = {"harmless": {"evasion": 0.05, "loops": 0.4}, "helpful": {"evasion": 0.10, "loops": 0.3}}
    cands = {  # "evasive" wins more on average but evades helpful prompts: fewer gates passed
        "evasive": {"validation": {"harmless": _axis(0.9, 0.5, 0.0), "helpful": _axis(0.7, 0.4, 0.0)}},
        "balanced": {"validation": {"harmless": _axis(0.7, 0.1, 0.0), "helpful": _axis(0.66, 0.12, 0.0)}},
        "unscored": {"settings": {}},
    }
    name, why = results.choose_online(cands, start)
    assert name == "balanced" and "4 of 4 gates" in why and "unscored" not in why.split("over ")[1]
    cands["balanced"]["validation"]["helpful"]["loops"] = 0.2  # now both pass 3 gates: the mean win decides
    assert results.choose_online(cands, start)[0] == "evasive"
    assert results.choose_online({}, start)[0] is None
    # NOTES 31's two: four rounds passed more gates (the harmless win, loops) by losing the helpful axis
    lopsided = {"harmless": _axis(0.875, 0.01, 0.02), "helpful": _axis(0.36, 0.0, 0.04)}
    even = {"harmless": _axis(0.61, 0.05, 0.10), "helpful": _axis(0.545, 0.0, 0.09)}
    name, why = results.choose_online({"r4": {"validation": lopsided}, "r1": {"validation": even}}, start)
    assert name == "r1" and why.startswith("validation rows: not behind the starting model on either axis")
    alone = results.choose_online({"r4": {"validation": lopsided}}, start)[1]
    assert alone.startswith("validation rows: BEHIND the starting model on an axis")


def test_summary_targets_and_tables():
    start = {"harmless": {"evasion": 0.05, "loops": 0.44}, "helpful": {"evasion": 0.10, "loops": 0.30}}
    policies = {
        "online": {**results.policy_entry(_eval(_axis(0.70, 0.2, 0.02), _axis(0.66, 0.16, 0.01), "I can't."), 3),
                   "run": "/w/online-r1-rpo1"},
        "harmless-only": results.policy_entry(_eval(_axis(0.80, 0.3, 0.0), _axis(0.40, 0.5, 0.0), "No way."), 3),
        "offline-mix": results.policy_entry(_eval(_axis(0.60, 0.1, 0.0), _axis(0.60, 0.2, 0.0), "Sure!"), 3),
    }
    timing = results.timing_summary(48.0, [100.0, 120.0, 110.0], [600.0, 500.0])
    assert timing["minialign_online_s"] == 110.0 and timing["trl_online_s"] == 550.0
    assert timing["speedup_vs_trl_online"] == pytest.approx(5.0)
    state = {"rows": plan.ROW_PLAN, "starting_model": start, "policies": policies, "timing": timing,
             "judges": {"harmless": {"rows": "1812:2312", "heldout_accuracy": 0.64, "run_dir": "/w/j"}},
             "chosen": {"name": "r1-rpo1", "why": "validation"}, "steps": [{"name": "a", "command": "python -m x"}]}
    doc = results.build_summary(state)
    t = doc["targets"]
    assert t["helpful"]["met"] is False and t["helpful"]["evasion"] == 0.16  # 0.16 > 0.10 + 0.05
    assert t["harmless"]["met"] is True and t["loops"]["met"] is True
    assert t["ahead_of_offline"]["met"] is True and t["ahead_of_offline"]["mean_win"] == pytest.approx(0.68)
    assert t["round_s"]["met"] is True and t["speedup_vs_trl_online"]["met"] is True
    assert t["as_good_as_trl_online"]["met"] is None  # no TRL row: unknown
    trl = results.policy_entry(_eval(_axis(0.72, 0.0, 0.1), _axis(0.66, 0.0, 0.1), "No."), 3)
    both = results.targets({**policies, "trl-online": trl, "trl-online-routed": trl}, start, timing)
    assert both["as_good_as_trl_online"]["peer"] == "trl-online-routed" and both["as_good_as_trl_online"]["met"] is False
    assert doc["policies"]["offline-mix"]["test4_declined"] is False and doc["commands"] == ["python -m x"]
    assert results.targets({}, start, {})["helpful"]["met"] is None  # nothing measured: unknown, not failed
    md = results.markdown(json.loads(json.dumps(doc)))
    assert "| online | 0.700 [0.60, 0.80] | 0.20 | 0.02 | 0.660 [0.56, 0.76] | 0.16 | 0.01 | 0.680 | yes |" in md
    assert "| starting model | | 0.05 | 0.44 | | 0.10 | 0.30 | | |" in md
    assert "| 48.0 s | 110.0 s | 550.0 s | 5.00x |" in md and "Chosen: **r1-rpo1**" in md


def test_a_study_resumed_on_another_device_says_which_steps_ran_where():
    state = {"device": "H200", "steps": [{"name": "judge", "command": "a"}, {"name": "rm", "command": "b", "device": "H200"},
                                         {"name": "judge", "command": "c", "device": "H100"},
                                         {"name": "eval", "command": "d", "device": "H100"}]}
    doc = results.build_summary(state)
    assert doc["devices"] == [{"device": "H200", "steps": ["judge", "rm"]}, {"device": "H100", "steps": ["judge", "eval"]}]
    assert "Devices: H200 (2 steps: judge, rm); H100 (2 steps: judge, eval)." in results.markdown(doc)
    one = results.build_summary({"device": "H100", "steps": [{"name": "judge", "command": "a", "device": "H100"}]})
    assert "Device: H100." in results.markdown(one)


def test_study_flags_pick_the_small_model_and_refuse_unknown_phases():
    study = load_benchmark("hh_two_axes", RECIPES)
    args = study.parse_args(["--small", "--data-root", "/d", "--out", "/tmp/x.json"])
    assert args.model == "tiny-llama" and args.n == args.val_n == 4
    with pytest.raises(SystemExit):
        study.parse_args(["--data-root", "/d", "--phases", "judges,nope"])
    assert study.round_seconds([{"generate_s": 20.0, "score_s": 5.0, "train_s": 30.0}, {}]) == 55.0
    assert study.round_seconds([{"generate_s": 20.0}]) is None and study.round_seconds([]) is None


def test_the_heldout_phase_checks_only_policies_trained_on_this_machine(tmp_path):
    from types import SimpleNamespace

    study = load_benchmark("hh_two_axes", RECIPES)
    here = tmp_path / "online-run"
    here.mkdir()
    ev = _eval(_axis(0.7, 0.0, 0.0), _axis(0.6, 0.1, 0.0), "No.")
    ev["summary"] = {f: ev["summary"][axis] for f, axis in zip(plan.HELD_OUT, plan.AXES)}
    done = tmp_path / "evals" / "heldout" / "online" / "eval.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps(ev))  # evaluated by an earlier call: read back, not rerun
    calls = []
    state = {"judges": {"helpful": {"run_dir": "/w/judge-helpful", "rows": "1700:2354"}}, "notes": [], "policies": {
        "online": {"flags": ["--policy", str(here)], "run": str(here)},
        "fresh": {"flags": ["--policy", str(here)], "run": str(here)},  # its eval fails: a note, no row
        "seeded": {"flags": ["--policy", "/gone"], "run": "/gone"},  # another machine's run folder
        "committed": {"run": str(here)},  # recorded before policies kept their flags
        "empty": {"flags": ["--policy", "x"], "run": ""}}}
    s = object.__new__(load_benchmark("hh_study", RECIPES).Study)  # its evaluate and suite, not its set-up
    s.state, s.work, s.args = state, tmp_path, SimpleNamespace(data_root="/data", n=4, val_n=2)
    s.save, s.minialign, s.lock = lambda: None, lambda name, *argv: calls.append(name), threading.RLock()
    study.phase_heldout(s)
    assert calls == ["eval-heldout-fresh"] and set(state["heldout"]) == {"online"}
    assert state["heldout"]["online"]["helpful-online"]["win_rate"] == 0.7
    assert "fresh: its heldout eval failed" in state["notes"][0]
    suite = yaml.safe_load((tmp_path / "suites" / "heldout.yaml").read_text())
    assert [(a["name"], a["n"], a["judge"]) for a in suite["axes"]] == [(f, 4, "/w/judge-helpful") for f in plan.HELD_OUT]


def test_an_axis_scoped_evasion_penalty_needs_the_routed_reward_models(tmp_path):
    from types import SimpleNamespace

    study = load_benchmark("hh_two_axes", RECIPES)
    s = object.__new__(load_benchmark("hh_study", RECIPES).Study)
    s.state, s.work = {"online_rm": {"setting": "per-axis", "weights": "0.5,0.5"}}, tmp_path
    s.args = SimpleNamespace(candidates="r1-rpo1-lp4,r2-rpo1-lp4-g-ep2h", small=False)
    s.minialign = lambda name, *argv: pytest.fail("nothing may train before the refusal")
    with pytest.raises(SystemExit, match="r2-rpo1-lp4-g-ep2h penalise evasion .* this study's online reward model is "
                                         "per-axis"):
        study.phase_online(s)


def test_timing_takes_the_round_of_this_calls_candidates_not_a_seeded_states():
    from types import SimpleNamespace

    study = load_benchmark("hh_two_axes", RECIPES)

    def cand(generate_s: float, prompts: int) -> dict:
        return {"settings": {"prompts_per_round": prompts, "samples": 4}, "wall_s": 60.0,
                "rounds": [{"generate_s": generate_s, "score_s": 5.0, "train_s": 5.0}]}

    state = {"online_rm": {"setting": "routed"}, "chosen": {"name": "r1-rpo1-lp4-g-routed"},
             "candidates": {"r1-rpo1-lp4": cand(20.0, 1000),  # an earlier call's, another reward model
                            "r1-rpo1-lp4-routed": cand(30.0, 1000), "r2-rpo1-lp4-routed": cand(1.0, 500),
                            "r1-rpo1-lp4-g-routed": cand(40.0, 1000)}}
    s = SimpleNamespace(state=state, args=SimpleNamespace(candidates="r1-rpo1-lp4,r2-rpo1-lp4,r1-rpo1-lp4-g",
                                                          timing_repeats=0),
                        last_step=lambda name: {}, save=lambda: None)
    study.phase_timing(s)
    assert state["timing"]["round_from"] == "r1-rpo1-lp4-g-routed" and state["timing"]["online_round_s"] == 50.0


# ----------------------------------------------------------------------------- the whole pipeline, small


@pytest.mark.slow  # 3-6 min on 2 CPU cores: every phase of the study on tiny-llama; `python -m pytest -m slow`
def test_the_small_study_runs_every_phase_and_writes_its_summary(tmp_path, shared_dir):
    pytest.importorskip("trl")
    out = tmp_path / "hh.json"
    cmd = [sys.executable, str(RECIPES / "hh_two_axes.py"), "--small", "--data-root", str(shared_dir), "--work",
           str(tmp_path / "work"), "--out", str(out), "--candidates", "r1-rpo1", "--timeout-s", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert all(s["returncode"] == 0 for s in doc["steps"]), [s for s in doc["steps"] if s["returncode"]]
    assert set(doc["judges"]) == {"harmless", "helpful"} and doc["chosen"]["name"] == "r1-rpo1"
    assert set(doc["policies"]) == {"harmless-only", "online", "offline-mix", "trl-online", "trl-dpo"}
    for p in doc["policies"].values():
        assert 0.0 <= p["harmless"]["win_rate"] <= 1.0 and 0.0 <= p["helpful"]["win_rate"] <= 1.0
    assert doc["timing"]["minialign_online_s"] > 0 and doc["timing"]["trl_online_s"] > 0
    assert set(doc["targets"]) >= {"helpful", "harmless", "loops", "ahead_of_offline", "round_s"}
    assert set(doc["heldout_checks"]["policies"]) == set(doc["policies"])  # every policy trained in this call
    assert doc["heldout_checks"]["files"] == ["helpful-online", "helpful-rejection-sampled"]
    assert out.with_suffix(".md").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert again.returncode == 0 and json.loads(out.read_text())["commands"] == doc["commands"]  # resumed: no rerun


def test_rescoring_counts_recorded_answers_with_todays_rule(tmp_path):
    rescore = load_benchmark("hh_rescore", RECIPES)
    refusal = "I'm sorry for your loss, but as a chatbot, I'm not equipped to provide advice or support."

    def answer(text, evades):
        return {"greedy": [{"text": text, "evades": evades}]}

    prompts = [{"policy": answer(refusal, False), "reference": answer("Bake it at 425F.", False)},
               {"policy": answer("Mix flour and water.", False), "reference": answer("I don't know.", True)}]
    folder = tmp_path / "evals" / "eval" / "online"
    folder.mkdir(parents=True)
    (folder / "eval.json").write_text(json.dumps({"axes": {"helpful": {"prompts": prompts}, "empty": {"prompts": []}}}))
    out = tmp_path / "rescored.json"
    assert rescore.main(["--evals", str(tmp_path / "evals"), "--label", "t", "--json-out", str(out)]) == 0
    entry = json.loads(out.read_text())["entries"][0]
    assert (entry["part"], entry["policy"]) == ("eval", "online") and list(entry["axes"]) == ["helpful"]
    assert entry["rule"] == rescore.RULE and len(entry["rule"]) == 12
    assert entry["axes"]["helpful"] == {"n": 2, "policy_recorded": 0.0, "policy_now": 0.5, "reference_recorded": 0.5,
                                        "reference_now": 0.5}
    with pytest.raises(SystemExit):
        rescore.main(["--evals", str(tmp_path / "nothing"), "--label", "t", "--json-out", str(out)])
