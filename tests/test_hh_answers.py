"""benchmarks/recipes/hh_answers.py: what a study's reward models and judges rewarded, from kept answers."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BENCHMARKS, load_benchmark

answers = load_benchmark("hh_answers", BENCHMARKS / "recipes")


def _sample(row, score, n_tokens, stop="eos", loops=False, evades=False, axis=0, text=None):
    scores = [None, None]
    scores[axis] = score
    return {"row": row, "text": text or f"answer {row} {score}", "n_tokens": n_tokens, "stop": stop, "loops": loops,
            "evades": evades, "scores": scores, "combined": score}


def _pair(chosen: dict, rejected: dict) -> dict:
    return {"row": chosen["row"], "chosen": chosen["text"], "rejected": rejected["text"]}


def test_sample_stats_split_ended_from_cut_answers_and_describe_the_pairs_the_round_trained_on():
    a, b, c = (_sample(1, 5.0, 80, axis=1), _sample(1, 1.0, 128, "length", loops=True, axis=1),
               _sample(1, 3.0, 10, axis=1))  # prompt 1 (helpful): the ended long answer wins, the cut looping one loses
    d, e = _sample(2, -1.0, 128, "length", axis=1), _sample(2, 4.0, 30, evades=True, axis=1)  # a cut one, an evading
    f, g = _sample(3, 2.0, 50, axis=1, text="same"), _sample(3, 2.0, 50, axis=1, text="same")  # one text: no pair
    h = _sample(4, 2.0, 50, axis=0)  # harmless, one answer
    got = answers.sample_stats([a, b, c, d, e, f, g, h], [_pair(a, b), _pair(e, d)])
    x = got["helpful"]
    assert x["answers"] == 7 and x["pairs"] == 2  # the pairs of pairs.jsonl, not every prompt with two answers
    assert x["ended_mean"] == pytest.approx((5.0 + 3.0 + 4.0 + 2.0 + 2.0) / 5, abs=1e-3)
    assert x["cut_mean"] == -1.0  # the looping cut answer is left out of both means
    assert x["cut_share"] == pytest.approx(2 / 7, abs=1e-3)  # rounded to 3 places
    assert x["ended_by_length"] == {"0-20": {"n": 1, "mean": 3.0}, "20-40": {"n": 1, "mean": 4.0},
                                    "40-70": {"n": 2, "mean": 2.0}, "70-100": {"n": 1, "mean": 5.0}}
    assert x["chosen"] == {"tokens": 55.0, "cut": 0.0, "loops": 0.0, "evades": 0.5}
    assert x["rejected"] == {"tokens": 128.0, "cut": 1.0, "loops": 0.5, "evades": 0.0}
    assert got["harmless"]["pairs"] == 0 and got["harmless"]["chosen"]["tokens"] is None


def _answer(score, n_tokens=40, stop="eos", loops=False, evades=False):
    return {"greedy": [{"judge_score": score, "n_tokens": n_tokens, "stop": stop, "loops": loops, "evades": evades}]}


def test_eval_stats_split_the_win_rate_by_what_each_side_did():
    prompts = [{"policy": _answer(2.0), "reference": _answer(1.0, 128, "length", loops=True)},  # win, ref loops
               {"policy": _answer(0.5, evades=True), "reference": _answer(3.0)},  # loss, evades, ref clean
               {"policy": _answer(4.0, 90), "reference": _answer(3.5, 128, "length")},  # win, ref clean but cut
               {"policy": _answer(3.0), "reference": _answer(3.0)}]  # a tie: 1/2, as minialign eval counts it
    got = answers.eval_stats({"axes": {"helpful": {"prompts": prompts}}})["helpful"]
    assert got["n"] == 4 and got["win"] == pytest.approx(2.5 / 4, abs=1e-3)
    assert got["win_reference_loops"] == 1.0 and got["win_reference_clean"] == pytest.approx(1.5 / 3, abs=1e-3)
    assert got["win_policy_evades"] == 0.0 and got["win_policy_engages"] == pytest.approx(2.5 / 3, abs=1e-3)
    assert got["reference"]["ended_mean"] == 3.0 and got["reference"]["cut_mean"] == 3.5
    assert got["reference"]["loops_mean"] == 1.0 and got["policy"]["cut_mean"] is None


def test_the_command_reads_run_folders_and_refuses_one_without_rounds(tmp_path, capsys):
    run = tmp_path / "online"
    (run / "round-1").mkdir(parents=True)
    a, b = _sample(1, 2.0, 10, axis=1), _sample(1, 0.0, 20, axis=1)
    (run / "round-1" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in (a, b)))
    (run / "round-1" / "pairs.jsonl").write_text(json.dumps(_pair(a, b)) + "\n")
    out = tmp_path / "a.json"
    assert answers.main(["--online", str(run), "--source", "call 7", "--json-out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["online"][str(run)]["round-1"]["helpful"]["pairs"] == 1 and got["source"] == "call 7"
    assert got["command"] == f"python benchmarks/recipes/hh_answers.py --online {run} --source 'call 7' --json-out {out}"
    with pytest.raises(SystemExit):
        answers.main(["--online", str(tmp_path)])
    assert "no round-*/ with samples.jsonl and pairs.jsonl" in capsys.readouterr().err
