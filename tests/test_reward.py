"""`minialign rm`: the loss against TRL's, pooling against transformers', learning a planted preference, saves that
transformers and PEFT load to the same scores, resume, the padding-free path, the judge API and bad inputs."""

from __future__ import annotations

import collections
import json
import random
import types
from pathlib import Path

import pytest
import torch
from cli_runs import _one_thread, run_cli  # noqa: F401 (_one_thread: autouse fixture)

from minialign.base.errors import UserError
from minialign.data import TokenizedPair, load_preference_pairs
from minialign.evaluation.judge import load_judge
from minialign.modeling import adapters
from minialign.modeling.models import load_model, load_tokenizer
from minialign.modeling.reward_model import RewardModel, run_rewards, sequence_classifier
from minialign.ops import losses
from minialign.training.reward_task import collate_rm

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ["the", "a", "sea", "cat", "car", "moon", "bread", "song", "rain", "city", "garden", "music", "is", "very",
         "old", "red", "big", "small", "and", "it", "was", "good", "bad", "green", "blue", "day", "night"]




def planted(path: Path, n: int, seed: int) -> Path:
    """HH rows whose chosen response always holds the word "thanks" (at a random place) and the rejected never."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        good = words[:]
        good.insert(rng.randint(0, len(good)), "thanks")
        bad = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
        prompt = f"\n\nHuman: Tell me about the {rng.choice(WORDS)}.\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {' '.join(good)}", "rejected": f"{prompt} {' '.join(bad)}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


# ----------------------------------------------------------------------------- the loss


def test_rm_loss_is_trls_reward_loss_summed_over_pairs():
    from trl.trainer.reward_trainer import RewardTrainer

    gen = torch.Generator().manual_seed(0)
    chosen, rejected, margin = (torch.randn(6, generator=gen) * 2 for _ in range(3))
    for m, coef in [(None, 0.0), (margin, 0.0), (margin, 0.01), (None, 0.3)]:
        ours = losses.rm_loss(chosen, rejected, m, coef) / len(chosen)
        # TRL's own compute_loss, on a stand-in model whose logits are the rewards (chosen rows, then rejected).
        trainer = types.SimpleNamespace(
            model=types.SimpleNamespace(training=True), args=types.SimpleNamespace(center_rewards_coefficient=coef or None),
            accelerator=types.SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x),
            _total_train_tokens=0, _tp_size=1, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
        inputs = {"attention_mask": torch.ones(12, 3)} | ({"margin": m} if m is not None else {})
        model = lambda **kw: types.SimpleNamespace(logits=torch.cat([chosen, rejected])[:, None])  # noqa: E731
        theirs = RewardTrainer.compute_loss(trainer, model, inputs)
        c, r = chosen.double(), rejected.double()
        d = c - r - (m.double() if m is not None else 0)
        exact = (torch.log1p(torch.exp(-d)) + coef * (c + r) ** 2).mean()
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-6)
        assert ours.item() == pytest.approx(exact.item(), abs=1e-6)


def test_margin_column_reaches_the_batches(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b", "margin": 1.5}) + "\n"
                    + json.dumps({"prompt": "Q", "chosen": " c", "rejected": " d"}) + "\n")
    pairs = load_preference_pairs(str(path))
    assert [p.margin for p in pairs] == [1.5, 0.0]
    from minialign.data import tokenize_pairs

    items = tokenize_pairs(pairs, load_tokenizer("demo"), max_length=64, max_prompt_length=32)
    assert collate_rm(items, pad_id=0, eos_id=0)["margin"].tolist() == [1.5, 0.0]
    path.write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b", "margin": "big"}) + "\n")
    with pytest.raises(UserError, match="margin"):
        load_preference_pairs(str(path))


# ----------------------------------------------------------------------------- pooling


def test_scores_equal_transformers_sequence_classification_on_right_padded_rows():
    from transformers import AutoModelForSequenceClassification

    eos = 0
    model = sequence_classifier(load_model("tiny-llama", seed=1), eos, seed=1).eval()
    reference = AutoModelForSequenceClassification.from_config(model.config).eval()
    reference.load_state_dict(model.state_dict())
    rng = random.Random(0)
    ids = lambda n: [rng.randint(1, 1000) for _ in range(n)]  # noqa: E731
    pairs = [TokenizedPair(ids(6), ids(4) + [eos], ids(9) + [eos]),
             TokenizedPair(ids(3), ids(7), [eos]),  # truncated (no EOS); a response of EOS alone
             TokenizedPair(ids(1), ids(2) + [eos, eos], ids(5) + [eos]),  # one-token prompt: nothing shared
             TokenizedPair(ids(4) + [eos] + ids(2), ids(3) + [eos], ids(1) + [eos])]  # an EOS inside the prompt
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    length = max(map(len, seqs))
    input_ids = torch.tensor([s + [eos] * (length - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in seqs])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).logits[:, 0]
        policy = RewardModel(model)
        for layout in [dict(), dict(flat=True), dict(flat=True, share_prompt=True), dict(pad_to_multiple_of=8)]:
            batch = collate_rm(pairs, pad_id=eos, eos_id=eos, **layout)
            got = run_rewards(policy, batch)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=str(layout))
    # A response's trailing EOS and its absence score alike.
    assert expected[0].item() == pytest.approx(reference(input_ids=input_ids[:1, :10]).logits[0, 0].item(), abs=1e-5)


# ----------------------------------------------------------------------------- learning, saving, judging


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """Full fine-tuning of the tiny model on a planted preference (two training files, a separate eval file)."""
    root = tmp_path_factory.mktemp("rm")
    a, b = planted(root / "a.jsonl", 160, 1), planted(root / "b.jsonl", 160, 2)
    held = planted(root / "held.jsonl", 64, 3)
    torch.set_num_threads(1)
    out = root / "run"
    assert run_cli("rm", "--model", "tiny", "--full", "--dataset", f"{a},{b}", "--eval-data", held,
                   "--batch-size", 16, "--max-steps", 40, "--lr", 2e-3, "--eval-every", 20, "--save-every", 10,
                   "--keep-last", 4, "--max-length", 64, "--max-prompt-length", 32, "--out", out) == 0
    return out


def test_learns_a_planted_preference_and_reports_held_out_accuracy(full_run):
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["eval"]["eval/accuracy"] >= 0.9
    assert summary["n_train"] == 320 and (full_run / "kind").read_text() == "rm"
    evals = [r for r in metrics(full_run) if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert {"loss", "accuracy", "rewards/chosen", "rewards/rejected", "margin"} <= set(metrics(full_run)[0])


def test_full_save_loads_in_transformers_and_the_judge_scores_as_training_did(full_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = load_judge(full_run)
    assert load_judge(full_run) is judge
    assert judge.info["heldout_accuracy"] >= 0.9 and judge.info["n_train"] == 320 and not judge.info["chat_template"]
    held = load_preference_pairs(str(full_run.parent / "held.jsonl"))
    prompts = [p.prompt for p in held]
    chosen, rejected = judge.score(prompts, [p.chosen for p in held], 7), judge.score(prompts, [p.rejected for p in held])
    assert chosen.dtype == torch.float32 and chosen.shape == (64,)
    assert (chosen > rejected).float().mean().item() == pytest.approx(judge.info["heldout_accuracy"], abs=1e-6)
    last_eval = [r for r in metrics(full_run) if "eval/accuracy" in r][-1]
    assert chosen.mean().item() == pytest.approx(last_eval["eval/rewards/chosen"], abs=1e-4)

    model = AutoModelForSequenceClassification.from_pretrained(full_run / "final" / "model").eval()
    tok = AutoTokenizer.from_pretrained(full_run / "final" / "tokenizer")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.eos_token_id
    text = [held[0].prompt + held[0].chosen, held[1].prompt + held[1].rejected]
    ids = [tok(held[i].prompt, add_special_tokens=False)["input_ids"] + tok(r, add_special_tokens=False)["input_ids"]
           + [tok.eos_token_id] for i, r in enumerate([held[0].chosen, held[1].rejected])]
    with torch.no_grad():
        direct = [model(input_ids=torch.tensor([s])).logits[0, 0].item() for s in ids]
    assert direct == pytest.approx([chosen[0].item(), rejected[1].item()], abs=1e-5), text


def test_resume_continues_with_the_same_losses(full_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(full_run), str(run)))
    for step in (30, 40):
        shutil.rmtree(run / "checkpoints" / f"step-{step:06d}")
    before = train_losses(full_run)
    assert run_cli("rm", "--resume", run) == 0
    after = train_losses(run)  # steps 21-40 logged again, from the step-20 checkpoint
    assert sorted(after) == list(range(1, 41))
    for step in range(21, 41):
        assert after[step] == pytest.approx(before[step], abs=1e-6), step


def test_padding_free_gives_the_padded_first_step(tmp_path):
    common = ["rm", "--demo", "--batch-size", 8, "--max-steps", 1, "--limit", 16, "--eval-limit", 8]
    assert run_cli(*common, "--fast", "off", "--out", tmp_path / "off") == 0
    assert run_cli(*common, "--fast", "on", "--out", tmp_path / "on") == 0
    assert run_cli(*common, "--fast", "on", "--no-share-prompt", "--out", tmp_path / "flat") == 0
    off = metrics(tmp_path / "off")
    for other in ("on", "flat"):
        rows = metrics(tmp_path / other)
        for key in ("loss", "accuracy", "margin"):
            assert rows[0][key] == pytest.approx(off[0][key], abs=1e-5), (other, key)
        assert rows[1]["eval/loss"] == pytest.approx(off[1]["eval/loss"], abs=1e-5)


def test_lora_adapter_with_chat_template_loads_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer("demo")
    tok.chat_template = CHATML
    tok.save_pretrained(tmp_path / "tok")
    data = planted(tmp_path / "d.jsonl", 48, 4)
    out = tmp_path / "run"
    assert run_cli("rm", "--model", "tiny-llama", "--tokenizer", tmp_path / "tok", "--chat-template", "--dataset", data,
                   "--batch-size", 8, "--max-steps", 3, "--lr", 1e-2, "--max-length", 96, "--max-prompt-length", 64,
                   "--out", out) == 0
    adapter = out / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]

    judge = load_judge(out)
    assert judge.info["chat_template"]
    held = load_preference_pairs(str(data))[:4]
    ours = judge.score([p.prompt for p in held], [p.chosen for p in held])

    load_model("tiny-llama", seed=0).save_pretrained(tmp_path / "base")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=1, pad_token_id=tok.eos_token_id)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert not torch.equal(peft_model.base_model.model.score.modules_to_save["default"].weight, base.score.original_module.weight)
    from minialign.data.chat import to_chat_format

    texts = to_chat_format(held, tok)
    with torch.no_grad():
        theirs = [peft_model(input_ids=torch.tensor([tok(p.prompt, add_special_tokens=False)["input_ids"]
                                                     + tok(p.chosen, add_special_tokens=False)["input_ids"]
                                                     + [tok.eos_token_id]])).logits[0, 0].item() for p in texts]
    assert ours.tolist() == pytest.approx(theirs, abs=1e-5)
    # Our own loader reads the adapter back (LoRA weights and the head) into the same model.
    model = sequence_classifier(load_model("tiny-llama", seed=0), tok.eos_token_id)
    adapters.load_adapter(model, adapter, modules_to_save=("score",))
    torch.testing.assert_close(model.score.weight, judge.model.score.weight)


# ----------------------------------------------------------------------------- bad inputs


def test_a_reward_model_where_a_causal_lm_is_expected_is_refused(full_run, tmp_path, capsys):
    model_dir = full_run / "final" / "model"
    cases = [["dpo", "--sft", full_run, "--demo", "--out", tmp_path / "d"],
             ["sft", "--demo", "--model", model_dir, "--out", tmp_path / "s"],
             ["generate", "--model", model_dir, "--prompt", "hi"],
             ["generate", "--model", full_run, "--prompt", "hi"]]
    for args in cases:
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err
        assert "is a reward model (sequence classification)" in err and "--judge" in err, (args, err)


def test_load_judge_refuses_what_is_not_a_reward_model_run(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "kind").write_text("sft")
    for path, what in [(tmp_path / "sft", "`minialign sft` run folder"), (tmp_path / "nope", "does not exist"),
                       (tmp_path, "not a minialign run folder")]:
        with pytest.raises(UserError, match="minialign rm") as info:
            load_judge(path)
        assert what in str(info.value)
