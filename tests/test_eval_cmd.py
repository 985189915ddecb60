"""`minialign eval` end to end on a tiny demo DPO run, with a test judge; every bad input; the report section.

The judge here is a test double of the reward-model interface (``minialign.reward.load_judge`` returning an
object with ``tokenizer``, ``info`` and ``score``): it scores an answer by its number of distinct words, a
deterministic rule the test can recompute. It stands in for a `minialign rm` run, which another module builds.
"""

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from minialign import cli
from minialign.geneval import NO_GENERATION
from minialign.models import load_tokenizer
from minialign.textmetrics import loops, win_rate

SMALL = ["--n", "4", "--samples", "2", "--max-new-tokens", "8", "--show", "2"]


def distinct_words(text: str) -> float:
    return float(len(set(text.split())))


class DistinctWordsJudge:
    """Test double of minialign.reward's judge: same attributes and ``score`` signature."""

    def __init__(self, run_dir: Path, tokenizer, info: dict):
        self.tokenizer = tokenizer
        self.info = {"run_dir": str(run_dir), "model": "tiny", "eval_data": "", "eval_rows": "", "chat_template": False,
                     "n_train": 50, **info}
        self.calls = []

    def score(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> torch.Tensor:
        assert len(prompts) == len(responses)
        self.calls.append(list(prompts))
        return torch.tensor([distinct_words(r) for r in responses], dtype=torch.float32)


def make_judge_dir(root: Path, name: str, info: dict, tokenizer=None, split: str = "train") -> Path:
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "kind").write_text("rm")
    (run_dir / "config.yaml").write_text(f"train_split: {split}\ndata_dir: ''\n")
    (run_dir / "judge.json").write_text(json.dumps(info))
    return run_dir


@pytest.fixture
def judges(monkeypatch):
    """Installs ``minialign.reward`` with a ``load_judge`` that builds the test judge from judge.json."""
    built = {}
    tokenizers = {"demo": load_tokenizer("demo")}

    def load_judge(path, device=None, cache=None):
        info = json.loads((Path(path) / "judge.json").read_text())
        tok = tokenizers["demo"]
        if info.pop("other_tokenizer", False):
            tok = copy.deepcopy(tok)
            tok.add_tokens(["<judge-only-token>"])
        built[str(path)] = DistinctWordsJudge(Path(path), tok, info)
        return built[str(path)]

    module = types.ModuleType("minialign.reward")
    module.load_judge = load_judge
    monkeypatch.setitem(sys.modules, "minialign.reward", module)
    return built


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "dpo"
    assert cli.main(["dpo", "--demo", "--out", str(out), "--max-steps", "2", "--epochs", "1", "--eval-limit", "8"]) == 0
    return out


def test_eval_end_to_end_with_a_judge(dpo_run, tmp_path, judges, capsys):
    judge_dir = make_judge_dir(tmp_path, "rm", {"dataset": "demo", "train_rows": "0:200", "heldout_accuracy": 0.71})
    out = tmp_path / "eval"
    assert cli.main(["eval", "--policy", str(dpo_run), *SMALL, "--judge", str(judge_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("greedy reference", "sampled policy", "loop share", "distinct-2", "EOS/stop share",
                 "mean length", "mean judge score", "policy win rate", "0.71", "OVERLAP"):
        assert text in printed, text
    results = json.loads((out / "eval.json").read_text())
    # default prompts: the run's held-out rows (demo test split), the first N in row order
    assert results["rows"] == [0, 1, 2, 3] and results["n_prompts"] == 4
    assert results["prompt_source"].startswith("demo (test)")
    assert set(results["modes"]) == {"greedy", "sampled"}
    assert "adapters off" in results["reference"]
    for mode, per_prompt in (("greedy", 1), ("sampled", 2)):
        entry = results["modes"][mode]
        answers = {side: [a for p in results["prompts"] for a in p[side][mode]] for side in ("reference", "policy")}
        for side in ("reference", "policy"):
            got = entry[side]
            assert got["n_answers"] == 4 * per_prompt
            assert got["loop_share"] == sum(loops(a["text"]) for a in answers[side]) / (4 * per_prompt)
            assert got["finished_share"] == sum(a["finished"] for a in answers[side]) / (4 * per_prompt)
            assert all(1 <= a["n_tokens"] <= 8 for a in answers[side] if a["text"])
            for a in answers[side]:
                assert a["judge_score"] == distinct_words(a["text"])
            assert got["judge_score"] == pytest.approx(sum(a["judge_score"] for a in answers[side]) / len(answers[side]))
        # the win rate recomputed from the stored per-answer scores
        pol = [[a["judge_score"] for a in p["policy"][mode]] for p in results["prompts"]]
        ref = [[a["judge_score"] for a in p["reference"][mode]] for p in results["prompts"]]
        assert entry["win_rate"]["rate"] == pytest.approx(win_rate(pol, ref).rate)
        judge = entry["win_rate"]["judge"]
        assert judge["heldout_accuracy"] == 0.71 and judge["overlap_policy"] is True  # both trained on demo train
        assert judge["overlap_prompts"] is False and "demo (train) rows 0:200" in judge["judge_rows"]
    md = (out / "eval.md").read_text()
    for text in ("| metric |", "policy win rate", "PROMPT", "REFERENCE", "POLICY", "[row 0]", "OVERLAP"):
        assert text in md, text


def test_sampling_is_seeded_and_greedy_matches_plain_generate(dpo_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert cli.main(["eval", "--policy", str(dpo_run), *SMALL, "--out", str(out)]) == 0
    ra, rb = (json.loads((o / "eval.json").read_text()) for o in (a, b))
    assert ra["prompts"] == rb["prompts"]
    from minialign.evalcmd import load_side
    from minialign.generate import generate

    tok = load_tokenizer(str(dpo_run / "final" / "tokenizer"))
    policy = load_side(str(dpo_run), "", "--policy", tok).model
    texts = generate(policy, tok, [p["prompt"] for p in ra["prompts"]], max_new_tokens=8, batch_size=1)
    assert texts == [p["policy"]["greedy"][0]["text"] for p in ra["prompts"]]


def test_judge_disjoint_from_policy_rows_is_not_flagged(dpo_run, tmp_path, judges):
    judge_dir = make_judge_dir(tmp_path, "rm", {"dataset": "demo", "train_rows": "50:", "heldout_accuracy": 0.6},
                               split="test")
    out = tmp_path / "eval"
    assert cli.main(["eval", "--policy", str(dpo_run), *SMALL, "--samples", "0", "--judge", str(judge_dir),
                     "--out", str(out)]) == 0
    judge = json.loads((out / "eval.json").read_text())["modes"]["greedy"]["win_rate"]["judge"]
    assert judge["overlap_policy"] is False and judge["overlap_prompts"] is False
    assert "none" in (out / "eval.md").read_text()


def _error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2(dpo_run, tmp_path, judges, capsys):
    policy = ["eval", "--policy", str(dpo_run), *SMALL]
    err = _error(capsys, [*policy, "--n", "1000"])
    assert "100 usable prompts" in err and "--n" in err
    err = _error(capsys, [*policy, "--dataset", "demo", "--split", "train", "--rows", "0:10"])
    assert "trained on" in err and "rows 0, 1" in err
    other = make_judge_dir(tmp_path, "other", {"dataset": "demo", "train_rows": "", "heldout_accuracy": 0.7,
                                               "other_tokenizer": True})
    assert "different tokenizer" in _error(capsys, [*policy, "--judge", str(other)])
    rm = make_judge_dir(tmp_path, "rm", {"dataset": "demo", "train_rows": "", "heldout_accuracy": 0.7})
    assert "reward-model run" in _error(capsys, ["eval", "--policy", str(rm), *SMALL])
    assert "reward-model run" in _error(capsys, [*policy, "--reference", str(rm)])
    assert "not a reward-model run" in _error(capsys, [*policy, "--judge", str(dpo_run)])
    assert "--reference" in _error(capsys, ["eval", "--policy", "tiny", "--dataset", "demo", *SMALL])
    assert "--policy is required" in _error(capsys, ["eval", *SMALL])


def test_run_stage_and_report_section(dpo_run, tmp_path):
    """`minialign run`'s eval stage calls the same comparison; report.py renders it as "Generation"."""
    from minialign import experiment, lora
    from minialign.config import DPOConfig, RunConfig
    from minialign.recipes import dpo_start_model, load_run_config
    from minialign.report import write_report

    cfg = RunConfig(model="tiny", dataset="demo", data_dir="", out=str(tmp_path / "run"), eval_prompts=3,
                    eval_samples=2, max_new_tokens=6, device="cpu")
    ctx = experiment.Context(cfg)
    dpo_cfg = load_run_config(dpo_run, DPOConfig)
    policy = lora.load_adapter(dpo_start_model(dpo_cfg, ctx.tokenizer), dpo_run / "final" / "adapter")
    generation = experiment.generation_eval(ctx, dpo_cfg, policy, None)
    assert generation["rows"] == [0, 1, 2] and set(generation["modes"]) == {"greedy", "sampled"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"generation": generation}))
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "## Generation" in md and "| loop share (4-gram x3) |" in md and "[row 0]" in md
    (run_dir / "results.json").write_text(json.dumps({}))
    write_report(run_dir)
    assert NO_GENERATION in (run_dir / "report.md").read_text()
