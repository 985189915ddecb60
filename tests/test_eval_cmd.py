"""`minialign eval` and `minialign run`'s generation metrics with REAL judges (tiny `minialign rm` runs): every
number of eval.json recomputed (judge scores through the judge itself, means, win rate and CI, loop flags), the
judge's chat template applied in one place, every bad input, and the report's Generation section."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_runs import run_cli

from minialign.data import PreferencePair
from minialign.data.chat import to_chat_format
from minialign.evaluation.geneval import SIDES
from minialign.evaluation.judge import load_judge
from minialign.evaluation.textmetrics import distinct_n, loops, win_rate
from minialign.modeling.models import load_tokenizer
from minialign.reporting.generation import NO_GENERATION
from minialign.reporting.render import fmt
from tests.conftest import torch_threads

SMALL = ["--n", "4", "--samples", "2", "--max-new-tokens", "8", "--show", "2"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
RM = ["rm", "--demo", "--max-steps", "3", "--eval-limit", "16"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """One thread (overrides conftest's two, for the module fixtures too): these models are tiny, and on a shared
    2-core machine a second thread mostly waits for the first."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def judge_dir(root) -> Path:
    """A real reward model: tiny, full fine-tuning, 3 steps on the demo train split (the policy's rows too)."""
    assert run_cli(*RM, "--out", root / "rm") == 0
    return root / "rm"


@pytest.fixture(scope="module")
def chat_tok(root) -> Path:
    """The demo tokenizer with a ChatML template: the same vocabulary, so the policy and the judges accept it."""
    tok = load_tokenizer("demo")
    tok.chat_template = CHATML
    tok.save_pretrained(root / "chat-tok")
    return root / "chat-tok"


@pytest.fixture(scope="module")
def run_dir(root, judge_dir) -> Path:
    """`minialign run` (SFT 2 steps, DPO 2 steps, eval, report) with the judge: the policy of every eval test."""
    preset = {"model": "tiny", "dataset": "demo", "data_dir": "", "stages": ["sft", "dpo", "eval", "report"],
              "eval_pairs": 8, "samples": 1, "max_new_tokens": 8, "eval_prompts": 4, "eval_samples": 2,
              "sft": {"full": True, "batch_size": 16, "max_steps": 2, "lr": 3e-3},
              "dpo": {"batch_size": 16, "max_steps": 2, "lr": 2e-3, "lora_r": 16, "lora_alpha": 32}}
    (root / "run.yaml").write_text(yaml.safe_dump(preset))
    assert run_cli("run", "--config", root / "run.yaml", "--judge", judge_dir, "--out", root / "run") == 0
    return root / "run"


def heldout_accuracy(judge: Path) -> float:
    return json.loads((judge / "summary.json").read_text())["eval"]["eval/accuracy"]


def check_judged(results: dict, judge: Path, per_prompt: dict[str, int]) -> None:
    """Every judged number of an eval.json (or a run's "generation") recomputed from its answers and the judge."""
    scorer = load_judge(judge)
    records = results["prompts"]
    assert set(results["modes"]) == set(per_prompt)
    for mode, s in per_prompt.items():
        entry = results["modes"][mode]
        scores = {}
        for side in SIDES:
            answers = [a for r in records for a in r[side][mode]]
            assert all(len(r[side][mode]) == s for r in records)
            # each score is the judge's on (the dataset's prompt, the answer): recomputed one answer at a time
            raw = [r.get("raw_prompt", r["prompt"]) for r in records for _ in range(s)]
            direct = torch.cat([scorer.score([p], [a["text"]]) for p, a in zip(raw, answers)])
            assert [a["judge_score"] for a in answers] == pytest.approx(direct.tolist(), abs=1e-5)
            assert entry[side]["judge_score"] == pytest.approx(direct.double().mean().item(), abs=1e-6)
            assert entry[side]["n_answers"] == len(answers) == len(records) * s
            assert [a["loops"] for a in answers] == [loops(a["text"]) for a in answers]
            assert entry[side]["loop_share"] == sum(a["loops"] for a in answers) / len(answers)
            assert entry[side]["finished_share"] == sum(a["finished"] for a in answers) / len(answers)
            assert entry[side]["distinct_2"] == distinct_n([a["text"] for a in answers], 2)
            scores[side] = [[a["judge_score"] for a in r[side][mode]] for r in records]
        # win rate by hand: per prompt the mean over paired samples of 1 / 1/2 / 0, then the mean over prompts
        outcome = [[1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(ps, rs)]
                   for ps, rs in zip(scores["policy"], scores["reference"])]
        w = entry["win_rate"]
        assert w["rate"] == pytest.approx(sum(sum(o) / len(o) for o in outcome) / len(outcome), abs=1e-12)
        flat = [x for o in outcome for x in o]
        assert (w["wins"], w["ties"], w["losses"]) == (flat.count(1.0), flat.count(0.5), flat.count(0.0))
        again = win_rate(scores["policy"], scores["reference"], seed=results["decoding"]["seed"])
        assert (w["low"], w["high"]) == pytest.approx((again.low, again.high), abs=1e-12)
        assert 0 <= w["low"] <= w["rate"] <= w["high"] <= 1 and w["n_prompts"] == len(records)
        assert w["judge"]["heldout_accuracy"] == heldout_accuracy(judge)
        assert w["judge"]["run_dir"] == str(judge) and w["judge"]["model"] == "tiny"


def test_eval_end_to_end_with_a_real_judge(run_dir, judge_dir, root, capsys):
    out = root / "eval-judged"
    assert run_cli("eval", "--policy", run_dir / "dpo", *SMALL, "--judge", judge_dir, "--out", out) == 0
    printed = capsys.readouterr().out
    accuracy = fmt(heldout_accuracy(judge_dir))
    for text in ("greedy reference", "sampled policy", "loop share", "distinct-2", "EOS/stop share",
                 "mean length", "mean judge score", "policy win rate", accuracy, "OVERLAP"):
        assert text in printed, text
    results = json.loads((out / "eval.json").read_text())
    # default prompts: the run's held-out rows (demo test split), the first N in row order
    assert results["rows"] == [0, 1, 2, 3] and results["n_prompts"] == 4
    assert set(results["generation_s"]) == set(results["modes"]) and all(v > 0 for v in results["generation_s"].values())
    assert results["prompt_source"].startswith("demo (test)") and "adapters off" in results["reference"]
    assert all(1 <= a["n_tokens"] <= 8 for r in results["prompts"] for side in SIDES
               for mode in ("greedy", "sampled") for a in r[side][mode] if a["text"])
    check_judged(results, judge_dir, {"greedy": 1, "sampled": 2})
    judge = results["modes"]["greedy"]["win_rate"]["judge"]
    # judge, SFT and DPO all trained on the demo train split; the prompts are test rows
    assert judge["overlap_policy"] is True and judge["overlap_prompts"] is False
    assert judge["judge_rows"] == "demo (train) all rows"
    assert judge["policy_rows"].count("demo (train)") == 2  # the DPO run's rows and its SFT run's
    md = (out / "eval.md").read_text()
    greedy = results["modes"]["greedy"]["win_rate"]
    for text in ("| metric |", f"{greedy['rate']:.3f} [{greedy['low']:.3f}, {greedy['high']:.3f}]", accuracy,
                 "PROMPT", "REFERENCE", "POLICY", "[row 0]", "OVERLAP"):
        assert text in md, text
    # --show 2: two prompts side by side in eval.md, none on the terminal (its help says so; it claimed both)
    assert "[row 1]" in md and "[row 2]" not in md and "PROMPT" not in printed


def test_a_run_folder_policy_with_a_judge_on_other_rows_is_not_flagged(run_dir, root, chat_tok):
    """Also: the policy reads chat-formatted prompts, the judge (no chat template) the dataset's HH text."""
    other = root / "rm-test-rows"  # trained on demo test rows 50:, the prompts are test rows 0-3
    assert run_cli(*RM, "--train-split", "test", "--train-rows", "50:", "--eval-rows", "40:50", "--out", other) == 0
    out = root / "eval-disjoint"
    assert run_cli("eval", "--policy", run_dir, *SMALL, "--samples", "0", "--judge", other, "--out", out,
                   "--tokenizer", chat_tok, "--chat-template", "on") == 0
    results = json.loads((out / "eval.json").read_text())
    assert "dpo run" in results["policy"] and set(results["modes"]) == {"greedy"} and results["chat_template"]
    assert all(r["prompt"].startswith("<|im_start|>") and r["raw_prompt"].startswith("\n\nHuman:")
               for r in results["prompts"])
    check_judged(results, other, {"greedy": 1})
    judge = results["modes"]["greedy"]["win_rate"]["judge"]
    assert judge["overlap_policy"] is False and judge["overlap_prompts"] is False
    assert judge["judge_rows"] == "demo (test) rows 50:"
    assert "| none |" in (out / "eval.md").read_text()


def test_a_chat_template_judge_scores_eval_answers_as_judge_score_does(run_dir, root, chat_tok, capsys):
    """A judge trained with --chat-template (tiny-llama, LoRA, ChatML). Eval hands it the dataset's HH prompt and
    Judge.score alone formats it: each stored score is the judge's on the chat-formatted text, whether the policy
    read bare HH prompts or (--chat-template on) chat-formatted ones, which must not be formatted twice."""
    tok = load_tokenizer(str(chat_tok))
    judge_dir = root / "rm-chat"
    assert run_cli(*RM, "--model", "tiny-llama", "--no-full", "--tokenizer", chat_tok, "--chat-template",
                   "--max-length", 96, "--max-prompt-length", 64, "--out", judge_dir) == 0
    assert (judge_dir / "final" / "adapter").is_dir()
    judge = load_judge(judge_dir)
    assert judge.info["chat_template"]

    def ids(prompt: str, response: str) -> torch.Tensor:
        return torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]
                             + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])

    for policy_chat in ("off", "on"):
        out = root / f"eval-chat-{policy_chat}"
        assert run_cli("eval", "--policy", run_dir / "dpo", "--tokenizer", chat_tok, "--chat-template",
                       policy_chat, "--n", 3, "--samples", 0, "--max-new-tokens", 8, "--judge", judge_dir,
                       "--out", out) == 0
        results = json.loads((out / "eval.json").read_text())
        assert results["chat_template"] is (policy_chat == "on")
        for record in results["prompts"]:
            answer = record["policy"]["greedy"][0]
            raw = record.get("raw_prompt", record["prompt"])
            assert raw.startswith("\n\nHuman:") and record["prompt"].startswith(
                "<|im_start|>user\n" if policy_chat == "on" else "\n\nHuman:")
            formatted = to_chat_format([PreferencePair(raw, answer["text"], answer["text"])], tok)[0]
            assert formatted.prompt.startswith("<|im_start|>user\n") and formatted.prompt.endswith("assistant\n")
            if policy_chat == "on":
                assert formatted.prompt == record["prompt"]  # the policy read what the judge reads
            direct = judge.score([formatted.prompt], [formatted.chosen])  # already formatted: taken as it is
            assert answer["judge_score"] == pytest.approx(direct.item(), abs=1e-5)
            # the judge's model itself on prompt ids + response ids + EOS of the chat text, not of the HH text
            with torch.no_grad():
                chat = judge.model(input_ids=ids(formatted.prompt, formatted.chosen)).logits[0, 0].item()
                plain = judge.model(input_ids=ids(raw, answer["text"])).logits[0, 0].item()
            assert answer["judge_score"] == pytest.approx(chat, abs=1e-5)
            assert abs(plain - chat) > 1e-4  # the template changes what the judge reads
    assert "mean judge score" in capsys.readouterr().out


def test_sampling_is_seeded_and_greedy_matches_plain_generate(run_dir, root):
    a, b = root / "seed-a", root / "seed-b"
    for out in (a, b):
        assert run_cli("eval", "--policy", run_dir / "dpo", *SMALL, "--out", out) == 0
    ra, rb = (json.loads((o / "eval.json").read_text()) for o in (a, b))
    assert ra["prompts"] == rb["prompts"] and ra["modes"]["greedy"]["policy"].get("judge_score") is None
    from minialign.commands.evalsides import load_side
    from minialign.modeling.generate import generate

    tok = load_tokenizer(str(run_dir / "dpo" / "final" / "tokenizer"))
    policy = load_side(str(run_dir / "dpo"), "", "--policy", tok).model
    texts = generate(policy, tok, [p["prompt"] for p in ra["prompts"]], max_new_tokens=8, batch_size=1)
    assert texts == [p["policy"]["greedy"][0]["text"] for p in ra["prompts"]]


def test_fewer_prompts_than_asked_are_used_and_said_as_run_does(run_dir, root, capsys):
    """--n is a cap, as --eval-prompts is for `minialign run` (the issue: run quietly used fewer while eval refused):
    both go through load_prompts, which takes what the rows hold and says so, naming the setting."""
    from minialign.evaluation.evalrows import RowSet, load_prompts

    out = root / "eval-few"
    assert run_cli("eval", "--policy", run_dir / "dpo", *SMALL, "--rows", "98:", "--out", out) == 0
    err = capsys.readouterr().err
    assert "demo (test) rows 98: holds 2 usable prompts, fewer than --n 4; evaluating on those 2." in err
    assert json.loads((out / "eval.json").read_text())["rows"] == [98, 99]
    assert [p.row for p in load_prompts(RowSet("demo", "test", "", "97:"), 10, flag="--eval-prompts")] == [97, 98, 99]
    assert "holds 3 usable prompts, fewer than --eval-prompts 10" in capsys.readouterr().err


def _error(capsys, *argv) -> str:
    assert run_cli(*argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_exit_2(run_dir, judge_dir, root, capsys):
    policy = ["eval", "--policy", run_dir / "dpo", *SMALL]
    # the issue: "--n 4 --rows 5:2" suggested "Lower --n to at most 0"; the span itself is the mistake
    err = _error(capsys, *policy, "--rows", "5:2")
    assert "--rows '5:2' selects no rows" in err and "'2:5'" in err and "--n" not in err
    assert "--rows '3:3' selects no rows" in _error(capsys, *policy, "--rows", "3:3")
    assert "holds no usable prompts" in _error(capsys, *policy, "--rows", "100:110")  # the demo test split has 100
    err = _error(capsys, *policy, "--dataset", "demo", "--split", "train", "--rows", "0:10")
    assert "trained on" in err and "rows 0, 1" in err
    # the real reward-model run where a causal LM is expected, and a policy run given as the judge
    assert "reward-model run" in _error(capsys, "eval", "--policy", judge_dir, *SMALL)
    assert "reward-model run" in _error(capsys, *policy, "--reference", judge_dir)
    assert "not a reward-model run" in _error(capsys, *policy, "--judge", run_dir / "dpo")
    assert "--reference" in _error(capsys, "eval", "--policy", "tiny", "--dataset", "demo", *SMALL)
    assert "--policy is required" in _error(capsys, "eval", *SMALL)


def test_a_judge_on_another_tokenizer_is_refused_naming_both(judge_dir, root, shared_dir, capsys):
    """A judge on `tiny` (demo tokenizer) for a pythia-70m policy (GPT-NeoX tokenizer): refused before any model
    loads, by `minialign eval` and by `minialign run` (before its run folder is written)."""
    neox = shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json"
    saved = judge_dir / "final" / "tokenizer"
    err = _error(capsys, "eval", "--policy", "pythia-70m", "--reference", "pythia-70m", "--tokenizer", neox,
                 "--dataset", "demo", *SMALL, "--judge", judge_dir)
    assert "different tokenizer" in err and str(saved) in err and str(neox) in err, err
    assert "trained from tiny" in err
    out = root / "run-other-tokenizer"
    err = _error(capsys, "run", "--demo", "--model", "pythia-70m", "--tokenizer", neox, "--judge", judge_dir,
                 "--out", out)
    assert "different tokenizer" in err and str(saved) in err and str(neox) in err, err
    assert not (out / "run.yaml").exists()


def test_run_with_a_judge_reports_win_rate_and_judge_accuracy(run_dir, judge_dir, tmp_path):
    """`minialign run --judge`: the eval stage's generation metrics carry the judge's scores and win rates
    (recomputed here), and the report's Generation section shows them with the judge's held-out accuracy."""
    from minialign.reporting.report import write_report

    results = json.loads((run_dir / "results.json").read_text())
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["judge"] == str(judge_dir)
    generation = results["generation"]
    assert generation["rows"] == [0, 1, 2, 3] and generation["judge"]["heldout_accuracy"] == heldout_accuracy(judge_dir)
    check_judged(generation, judge_dir, {"greedy": 1, "sampled": 2})
    md = (run_dir / "report.md").read_text()
    section = md[md.index("## Generation"):]
    assert "| loop share (4-gram x3) |" in section and "[row 0]" in section and "Win rate by the judge" in section
    assert "judge held-out accuracy" in section and fmt(heldout_accuracy(judge_dir)) in section
    for mode in ("greedy", "sampled"):
        w = generation["modes"][mode]["win_rate"]
        assert f"| {mode} | {w['rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] |" in section
    (tmp_path / "results.json").write_text(json.dumps({}))
    write_report(tmp_path)
    assert NO_GENERATION in (tmp_path / "report.md").read_text()


def test_saved_answers_are_scored_again_by_another_judge(run_dir, judge_dir, root, capsys):
    """`--answers`: the same judge reproduces every judged number of the eval it reads; another judge scores the
    very same answers (recomputed through that judge), with the overlaps decided from the rows eval.json recorded."""
    first = root / "eval-to-rescore"
    assert run_cli("eval", "--policy", run_dir / "dpo", *SMALL, "--judge", judge_dir, "--out", first) == 0
    saved = json.loads((first / "eval.json").read_text())
    assert saved["prompt_rows"]["dataset"] == "demo" and len(saved["policy_trained"]) == 2
    same = root / "rescored-same"
    assert run_cli("eval", "--answers", first, "--judge", judge_dir, "--out", same) == 0
    again = json.loads((same / "eval.json").read_text())
    for key in ("modes", "prompts", "rows", "decoding", "judge", "generation_s", "policy", "reference"):
        assert again[key] == saved[key], key
    assert again["answers_from"] == str(first / "eval.json") and "scored here by another judge" in (
        same / "eval.md").read_text()

    other = root / "rm-rescore"  # trained on demo test rows 50:, so neither the policy's rows nor the prompts
    assert run_cli(*RM, "--train-split", "test", "--train-rows", "50:", "--eval-rows", "40:50", "--out", other) == 0
    assert run_cli("eval", "--answers", first, "--judge", other) == 0  # default --out: inside the answers folder
    rescored = json.loads((first / "judged-rm-rescore" / "eval.json").read_text())
    strip = lambda records: [{side: {m: [{k: a[k] for k in ("text", "n_tokens", "stop")} for a in r[side][m]]
                                     for m in r[side]} for side in SIDES} for r in records]
    assert strip(rescored["prompts"]) == strip(saved["prompts"])  # the same answers, not new ones
    check_judged(rescored, other, {"greedy": 1, "sampled": 2})
    judge = rescored["modes"]["greedy"]["win_rate"]["judge"]
    assert judge["overlap_policy"] is False and judge["overlap_prompts"] is False
    assert judge["policy_rows"] == saved["modes"]["greedy"]["win_rate"]["judge"]["policy_rows"]
    assert "re-scoring" in capsys.readouterr().out

    # a `minialign run` folder: the answers of its eval stage (results.json's "generation")
    generation = json.loads((run_dir / "results.json").read_text())["generation"]
    assert run_cli("eval", "--answers", run_dir, "--judge", other, "--out", root / "run-rescored") == 0
    from_run = json.loads((root / "run-rescored" / "eval.json").read_text())
    assert strip(from_run["prompts"]) == strip(generation["prompts"])
    check_judged(from_run, other, {"greedy": 1, "sampled": 2})
    judge = from_run["modes"]["greedy"]["win_rate"]["judge"]
    assert judge["overlap_policy"] is False and judge["overlap_prompts"] is False
    assert from_run["policy"] == f"dpo run {run_dir / 'dpo'}" and from_run["prompt_source"].startswith("demo (test)")

    # an eval.json from before the rows were recorded: --tokenizer is asked for, and the overlaps print as not known
    old = root / "eval-old-format"
    old.mkdir()
    legacy = {k: v for k, v in saved.items() if k not in ("tokenizer", "prompt_rows", "policy_trained")}
    (old / "eval.json").write_text(json.dumps(legacy))
    assert "--tokenizer" in _error(capsys, "eval", "--answers", old, "--judge", other)
    tok = run_dir / "dpo" / "final" / "tokenizer"
    assert run_cli("eval", "--answers", old, "--judge", other, "--tokenizer", tok, "--out", root / "old-rescored") == 0
    judge = json.loads((root / "old-rescored" / "eval.json").read_text())["modes"]["greedy"]["win_rate"]["judge"]
    assert judge["overlap_policy"] is None and judge["overlap_prompts"] is None
    assert "not known: judge/policy train rows" in (root / "old-rescored" / "eval.md").read_text()


def test_bad_answers_inputs_exit_2(run_dir, judge_dir, root, capsys):
    first = root / "eval-bad-answers"
    assert run_cli("eval", "--policy", run_dir / "dpo", *SMALL, "--samples", "0", "--out", first) == 0
    before = (first / "eval.json").read_bytes()
    assert "needs --judge" in _error(capsys, "eval", "--answers", first)
    assert "drop --policy" in _error(capsys, "eval", "--answers", first, "--judge", judge_dir, "--policy", run_dir)
    assert "no eval.json" in _error(capsys, "eval", "--answers", root / "nowhere", "--judge", judge_dir)
    bare_run = root / "run-without-eval"
    bare_run.mkdir()
    (bare_run / "run.yaml").write_text("model: tiny\n")
    assert "no generation metrics" in _error(capsys, "eval", "--answers", bare_run, "--judge", judge_dir)
    assert "would be replaced" in _error(capsys, "eval", "--answers", first, "--judge", judge_dir, "--out", first)
    assert "not a reward-model run" in _error(capsys, "eval", "--answers", first, "--judge", run_dir / "dpo")
    broken = root / "eval-broken"
    broken.mkdir()
    (broken / "eval.json").write_text('{"prompts": [')
    err = _error(capsys, "eval", "--answers", broken, "--judge", judge_dir)
    assert "not valid JSON" in err and str(broken / "eval.json") in err
    (broken / "eval.json").write_text('{"modes": {}}')
    assert "not an eval.json written by `minialign eval`" in _error(capsys, "eval", "--answers", broken,
                                                                   "--judge", judge_dir)
    assert (first / "eval.json").read_bytes() == before  # nothing refused touched the saved answers


def test_answers_are_never_replaced_without_overwrite(run_dir, judge_dir, root, capsys):
    """The repro: `eval --out E` replaced E/eval.json, and with it the answers `eval --answers E --judge J` had
    scored. Now it is refused before any model loads, naming the folders scored from them; --overwrite replaces
    them and deletes those folders."""
    from test_folders import snapshot

    out = root / "eval-kept"
    policy = ["eval", "--policy", run_dir / "dpo", *SMALL, "--samples", "0"]
    assert run_cli(*policy, "--out", out) == 0
    assert run_cli("eval", "--answers", out, "--judge", judge_dir) == 0
    judged = out / f"judged-{judge_dir.name}"
    assert json.loads((judged / "eval.json").read_text())["answers_from"] == str(out / "eval.json")
    before = snapshot(out)
    err = _error(capsys, *policy, "--seed", "1", "--out", out)
    assert "already holds the answers" in err and f"which {judged} was re-scored from" in err and "--overwrite" in err
    assert "already holds the answers" in _error(capsys, "eval", "--answers", out, "--judge", judge_dir)
    assert "holds a `minialign sft` run" in _error(capsys, *policy, "--out", run_dir / "sft")
    assert snapshot(out) == before
    assert run_cli(*policy, "--max-new-tokens", "4", "--out", out, "--overwrite") == 0
    assert not judged.exists() and f"deleted {judged}" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["decoding"]["max_new_tokens"] == 4
