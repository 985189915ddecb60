"""benchmarks/recipes/: the two-axis study's `--jobs` (several commands at once on the one GPU, to spend less device
time): the commands really run side by side, their steps say the GPU was shared, the timing phase leaves such runs
out, and an error in one job still stops the study (several threads writing one file: tests/test_files.py)."""

import sys
import threading
from types import SimpleNamespace

import pytest

from tests.conftest import load_benchmark
from tests.test_hh_two_axes import RECIPES

plan = load_benchmark("hh_plan", RECIPES)
study = load_benchmark("hh_two_axes", RECIPES)


def _study(tmp_path, jobs: int):
    """A Study with its command runner and locks, not its set-up (no data root, no device probe)."""
    s = object.__new__(load_benchmark("hh_study", RECIPES).Study)
    s.args, s.work, s.env, s.device = SimpleNamespace(jobs=jobs, timeout_s=60), tmp_path, None, "cpu"
    s.state, s.lock, s.local = {"steps": []}, threading.RLock(), threading.local()
    s.save = lambda: None
    return s


def _meet(here: str, other: str) -> list[str]:
    """A child that leaves its flag and then waits up to 30 s for the other's: it exits 0 only if both run at once."""
    return ["-c", f"import pathlib, sys, time; pathlib.Path({here!r}).touch(); end = time.time() + 30\n"
                  f"while not pathlib.Path({other!r}).exists() and time.time() < end: time.sleep(0.05)\n"
                  f"sys.exit(0 if pathlib.Path({other!r}).exists() else 3)"]


def test_jobs_run_side_by_side_and_their_steps_say_the_gpu_was_shared(tmp_path):
    s = _study(tmp_path, jobs=2)
    a, b = str(tmp_path / "a.flag"), str(tmp_path / "b.flag")
    steps = s.each(lambda job: s.run(job[0], _meet(*job[1:])), [("a", a, b), ("b", b, a)])
    assert [st["returncode"] for st in steps] == [0, 0]  # each saw the other's flag: they overlapped
    assert [st["name"] for st in steps] == ["a", "b"] and all(st["shared_gpu"] for st in s.state["steps"])
    alone = s.run("alone", ["-c", "pass"])  # the main thread's command ran by itself
    assert alone["returncode"] == 0 and alone["shared_gpu"] is False


def test_one_job_at_a_time_runs_in_order_and_shares_nothing(tmp_path):
    s = _study(tmp_path, jobs=1)
    order = []
    s.each(lambda name: order.append(s.run(name, ["-c", "pass"])["name"]), ["x", "y", "z"])
    assert order == ["x", "y", "z"] and not any(st["shared_gpu"] for st in s.state["steps"])


def test_an_error_in_one_job_stops_the_study_after_the_others_end(tmp_path):
    s = _study(tmp_path, jobs=3)
    ended = []

    def job(name: str) -> None:
        if name == "bad":
            raise SystemExit("hh_two_axes: bad job")
        s.run(name, ["-c", "import time; time.sleep(0.3)"])
        ended.append(name)

    with pytest.raises(SystemExit, match="bad job"):
        s.each(job, ["ok1", "bad", "ok2"])
    assert sorted(ended) == ["ok1", "ok2"]


def test_timing_leaves_out_candidates_that_shared_the_gpu():
    def cand(generate_s: float, prompts: int, shared: bool) -> dict:
        return {"settings": {"prompts_per_round": prompts, "samples": 4}, "wall_s": 60.0, "shared_gpu": shared,
                "rounds": [{"generate_s": generate_s, "score_s": 5.0, "train_s": 5.0}]}

    state = {"online_rm": {"setting": "full"}, "chosen": {"name": "r1-rpo1-lp4"},
             "candidates": {"r1-rpo1-lp4": cand(40.0, 1000, True), "r2-rpo1-lp4": cand(10.0, 500, False)}}
    s = SimpleNamespace(state=state, args=SimpleNamespace(candidates="r1-rpo1-lp4,r2-rpo1-lp4", timing_repeats=0),
                        last_step=lambda name: {}, save=lambda: None)
    study.phase_timing(s)
    assert state["timing"]["round_from"] == "r2-rpo1-lp4" and state["timing"]["online_round_s"] == 20.0
    assert state["timing"]["minialign_online_s"] is None  # the chosen one's wall was shared: not a timing
    state["candidates"]["r2-rpo1-lp4"]["shared_gpu"] = True
    study.phase_timing(s)
    assert state["timing"]["round_from"] is None and state["timing"]["online_round_s"] is None


def test_the_tables_say_which_candidate_walls_shared_the_gpu():
    results = load_benchmark("hh_results", RECIPES)
    cands = {"a": {"settings": {}, "wall_s": 90.0, "shared_gpu": True}, "b": {"settings": {}, "wall_s": 60.0}}
    doc = results.build_summary({"rows": plan.ROW_PLAN, "candidates": cands})
    rows = [x for x in results.markdown(doc).splitlines() if x.startswith(("| a ", "| b "))]
    assert rows[0].endswith("| 90.0 (GPU shared) |") and rows[1].endswith("| 60.0 |")


def test_the_judges_and_the_online_reward_models_train_side_by_side_only_with_jobs():
    phases = ["judges", "harmless-only", "online-rm", "online", "heldout"]
    assert study.phase_groups(phases, 1) == [(x,) for x in phases]
    assert study.phase_groups(phases, 4) == [("judges", "online-rm"), ("harmless-only",), ("online",), ("heldout",)]
    assert study.phase_groups(["online-rm", "online"], 4) == [("online-rm",), ("online",)]  # judges not asked


def test_jobs_below_one_are_refused():
    with pytest.raises(SystemExit):
        study.parse_args(["--data-root", "/d", "--jobs", "0"])
    assert study.parse_args(["--data-root", "/d", "--jobs", "4"]).jobs == 4 and sys.executable
