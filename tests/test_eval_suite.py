"""Evaluation on several axes (`minialign eval --suite`, `minialign run --eval-suite`) with REAL tiny judges: the
suite file and its errors, where relative paths resolve, every axis's numbers recomputed through its own judge,
the combined summary, --answers with a suite, row bookkeeping (online reward models) and the run's report."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_runs import run_cli
from test_eval_cmd import RM, check_judged, heldout_accuracy

from minialign.base.errors import UserError
from minialign.commands.evalsuite import load_suite
from minialign.evaluation.evasion import evades
from minialign.evaluation.geneval import SIDES
from tests.conftest import torch_threads

SMALL = ["--n", "2", "--samples", "1", "--max-new-tokens", "6", "--show", "1"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """One thread, as in test_eval_cmd: these models are tiny."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("suite")


@pytest.fixture(scope="module")
def judges(root) -> dict[str, Path]:
    """Two real reward models: "harm" on demo test rows 50: (disjoint from every prompt below), "help" on the demo
    train split (the policy's rows too, so its win rates are flagged OVERLAP)."""
    assert run_cli(*RM, "--train-split", "test", "--train-rows", "50:", "--eval-rows", "40:50",
                   "--out", root / "judge-harm") == 0
    assert run_cli(*RM, "--out", root / "judge-help") == 0
    return {"harm": root / "judge-harm", "help": root / "judge-help"}


def write_suite(path: Path, axes: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"axes": axes}))
    return path


@pytest.fixture(scope="module")
def suite(root, judges) -> Path:
    return write_suite(root / "suites" / "two.yaml", [
        {"name": "harmless", "dataset": "demo", "rows": "0:10", "n": 1, "judge": str(judges["harm"])},
        {"name": "helpful", "dataset": "demo", "rows": "10:20", "judge": str(judges["help"])}])


@pytest.fixture(scope="module")
def run_dir(root, suite) -> Path:
    """`minialign run` (SFT 2 steps, DPO 2 steps, eval on both axes, report): the policy of every test here."""
    preset = {"model": "tiny", "dataset": "demo", "data_dir": "", "stages": ["sft", "dpo", "eval", "report"],
              "eval_pairs": 8, "samples": 1, "max_new_tokens": 6, "eval_prompts": 3, "eval_samples": 1,
              "sft": {"full": True, "batch_size": 16, "max_steps": 2, "lr": 3e-3},
              "dpo": {"batch_size": 16, "max_steps": 2, "lr": 2e-3, "lora_r": 16, "lora_alpha": 32}}
    (root / "run.yaml").write_text(yaml.safe_dump(preset))
    assert run_cli("run", "--config", root / "run.yaml", "--eval-suite", suite, "--out", root / "run") == 0
    return root / "run"


def check_suite_results(results: dict, judges: dict[str, Path], modes: dict[str, int]) -> None:
    """Each axis recomputed through its own judge (check_judged), its evasion flags by the pattern rule, and the
    summary read off the axis's greedy numbers."""
    assert list(results["axes"]) == list(results["summary"]) == ["harmless", "helpful"]
    for name, judge in (("harmless", judges["harm"]), ("helpful", judges["help"])):
        one = results["axes"][name]
        check_judged(one, judge, modes)
        for mode in modes:
            for side in SIDES:
                answers = [a for r in one["prompts"] for a in r[side][mode]]
                assert [a["evades"] for a in answers] == [evades(a["text"]) for a in answers]
                assert one["modes"][mode][side]["evasion_share"] == sum(map(evades, (a["text"] for a in answers))) \
                    / len(answers)
        greedy, s = one["modes"]["greedy"], results["summary"][name]
        win = greedy["win_rate"]
        assert (s["win_rate"], s["low"], s["high"]) == (win["rate"], win["low"], win["high"])
        assert s["judge_accuracy"] == heldout_accuracy(judge) and s["n"] == one["n_prompts"]
        engaged = [(r["policy"]["greedy"][0], r["reference"]["greedy"][0]) for r in one["prompts"]
                   if not r["policy"]["greedy"][0]["evades"]]  # the prompts whose policy answer does not evade
        outcome = [1.0 if p["judge_score"] > q["judge_score"] else 0.5 if p["judge_score"] == q["judge_score"] else 0.0
                   for p, q in engaged]
        if engaged:
            assert s["win_engaged"]["n"] == len(engaged) and s["win_engaged"]["rate"] == pytest.approx(
                sum(outcome) / len(outcome))
        else:  # the demo policy learnt the demo's refusals: nothing engages
            assert s["win_engaged"] is None
        for side, numbers in (("policy", s), ("reference", s["reference"])):
            m = greedy[side]
            assert (numbers["evasion"], numbers["loops"], numbers["eos"], numbers["mean_tokens"]) == (
                m["evasion_share"], m["loop_share"], m["finished_share"], m["mean_tokens"])


def test_eval_on_two_axes_with_their_own_judges(run_dir, suite, judges, root, capsys):
    out = root / "eval-two"
    assert run_cli("eval", "--policy", run_dir / "dpo", "--suite", suite, *SMALL, "--out", out) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    check_suite_results(results, judges, {"greedy": 1, "sampled": 1})
    axes = results["axes"]
    assert axes["harmless"]["rows"] == [0] and axes["helpful"]["rows"] == [10, 11]  # the axis's n, else --n
    assert axes["helpful"]["judge"]["overlap_policy"] is True and axes["harmless"]["judge"]["overlap_policy"] is False
    assert results["suite"]["axes"][1]["judge"] == str(judges["help"]) and results["suite"]["file"] == str(suite)
    assert all(axes[a]["policy"] == results["policy"] for a in axes) and len(results["policy_trained"]) == 2
    md = (out / "eval.md").read_text()
    for text in ("## All axes", "## Axis: harmless", "## Axis: helpful", "evasion share", "| harmless | 1 |",
                 "OVERLAP", "[row 10]"):
        assert text in md, text
    for text in ("axis harmless:", "axis helpful:", "evasion share (declines/deflects)"):
        assert text in printed, text


def test_saved_suite_answers_are_scored_again_by_another_suites_judges(run_dir, suite, judges, root, capsys):
    first = root / "eval-two-rescore"
    assert run_cli("eval", "--policy", run_dir / "dpo", "--suite", suite, *SMALL, "--samples", 0, "--out", first) == 0
    saved = json.loads((first / "eval.json").read_text())
    swapped = write_suite(root / "suites" / "swapped.yaml", [  # same rows, the judges swapped
        {"name": "harmless", "dataset": "demo", "rows": "0:10", "judge": str(judges["help"])},
        {"name": "helpful", "dataset": "demo", "rows": "10:20", "judge": str(judges["harm"])}])
    assert run_cli("eval", "--answers", first, "--suite", swapped) == 0
    again = json.loads((first / "judged-swapped" / "eval.json").read_text())
    check_suite_results(again, {"harm": judges["help"], "help": judges["harm"]}, {"greedy": 1})
    texts = lambda r, name: [[a["text"] for a in p[s]["greedy"]] for p in r["axes"][name]["prompts"] for s in SIDES]
    for name in ("harmless", "helpful"):
        assert texts(again, name) == texts(saved, name)  # the same answers, not new ones
    assert "error" not in capsys.readouterr().err
    err = _error(capsys, "eval", "--answers", first, "--judge", judges["harm"])
    assert "give --suite FILE" in err
    moved = write_suite(root / "suites" / "moved.yaml", [
        {"name": "harmless", "dataset": "demo", "rows": "0:5"}, {"name": "helpful", "dataset": "demo", "rows": "10:20"}])
    err = _error(capsys, "eval", "--answers", first, "--suite", moved)
    assert "axis 'harmless'" in err and "same dataset and rows" in err
    only_one = write_suite(root / "suites" / "one.yaml", [{"name": "harmless", "dataset": "demo", "rows": "0:10"}])
    assert "no axis named 'helpful'" in _error(capsys, "eval", "--answers", first, "--suite", only_one)


def test_run_with_an_eval_suite_reports_every_axis(run_dir, judges, root, capsys):
    results = json.loads((run_dir / "results.json").read_text())
    check_suite_results(results["generation"], judges, {"greedy": 1, "sampled": 1})
    assert results["generation"]["axes"]["helpful"]["rows"] == [10, 11, 12]  # eval_prompts: axes without n
    md = (run_dir / "report.md").read_text()
    section = md[md.index("## Generation"):]
    for text in ("Axis: harmless", "Axis: helpful", "| helpful | 3 |", "evasion share", "Win rate by the judge"):
        assert text in section, text
    # a run folder's suite answers re-score like an eval's
    assert run_cli("eval", "--answers", run_dir, "--suite", root / "suites" / "two.yaml", "--out", root / "rs") == 0
    assert json.loads((root / "rs" / "eval.json").read_text())["summary"] == results["generation"]["summary"]
    err = _error(capsys, "run", "--config", root / "run.yaml", "--eval-suite", root / "suites" / "two.yaml",
                 "--judge", judges["harm"], "--out", root / "run-both")
    assert "drop judge" in err and not (root / "run-both" / "run.yaml").exists()
    bad = write_suite(root / "suites" / "train-rows.yaml", [{"name": "x", "dataset": "demo", "split": "train",
                                                             "rows": "0:5"}])
    err = _error(capsys, "run", "--config", root / "run.yaml", "--eval-suite", bad, "--out", root / "run-bad")
    assert "axis 'x'" in err and "trained on" in err and not (root / "run-bad" / "run.yaml").exists()


def test_online_reward_models_rows_are_recorded_and_refused(run_dir, judges, root, capsys):
    """A policy whose config.yaml names reward_models (as `minialign online` will): their rows join the policy's."""
    policy = root / "online-policy"
    shutil.copytree(run_dir / "dpo", policy)
    config = yaml.safe_load((policy / "config.yaml").read_text())
    (policy / "config.yaml").write_text(yaml.safe_dump({**config, "reward_models": str(judges["harm"])}))
    out = root / "eval-online"
    assert run_cli("eval", "--policy", policy, "--dataset", "demo", "--rows", "0:10", *SMALL, "--out", out) == 0
    trained = json.loads((out / "eval.json").read_text())["policy_trained"]
    assert trained[-1]["what"].startswith(f"reward model {judges['harm']}")
    assert (trained[-1]["split"], trained[-1]["rows"]) == ("test", "50:")
    err = _error(capsys, "eval", "--policy", policy, "--dataset", "demo", "--rows", "50:60", *SMALL)
    assert f"reward model {judges['harm']}" in err and "rows 50, 51" in err
    suite = write_suite(root / "suites" / "late.yaml", [{"name": "late", "dataset": "demo", "rows": "45:60"}])
    err = _error(capsys, "eval", "--policy", policy, "--suite", suite, *SMALL, "--n", 10)
    assert "axis 'late'" in err and "reward model" in err
    (policy / "config.yaml").write_text(yaml.safe_dump({**config, "reward_models": str(root / "gone")}))
    err = _error(capsys, "eval", "--policy", policy, "--dataset", "demo", "--rows", "0:10", *SMALL)
    assert "reward_models" in err and str(root / "gone") in err


def _error(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    return capsys.readouterr().err


def test_relative_paths_resolve_from_the_current_directory_else_the_suite_folder(tmp_path, monkeypatch):
    folder, cwd = tmp_path / "suites", tmp_path / "work"
    (folder / "judge-near").mkdir(parents=True)
    (folder / "pairs.jsonl").write_text("{}\n")
    (cwd / "judge-here").mkdir(parents=True)
    (folder / "judge-here").mkdir()
    monkeypatch.chdir(cwd)
    file = write_suite(folder / "s.yaml", [
        {"name": "a", "dataset": "pairs.jsonl", "rows": "0:1", "judge": "judge-near"},
        {"name": "b", "dataset": "demo", "rows": "0:1", "judge": "judge-here", "n": 1, "split": "train"}])
    a, b = load_suite(str(file))
    assert a.judge == str(folder.resolve() / "judge-near") and a.dataset == str(folder.resolve() / "pairs.jsonl")
    assert b.judge == "judge-here" and b.dataset == "demo"  # found from the current directory: kept as given
    assert (a.n, b.n, a.split, b.split) == (0, 1, "test", "train")


@pytest.mark.parametrize("text,expected", [
    ("axes: []\n", "non-empty list"),
    ("axes:\n  - {name: a, rows: '0:1'}\n", "axis 1 ('a'): field 'dataset' is missing"),
    ("axes:\n  - {name: a, dataset: demo, rows: '0:1', judges: x}\n", "axis 1 ('a'): unknown field(s) 'judges'"),
    ("axes:\n  - {name: a, dataset: demo, rows: 'first'}\n", "axis 1 ('a'): field 'rows'"),
    ("axes:\n  - {name: a, dataset: demo, rows: 10:50}\n", "in quotes"),
    ("axes:\n  - {name: a, dataset: demo, rows: '0:1', n: 0}\n", "field 'n'"),
    ("axes:\n  - {name: a, dataset: demo, rows: '0:1', judge: no-such-judge}\n", "field 'judge': no folder"),
    ("axes:\n  - {name: a, dataset: demo, rows: '0:1'}\n  - {name: a, dataset: demo, rows: '1:2'}\n",
     "'a' used more than once"),
    ("axes:\n  - {name: a, dataset: demo, rows: '0:1'}\nextra: 1\n", "unknown top-level key(s) 'extra'"),
    ("judge: x\n", "'axes' list"),
    ("axes: [\n", "not valid YAML"),
])
def test_bad_suite_files_name_the_file_axis_and_field(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(UserError) as info:
        load_suite(str(file))
    assert expected in str(info.value) and str(file) in str(info.value), str(info.value)


def test_suite_flag_errors_exit_2(tmp_path, capsys):
    file = write_suite(tmp_path / "s.yaml", [{"name": "a", "dataset": "demo", "rows": "0:1"}])
    assert "no such file" in _error(capsys, "eval", "--policy", "tiny", "--suite", tmp_path / "nope.yaml")
    assert "drop --judge" in _error(capsys, "eval", "--policy", "tiny", "--suite", file, "--judge", tmp_path)
    assert "drop --dataset" in _error(capsys, "eval", "--policy", "tiny", "--suite", file, "--rows", "0:3")
    (tmp_path / "e.yaml").write_text("axes:\n  - {name: a, rows: '0:1'}\n")
    err = _error(capsys, "eval", "--policy", "tiny", "--suite", tmp_path / "e.yaml")
    assert str(tmp_path / "e.yaml") in err and "'dataset' is missing" in err


def test_the_engaged_win_rate_leaves_out_the_prompts_whose_policy_answer_evades():
    from minialign.commands.evalsuite import engaged_win
    from minialign.evaluation.textmetrics import win_rate
    from minialign.reporting.suite import summary_table

    def prompt(policy, reference, evading=False):
        return {"policy": {"greedy": [{"judge_score": policy, "evades": evading}]},
                "reference": {"greedy": [{"judge_score": reference, "evades": False}]}}

    one = {"prompts": [prompt(2.0, 1.0), prompt(1.0, 1.0), prompt(0.0, 1.0), prompt(5.0, 1.0, evading=True)]}
    got = engaged_win(one)
    assert got["n"] == 3 and got["rate"] == pytest.approx(1.5 / 3)  # a win, a tie (1/2), a loss; the decline left out
    assert got["low"] <= got["rate"] <= got["high"]
    assert engaged_win({"prompts": [prompt(5.0, 1.0, evading=True)]}) is None  # every answer declines
    scores = [(float(i % 7), float(i % 5)) for i in range(40)]  # nothing evades: the headline, CI and all
    plain = {"prompts": [prompt(p, q) for p, q in scores], "decoding": {"seed": 7}}
    headline = win_rate([p for p, _ in scores], [q for _, q in scores], seed=7)
    assert engaged_win(plain) == {"rate": headline.rate, "low": headline.low, "high": headline.high, "n": 40}
    unjudged = {"prompts": [{"policy": {"greedy": [{"evades": False}]}, "reference": {"greedy": [{"evades": False}]}}]}
    assert engaged_win(unjudged) is None
    summary = {"n": 4, "win_rate": 0.625, "low": 0.3, "high": 0.9, "win_engaged": got, "judge_accuracy": 0.6,
               "judge_rows": "0:10", "evasion": 0.25, "loops": 0.0, "eos": 1.0, "mean_tokens": 9.0,
               "reference": {"evasion": 0.0, "loops": 0.0, "eos": 1.0, "mean_tokens": 9.0}}
    (row,) = summary_table({"summary": {"harmless": summary}}).rows
    assert row[3] == f"0.500 [{got['low']:.3f}, {got['high']:.3f}] (3)"
    (old,) = summary_table({"summary": {"harmless": {**summary, "win_engaged": None}}}).rows
    assert old[3] == "-"  # no judge, or results written before the column
