"""benchmarks/recipes/trl_online.py, TRL's OnlineDPOTrainer peer of `minialign online`, on the tiny model: it reads
a minialign reward model as minialign's judge scores it, routes between two as `--combine route` does, trains on
the prompts `minialign online` sampled, and saves a PEFT adapter after the matched steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "benchmarks" / "recipes"
plan = load_benchmark("hh_plan", RECIPES)


def _tiny_rm(out: Path, data: str, rows: str) -> Path:
    """A `minialign rm --full` run of tiny-llama (what the study's online reward models are, in small)."""
    subprocess.run([sys.executable, "-m", "minialign", "rm", "--model", "tiny-llama", "--dataset", data, "--train-rows",
                    rows, "--eval-data", data, "--eval-rows", "0:4", "--full", "--epochs", "1", "--batch-size", "8",
                    "--max-length", "128", "--eval-every", "0", "--out", str(out)], check=True, capture_output=True,
                   cwd=ROOT)
    return out


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, shared_dir):
    return _tiny_rm(tmp_path_factory.mktemp("rm") / "rm", plan.dataset_path(shared_dir, "harmless"), "300:308")


@pytest.fixture(scope="module")
def tiny_rm_helpful(tmp_path_factory, shared_dir):
    return _tiny_rm(tmp_path_factory.mktemp("rm") / "rm", plan.dataset_path(shared_dir, "helpful"), "300:308")


def test_trl_reads_the_reward_model_as_minialigns_judge_scores_it(tiny_rm):
    import torch

    from minialign.evaluation.judge import load_judge

    trl_online = load_benchmark("trl_online", RECIPES)
    model, tok = trl_online.reward_model(str(tiny_rm / "final" / "model"), "")
    prompts = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: Hi\n\nAssistant:"]
    answers = [" Mix flour, water and yeast, then bake it.", " Hello there! How can I help?"]
    # TRL's _calculate_rewards_from_functions: prompt + completion, right-padded, no special tokens, logits[:, 0]
    batch = tok(text=[p + a for p, a in zip(prompts, answers)], return_tensors="pt", padding=True,
                padding_side="right", add_special_tokens=False)
    model.config.pad_token_id = tok.pad_token_id  # what TRL does with the processing class's pad id
    with torch.no_grad():
        trl_scores = model(**batch).logits[:, 0]
    ours = load_judge(tiny_rm, cache=False).score(prompts, answers)
    torch.testing.assert_close(trl_scores, ours, atol=1e-4, rtol=1e-4)


def test_trl_routed_reward_scores_each_answer_with_its_rows_model_as_minialign_online_does(tiny_rm, tiny_rm_helpful):
    """The TRL peer's reward function under --combine route, against a recomputation: each answer scored by the
    model its row routes it to, standardised over that model's answers (population std), minus the loop penalty."""
    import torch

    from minialign.evaluation.judge import load_judge

    trl_online = load_benchmark("trl_online", RECIPES)
    routes = ["harmless-base", "helpful-base"]
    reward = trl_online.routed_reward([str(tiny_rm), str(tiny_rm_helpful)], routes, 4.0, "cpu", evasion_penalty=2.0,
                                      evasion_routes=("helpful-base",))
    raw = [f"\n\nHuman: Question {i}?\n\nAssistant:" for i in range(6)]
    decline = " I'm sorry, but I can't help with that."
    texts = [" Yes.", " No, thanks.", " the cat sat down " * 5, decline, " Sure, here it is.", decline]
    route = ["harmless-base", "helpful-base", "harmless-base", "harmless-base", "helpful-base", "helpful-base"]
    got = reward(prompts=raw, completions=texts, raw_prompt=raw, route=route, completion_ids=[], trainer_state=None)
    want = torch.zeros(6, dtype=torch.float64)
    for m, run in enumerate([tiny_rm, tiny_rm_helpful]):
        mine = [i for i, r in enumerate(route) if r == routes[m]]
        s = load_judge(run, cache=False).score([raw[i] for i in mine], [texts[i].strip() for i in mine]).double()
        want[mine] = (s - s.mean()) / s.std(unbiased=False)
    want[2] -= 4.0  # the looping answer
    want[5] -= 2.0  # the decline on a helpful prompt; the one on a harmless prompt (3) keeps its score
    assert got == pytest.approx(want.tolist(), abs=1e-5)


@pytest.mark.parametrize("scoring", ["full", "routed"])
def test_trl_online_peer_trains_the_matched_steps_and_saves_a_peft_adapter(scoring, tiny_rm, tiny_rm_helpful, tmp_path,
                                                                           shared_dir):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    out = tmp_path / "trl"
    settings = {**plan.online_settings("r1-rpo1", small=True), "prompts_per_round": 4}
    match = plan.trl_online_plan(settings)
    if scoring == "full":
        data, rows = plan.dataset_path(shared_dir, "harmless"), "300:340"
        rm = ["--reward-model", str(tiny_rm / "final" / "model")]
    else:  # the study's mixed file: rows alternate between the axes, each naming its folder in `source`
        data, rows = str(tmp_path / "mix.jsonl"), "0:40"
        plan.write_mix(Path(data), shared_dir, plan.ROW_PLAN)
        rm = ["--reward-models", f"{tiny_rm},{tiny_rm_helpful}", "--rm-routes", "harmless-base,helpful-base",
              "--loop-penalty", "4", "--missing-eos-penalty", "1.5"]
    cmd = [sys.executable, str(RECIPES / "trl_online.py"), "--model", "tiny-llama", "--dataset", data, "--train-rows",
           rows, "--prompts", str(match["prompts"]), *rm, "--batch-size", str(match["batch_size"]),
           "--epochs", str(match["epochs"]), "--max-new-tokens", "4", "--max-length", "128", "--lora-r", "4",
           "--lora-alpha", "8", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    row = json.loads((out / "trl_online.json").read_text())
    assert row["prompts"] == 4 and row["steps"] == match["steps"] == 1 and row["samples_per_prompt"] == 2
    assert bool(row["settings"]["reward_models"]) == (scoring == "routed")
    assert row["settings"]["missing_eos_penalty"] == (1.5 if scoring == "routed" else 0.0)
    assert row["trl_missing_eos_penalty"] == (1.5 if scoring == "routed" else None)  # TRL's config: 0 is None
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert {"q_proj", "down_proj"} <= {m.split(".")[-1] for m in config["target_modules"]}  # all-linear


def test_trl_online_trains_on_the_prompts_minialign_online_sampled(tiny_rm, tiny_rm_helpful, tmp_path, shared_dir):
    """The TRL peer's prompts are those a real `minialign online` run sampled, round after round (its 10% held-out
    rows, each prompt once, its seeded pick), each with the route its row names."""
    trl_online = load_benchmark("trl_online", RECIPES)
    mix = tmp_path / "mix.jsonl"
    plan.write_mix(mix, shared_dir, plan.ROW_PLAN)
    routed = ["--reward-models", f"{tiny_rm},{tiny_rm_helpful}", "--rm-routes", "harmless-base,helpful-base"]
    out = tmp_path / "online"
    subprocess.run([sys.executable, "-m", "minialign", "online", "--model", "tiny-llama", "--dataset", str(mix),
                    "--train-rows", "10:50", *routed, "--combine", "route", "--rounds", "2", "--prompts-per-round",
                    "6", "--samples", "2", "--max-new-tokens", "4", "--batch-size", "4", "--eval-limit", "4",
                    "--max-length", "128", "--out", str(out)], check=True, capture_output=True, cwd=ROOT)
    lines = [json.loads(x) for x in mix.read_text().splitlines()]
    sampled = []
    for k in (1, 2):
        rows = [x["row"] for x in (json.loads(y) for y in (out / f"round-{k}" / "samples.jsonl").read_text().splitlines())]
        sampled += [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]  # one per prompt
    args = trl_online.parse_args(["--model", "tiny-llama", "--dataset", str(mix), "--train-rows", "10:50", "--prompts",
                                  "6", "--rounds", "2", *routed, "--out", "x"])
    columns = trl_online.load_prompts(args, tokenizer=None)
    assert len(columns["prompt"]) == 12 and columns["prompt"] == columns["raw_prompt"]
    want = [trl_online_prompt(lines[r]) for r in sampled]
    assert columns["raw_prompt"] == want
    assert columns["route"] == [lines[r]["source"] for r in sampled]
    bad = trl_online.parse_args(["--model", "tiny-llama", "--dataset", str(mix), "--train-rows", "10:50", "--prompts",
                                 "6", "--reward-models", "a", "--rm-routes", "harmless-base", "--out", "x"])
    with pytest.raises(Exception, match="helpful-base"):  # a helpful row routed to no model: said, file and line
        trl_online.load_prompts(bad, tokenizer=None)
    with pytest.raises(SystemExit):
        trl_online.parse_args(["--model", "m", "--dataset", "d", "--prompts", "6", "--out", "x"])  # no reward model
    args = trl_online.parse_args(["--model", "m", "--dataset", "d", "--prompts", "6", "--out", "x", "--reward-models",
                                  "a", "--rm-routes", "harmless-base", "--evasion-penalty", "2", "--evasion-routes",
                                  " harmless-base ,"])
    assert args.evasion_routes == "harmless-base"  # read as minialign online reads it: stripped, empty parts dropped
    for penalty in (["--evasion-penalty", "-1"], ["--loop-penalty", "inf"], ["--evasion-routes", "harmless-base"],
                    ["--missing-eos-penalty", "-1"],
                    ["--evasion-penalty", "2", "--evasion-routes", "helpful-base"],
                    ["--evasion-penalty", "2", "--evasion-routes", ","],
                    ["--reward-model", "r", "--evasion-penalty", "2"],  # no place for it
                    ["--reward-model", "r", "--missing-eos-penalty", "2"]):  # raw logits there: another scale
        with pytest.raises(SystemExit):
            trl_online.parse_args(["--model", "m", "--dataset", "d", "--prompts", "6", "--out", "x",
                                   *(["--reward-models", "a", "--rm-routes", "harmless-base"]
                                     if "--reward-model" not in penalty else []), *penalty])


def trl_online_prompt(row: dict) -> str:
    from minialign.data.sources import row_to_pair

    return row_to_pair(row, "mix").prompt
