"""`minialign online` end to end on the tiny model with REAL reward models (tiny `minialign rm` runs): every score,
combined score, pair and round statistic recomputed from the saved answers; the DPO reference is the starting model
in every round; a round killed by SIGKILL is redone on resume with the uninterrupted run's result; every bad input."""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from cli_runs import THREADS, launched, run_cli, wait_for
from safetensors.torch import load_file

from minialign.commands import common, recipes
from minialign.config.online import OnlineConfig
from minialign.data import PreferencePair, batch_indices, sequence_lengths, tokenize_pairs
from minialign.data.demo import demo_rows
from minialign.evaluation.evasion import evades
from minialign.evaluation.judge import load_judge
from minialign.evaluation.textmetrics import loops
from minialign.modeling import adapters
from minialign.modeling.generate import generate
from minialign.modeling.models import load_model, load_tokenizer
from tests.conftest import torch_threads

RM = ["rm", "--demo", "--eval-limit", "16", "--train-rows", "100:"]
SMALL = ["--demo", "--prompts-per-round", "12", "--samples", "3", "--max-new-tokens", "8", "--batch-size", "4",
         "--rounds", "2", "--eval-limit", "8", "--gen-batch-size", "64"]


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """One thread, as the subprocess of the resume test gets: the same floats in and out of process."""
    with torch_threads(THREADS):
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("online")


@pytest.fixture(scope="module")
def rms(root) -> list[Path]:
    """Two real reward models on demo rows 100: (the policy's prompts are rows 0:100), trained differently."""
    assert run_cli(*RM, "--max-steps", "3", "--out", root / "rm1") == 0
    assert run_cli(*RM, "--max-steps", "2", "--seed", "1", "--out", root / "rm2") == 0
    return [root / "rm1", root / "rm2"]


def online_args(rms: list[Path], out: Path) -> list:
    """The two-round runs (a, and b resumed): with loop and evasion penalties; the other runs keep the default (off)."""
    return ["online", *SMALL, "--reward-models", ",".join(map(str, rms)), "--rm-weights", "0.7,0.3",
            "--loop-penalty", "100", "--evasion-penalty", "50", "--missing-eos-penalty", "25", "--out", out]


@pytest.fixture(scope="module")
def run_a(root, rms) -> Path:
    """Two uninterrupted rounds."""
    assert run_cli(*online_args(rms, root / "a")) == 0
    return root / "a"


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_folder_holds_rounds_metrics_and_final_weights(run_a, rms):
    assert (run_a / "kind").read_text() == "online"
    config = yaml.safe_load((run_a / "config.yaml").read_text())
    assert config["reward_models"] == ",".join(str(p.resolve()) for p in rms)  # what `minialign eval` reads
    summary = json.loads((run_a / "summary.json").read_text())
    assert [m["train_rows"]["rows"] for m in summary["reward_models"]] == ["100:", "100:"]
    assert [m["weight"] for m in summary["reward_models"]] == [0.7, 0.3]
    rounds = jsonl(run_a / "rounds.jsonl")
    assert [r["round"] for r in rounds] == [1, 2] and summary["per_round"] == rounds
    assert all(r[k] >= 0 for r in rounds for k in ("generate_s", "score_s", "train_s"))
    metrics = jsonl(run_a / "metrics.jsonl")
    for r in rounds:  # one row per optimizer step of the round (1 epoch), plus its held-out evaluation row
        steps = [m for m in metrics if m["round"] == r["round"] and "loss" in m]
        assert [m["step"] for m in steps] == list(range(1, math.ceil(r["pairs"] / 4) + 1))
        assert any(m["round"] == r["round"] and "eval/loss" in m for m in metrics)
    assert (run_a / "final" / "adapter" / "adapter_config.json").is_file()
    assert (run_a / "final" / "tokenizer").is_dir()
    report = (run_a / "report.md").read_text()
    assert "| 2 | " in report and (run_a / "plots" / "online-scores.png").is_file() and (run_a / "report.html").is_file()


def test_scores_pairs_and_statistics_recomputed(run_a, rms):
    judges = [load_judge(p) for p in rms]
    raw = {i: r["prompt"] for i, r in enumerate(demo_rows("train"))}
    seen_rows: list[set] = []
    for r in jsonl(run_a / "rounds.jsonl"):
        folder = run_a / f"round-{r['round']}"
        samples = jsonl(folder / "samples.jsonl")
        assert len(samples) == 12 * 3
        seen_rows.append({s["row"] for s in samples})
        prompts, texts = [raw[s["row"]] for s in samples], [s["text"] for s in samples]
        scores = torch.stack([j.score(prompts, texts) for j in judges]).double()  # [2, 36], by the judges again
        for m in range(2):
            assert scores[m].tolist() == pytest.approx([s["scores"][m] for s in samples], abs=1e-5)
        mean, std = scores.mean(1, keepdim=True), scores.var(1, unbiased=False, keepdim=True).sqrt()
        combined = (torch.tensor([[0.7], [0.3]], dtype=torch.float64) * (scores - mean) / std).sum(0)
        looped = torch.tensor([loops(t) for t in texts], dtype=torch.float64)
        evaded = torch.tensor([evades(t) for t in texts], dtype=torch.float64)
        assert [s["evades"] for s in samples] == evaded.bool().tolist()  # the flags the penalties read, kept
        assert [s["loops"] for s in samples] == looped.bool().tolist()
        cut = torch.tensor([s["stop"] == "length" for s in samples], dtype=torch.float64)
        assert cut.sum() > 0  # the tiny random model seldom ends an answer in 8 tokens: each is lowered by 25
        combined = combined - 100 * looped - 50 * evaded - 25 * cut  # the three penalties of online_args
        assert (r["penalised"], r["penalised_evasion"], r["penalised_cut"]) == tuple(
            int(x.sum()) for x in (looped, evaded, cut))
        assert r["evasion_share"] == pytest.approx(float(evaded.mean()))
        assert combined.tolist() == pytest.approx([s["combined"] for s in samples], abs=1e-4)
        expected = []
        for p in range(12):
            group = samples[3 * p : 3 * p + 3]
            distinct = {}
            for s in group:
                distinct.setdefault(s["text"], s)
            best = max(distinct.values(), key=lambda s: s["combined"])
            worst = min(distinct.values(), key=lambda s: s["combined"])
            if best["combined"] > worst["combined"]:
                expected.append((best["row"], best["text"], worst["text"]))
        pairs = jsonl(folder / "pairs.jsonl")
        assert [(x["row"], x["chosen"], x["rejected"]) for x in pairs] == expected
        assert all(x["prompt"] == raw[x["row"]] and x["raw_prompt"] == raw[x["row"]] for x in pairs)
        assert r["pairs"] == len(pairs) and r["below_gap"] == 0 and r["no_contrast"] == 12 - len(pairs)
        assert r["loop_share"] == pytest.approx(sum(loops(t) for t in texts) / 36)
        assert r["eos_share"] == pytest.approx(sum(s["stop"] == "eos" for s in samples) / 36)
        assert r["mean_tokens"] == pytest.approx(sum(s["n_tokens"] for s in samples) / 36)
        assert list(r["rm_scores"].values()) == pytest.approx(scores.mean(1).tolist(), abs=1e-5)
    assert not seen_rows[0] & seen_rows[1]  # fresh prompts in round 2


def sequence_logp(model, prompt: list[int], response: list[int]) -> float:
    """Summed log-prob of ``response`` after ``prompt``: one plain forward in float64 log-softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))


def test_reference_is_the_starting_model_in_every_round(run_a):
    """Round 2's first DPO step logged rewards beta x (policy - reference) for its first batch. The policy there is
    round 1's result; the rewards recomputed with the STARTING model as reference match (a reference that followed
    the policy would give exactly 0)."""
    cfg = recipes.load_run_config(run_a, OnlineConfig)
    tokenizer = load_tokenizer("demo")
    pairs = [PreferencePair(x["prompt"], x["chosen"], x["rejected"]) for x in jsonl(run_a / "round-2" / "pairs.jsonl")]
    items = tokenize_pairs(pairs, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    first = batch_indices(len(items), cfg.batch_size, seed=cfg.seed + 2, epoch=0, lengths=sequence_lengths(items),
                          group_by_length=True)[0]
    start = load_model(cfg.model, seed=cfg.seed).eval()
    policy = common.attach_lora(load_model(cfg.model, seed=cfg.seed), cfg, torch.device("cpu")).eval()
    weights = load_file(str(run_a / "checkpoints" / "round-0002" / ".." / "round-0001" / "trainable.safetensors"))
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    rewards = {"chosen": [], "rejected": []}
    for i in first:
        for side in rewards:
            ids = getattr(items[i], f"{side}_ids")
            rewards[side].append(cfg.beta * (sequence_logp(policy, items[i].prompt_ids, ids)
                                             - sequence_logp(start, items[i].prompt_ids, ids)))
    logged = next(m for m in jsonl(run_a / "metrics.jsonl") if m["round"] == 2 and m["step"] == 1)
    for side, values in rewards.items():
        assert abs(sum(values)) > 1e-4
        assert logged[f"rewards/{side}"] == pytest.approx(sum(values) / len(values), rel=1e-3, abs=1e-5)


def test_greedy_sample_is_the_policys_greedy_answer_and_takes_part_in_pairs(root, rms):
    """--greedy-sample: each prompt's sample 0 is the starting policy's greedy answer (round 1 samples from it), the
    other two are sampled, and all three are scored and paired alike."""
    out = root / "greedy"
    assert run_cli("online", *SMALL, "--rounds", "1", "--reward-models", rms[0], "--greedy-sample", "--out", out) == 0
    cfg = recipes.load_run_config(out, OnlineConfig)
    assert cfg.greedy_sample
    samples = jsonl(out / "round-1" / "samples.jsonl")
    raw = {i: r["prompt"] for i, r in enumerate(demo_rows("train"))}
    prompts = [raw[s["row"]] for s in samples[::3]]
    policy = common.attach_lora(load_model(cfg.model, seed=cfg.seed), cfg, torch.device("cpu")).eval()
    greedy = generate(policy, load_tokenizer("demo"), prompts, max_new_tokens=8, batch_size=64)
    assert [s["text"] for s in samples[::3]] == greedy
    sampled = generate(policy, load_tokenizer("demo"), prompts, max_new_tokens=8, batch_size=64, do_sample=True,
                       temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + 1, num_samples=2)
    assert [s["text"] for i, s in enumerate(samples) if i % 3] == sampled  # each prompt's own, in order
    assert [s["sample"] for s in samples] == [0, 1, 2] * 12
    assert sum(t != greedy[i // 2] for i, t in enumerate(sampled)) >= 12  # sampled, not greedy again
    pairs = jsonl(out / "round-1" / "pairs.jsonl")
    assert any(x["chosen"] in greedy or x["rejected"] in greedy for x in pairs)


@pytest.fixture(scope="module")
def tagged(root) -> Path:
    """Demo rows 0:100 as a local file, each row tagged `source` a (odd rows) or b (even rows)."""
    path = root / "tagged.jsonl"
    path.write_text("".join(json.dumps({**r, "source": "ab"[i % 2 == 0]}) + "\n"
                            for i, r in enumerate(demo_rows("train")[:100])))
    return path


def test_route_scores_each_prompt_with_its_rows_reward_model(root, rms, tagged, monkeypatch):
    """--combine route: every answer is scored by its routed model alone, and its combined score is that score
    standardised over the answers routed to that model, recomputed here from the saved scores; pairs follow them.
    --evasion-routes a: only answers routed to model 1 (route "a", second in --rm-routes) lose the evasion penalty."""
    # the demo model's answers are byte noise that never reads as a decline: flag half of them by a rule of the text
    monkeypatch.setattr("minialign.commands.online.evades", lambda text: len(text) % 2 == 0)
    out = root / "route"
    assert run_cli("online", *SMALL, "--rounds", "1", "--dataset", tagged, "--train-rows", "0:100",
                   "--reward-models", ",".join(map(str, rms)), "--combine", "route", "--rm-routes", "b,a",
                   "--evasion-penalty", "50", "--evasion-routes", "a", "--out", out) == 0
    rows = [json.loads(line) for line in tagged.read_text().splitlines()]
    samples = jsonl(out / "round-1" / "samples.jsonl")
    model_of = torch.tensor([0 if rows[x["row"]]["source"] == "b" else 1 for x in samples])
    assert 0 < int(model_of.sum()) < len(samples)  # both models have answers to score
    # each answer scored by its own model only (the other's score would go unused): null there
    assert [[v is None for v in x["scores"]] for x in samples] == [[m == 1, m == 0] for m in model_of.tolist()]
    scores = torch.tensor([[float("nan") if v is None else v for v in x["scores"]] for x in samples],
                          dtype=torch.float64).T  # [2, K]
    want = torch.zeros(len(samples), dtype=torch.float64)
    for m in (0, 1):
        mine = scores[m, model_of == m]
        want[model_of == m] = (mine - mine.mean()) / mine.var(unbiased=False).sqrt()
    evaded = torch.tensor([x["evades"] for x in samples])
    assert evaded.tolist() == [len(x["text"]) % 2 == 0 for x in samples]
    scoped = evaded & (model_of == 1)  # --evasion-routes a: model 1's prompts
    assert scoped.any() and (evaded & (model_of == 0)).any()  # penalised answers, and evading ones left alone
    assert [x["combined"] for x in samples] == pytest.approx((want - 50 * scoped).tolist(), abs=1e-6)
    expected = []
    for p in range(0, len(samples), 3):
        group = {x["text"]: x for x in reversed(samples[p : p + 3])}  # a repeated text: its first sample
        ranked = sorted(group.values(), key=lambda x: (x["combined"], -x["sample"]))
        if ranked[-1]["combined"] > ranked[0]["combined"]:
            expected.append((ranked[-1]["text"], min(ranked, key=lambda x: (x["combined"], x["sample"]))["text"]))
    assert [(x["chosen"], x["rejected"]) for x in jsonl(out / "round-1" / "pairs.jsonl")] == expected
    summary = json.loads((out / "summary.json").read_text())
    assert summary["routes"] == {"field": "source", "values": ["b", "a"]}
    assert [m["route"] for m in summary["reward_models"]] == ["b", "a"]
    assert summary["per_round"][0]["penalised_evasion"] == int(scoped.sum())
    routed = summary["per_round"][0]["rm_scores"]  # each model's mean over the answers routed to it
    assert list(routed.values()) == pytest.approx([scores[m, model_of == m].mean().item() for m in (0, 1)], abs=1e-5)
    assert "rm_scores_routed" not in summary["per_round"][0]  # not kept twice
    assert "source = b" in (out / "report.md").read_text()


def test_a_routed_model_with_no_prompt_in_a_round_scores_nothing_and_the_run_goes_on(root, rms):
    only_b = root / "only-b.jsonl"
    only_b.write_text("".join(json.dumps({**r, "source": "b"}) + "\n" for r in demo_rows("train")[:40]))
    out = root / "route-idle"
    assert run_cli("online", *SMALL, "--rounds", "2", "--dataset", only_b, "--train-rows", "0:40",
                   "--reward-models", ",".join(map(str, rms)), "--combine", "route", "--rm-routes", "b,a",
                   "--out", out) == 0
    assert all(x["scores"][1] is None and x["scores"][0] is not None for x in jsonl(out / "round-1" / "samples.jsonl"))
    per_round = json.loads((out / "summary.json").read_text())["per_round"]
    assert len(per_round) == 2 and all(list(r["rm_scores"].values())[1] is None for r in per_round)


def test_route_refuses_a_row_whose_field_names_no_reward_model(root, rms, tagged, capsys):
    out = root / "route-bad"
    capsys.readouterr()
    assert run_cli("online", *SMALL, "--dataset", tagged, "--train-rows", "0:100", "--reward-models", rms[0],
                   "--combine", "route", "--rm-routes", "b", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{tagged} line 2" in err and "'source' field" in err and "'a'" in err and "--rm-routes b" in err
    assert not out.exists()
    untagged = root / "untagged.jsonl"
    untagged.write_text("".join(json.dumps(r) + "\n" for r in demo_rows("train")[:100]))
    assert run_cli("online", *SMALL, "--dataset", untagged, "--train-rows", "0:100", "--reward-models", rms[0],
                   "--combine", "route", "--rm-routes", "b", "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{untagged} line " in err and "this row has no such field" in err


def test_resume_refuses_a_change_of_how_rounds_sample_or_score(run_a, capsys):
    before = (run_a / "config.yaml").read_text()
    capsys.readouterr()
    assert run_cli("online", "--resume", run_a, "--greedy-sample", "--loop-penalty", "0", "--evasion-penalty", "0") == 2
    err = capsys.readouterr().err
    assert "greedy_sample false -> true" in err and "loop_penalty 100 -> 0" in err and "A resume may change only" in err
    assert "evasion_penalty 50 -> 0" in err
    assert (run_a / "config.yaml").read_text() == before


def test_resume_redoes_a_round_killed_by_sigkill(run_a, root, rms):
    out = root / "b"
    with launched(online_args(rms, out), root / "b.log") as proc:
        wait_for(lambda: (out / "round-2").is_dir(), proc, root / "b.log", "round 2 to start")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "round-1" / "round.json").is_file() and not (out / "round-2" / "round.json").exists()
    assert [r["round"] for r in jsonl(out / "rounds.jsonl")] == [1]  # the killed round shows nowhere
    assert not (out / "final").exists()
    assert run_cli("online", "--resume", out) == 0
    for k in (1, 2):
        a, b = jsonl(run_a / f"round-{k}" / "pairs.jsonl"), jsonl(out / f"round-{k}" / "pairs.jsonl")
        assert [(x["row"], x["chosen"], x["rejected"]) for x in a] == [(x["row"], x["chosen"], x["rejected"]) for x in b]
    assert len(jsonl(out / "metrics.jsonl")) == len(jsonl(run_a / "metrics.jsonl"))
    assert [r["pairs"] for r in jsonl(out / "rounds.jsonl")] == [r["pairs"] for r in jsonl(run_a / "rounds.jsonl")]
    wa = load_file(str(run_a / "final" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    model = adapters.load_adapter(load_model("tiny"), out / "final" / "adapter")  # the result loads as an adapter
    assert any("lora" in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def wrong_vocab_rm(root, rms, shared_dir) -> Path:
    """rm1 with the GPT-NeoX tokenizer saved in its place: a judge that reads another vocabulary."""
    path = root / "rm-neox"
    shutil.copytree(rms[0], path)
    shutil.rmtree(path / "final" / "tokenizer")
    load_tokenizer(str(shared_dir / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")).save_pretrained(
        path / "final" / "tokenizer")
    return path


BAD = {
    "missing": (lambda root, rms: ["--reward-models", root / "nope"], "does not exist"),
    "not an rm": (lambda root, rms: ["--reward-models", root / "a"], "is not a reward-model run folder"),
    "vocabulary": (lambda root, rms: ["--reward-models", root / "rm-neox"], "different tokenizer"),
    "overlap": (lambda root, rms: ["--reward-models", rms[0], "--train-rows", "50:150"], "shares rows with the policy"),
    "samples": (lambda root, rms: ["--reward-models", rms[0], "--samples", "1"], "--samples must be >= 2"),
    "min gap": (lambda root, rms: ["--reward-models", rms[0], "--min-gap", "-0.5"], "--min-gap must be >= 0"),
    "loop penalty": (lambda root, rms: ["--reward-models", rms[0], "--loop-penalty", "-1"],
                     "--loop-penalty must be a finite number >= 0"),
    "loop penalty inf": (lambda root, rms: ["--reward-models", rms[0], "--loop-penalty", "inf"],
                         "--loop-penalty must be a finite number >= 0"),
    "evasion penalty": (lambda root, rms: ["--reward-models", rms[0], "--evasion-penalty", "-2"],
                        "--evasion-penalty must be a finite number >= 0"),
    "eos penalty": (lambda root, rms: ["--reward-models", rms[0], "--missing-eos-penalty", "-1"],
                    "--missing-eos-penalty must be a finite number >= 0"),
    "no prompts": (lambda root, rms: ["--reward-models", rms[0], "--train-rows", "50:50"], "selects no rows"),
    "weights": (lambda root, rms: ["--reward-models", rms[0], "--rm-weights", "1,2"], "gives 2 weight(s)"),
    "weight text": (lambda root, rms: ["--reward-models", rms[0], "--rm-weights", "heavy"], "must be numbers"),
    "repeated": (lambda root, rms: ["--reward-models", f"{rms[0]},{rms[0]}"], "more than once"),
    "routes count": (lambda root, rms: ["--reward-models", rms[0], "--combine", "route", "--rm-routes", "a,b"],
                     "one distinct value of --route-field 'source' per reward model"),
    "routes without route": (lambda root, rms: ["--reward-models", rms[0], "--rm-routes", "a"],
                             "--rm-routes applies only with --combine route"),
    "route weights": (lambda root, rms: ["--reward-models", rms[0], "--combine", "route", "--rm-routes", "a",
                                         "--rm-weights", "1"], "--rm-weights does not apply with --combine route"),
    "evasion routes unknown": (lambda root, rms: ["--reward-models", rms[0], "--combine", "route", "--rm-routes", "a",
                                                  "--evasion-penalty", "2", "--evasion-routes", "b"],
                               "b not among --rm-routes (a)"),
    "evasion routes empty": (lambda root, rms: ["--reward-models", rms[0], "--combine", "route", "--rm-routes", "a",
                                                "--evasion-penalty", "2", "--evasion-routes", ","], "names no route"),
    "evasion routes off": (lambda root, rms: ["--reward-models", rms[0], "--combine", "route", "--rm-routes", "a",
                                              "--evasion-routes", "a"], "needs an --evasion-penalty above 0"),
    "evasion routes unrouted": (lambda root, rms: ["--reward-models", rms[0], "--evasion-penalty", "2",
                                                   "--evasion-routes", "a"], "needs --combine route"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_exit_2_before_writing_anything(case, root, rms, run_a, wrong_vocab_rm, capsys):
    make, message = BAD[case]
    out = root / f"bad-{case.replace(' ', '-')}"
    capsys.readouterr()
    assert run_cli("online", *SMALL, *make(root, rms), "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


def test_a_round_without_pairs_says_how_many_were_below_min_gap(root, rms, capsys):
    out = root / "no-pairs"
    capsys.readouterr()
    assert run_cli("online", *SMALL, "--rounds", "1", "--reward-models", rms[0], "--min-gap", "1000", "--out", out) == 2
    err = capsys.readouterr().err
    assert "Round 1 kept no pair out of 12 prompts" in err and "below --min-gap 1000" in err and "Lower --min-gap" in err
    assert not (out / "round-1" / "round.json").exists() and not (out / "rounds.jsonl").exists()


def test_eval_takes_an_online_run_as_policy(run_a, root):
    """`minialign eval --policy RUN`: the final adapter over the starting model, against the starting model."""
    assert run_cli("eval", "--policy", run_a, "--n", "2", "--samples", "0", "--max-new-tokens", "4",
                   "--out", root / "eval") == 0
    results = json.loads((root / "eval" / "eval.json").read_text())
    assert results["policy"] == f"online run {run_a}" and "starting model" in results["reference"]
