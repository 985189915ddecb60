"""Masked tokenization with Pythia's real tokenizer: exact boundaries, truncation, EOS as a target."""

from pathlib import Path

import pytest

from minialign.base.errors import UserError
from minialign.data import (
    PreferencePair,
    TokenizedExample,
    collate_pairs,
    collate_sft,
    load_preference_pairs,
    tokenize_pairs,
    tokenize_sft,
)

A = "\n\nAssistant:"


@pytest.fixture(scope="module")
def tok(shared_dir: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(shared_dir / "tokenizers/gpt-neox-20b/tokenizer.json"), eos_token="<|endoftext|>"
    )


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_hand_checked_sft_targets(tok):
    pair = PreferencePair("\n\nHuman: hi" + A, " Hello there", " Go away")
    (ex,) = tokenize_sft([pair], tok, max_length=64, max_prompt_length=32)
    # "\n" "\n" "Human" ":" " hi" "\n" "\n" "Ass" "istant" ":" | " Hello" " there" EOS
    assert ex.prompt_ids == [187, 187, 22705, 27, 14260, 187, 187, 6717, 5567, 27]
    assert ex.response_ids == [24387, 627, 0]
    batch = collate_sft([ex], pad_id=0)
    assert batch["input_ids"].tolist() == [[187, 187, 22705, 27, 14260, 187, 187, 6717, 5567, 27, 24387, 627, 0]]
    # position 9 (":") predicts " Hello", 10 predicts " there", 11 predicts EOS; the EOS itself predicts nothing
    assert batch["targets"].tolist() == [[-100] * 9 + [24387, 627, 0, -100]]
    assert batch["n_targets"] == 3


def test_no_merge_across_the_boundary(tok):
    prompt, response = "\n\nHuman: hi\n\nAssistant: ", "Hello"  # the space would merge into " Hello"
    joint = ids(tok, prompt + response)
    (ex,) = tokenize_sft([PreferencePair(prompt, response, "x")], tok, max_length=64, max_prompt_length=32)
    assert ex.prompt_ids == ids(tok, prompt) and ex.response_ids == ids(tok, response) + [0]
    assert ex.prompt_ids + ex.response_ids[:-1] != joint  # jointly, BPE would have merged across it


def test_pairs_share_the_prompt_and_end_with_eos(tok):
    pairs = load_preference_pairs("demo", split="test", limit=8)
    data = tokenize_pairs(pairs, tok, max_length=128, max_prompt_length=64)
    assert data.truncated == 0 and len(data) == 8
    for pair, t in zip(pairs, data):
        assert t.prompt_ids == ids(tok, pair.prompt)
        assert t.chosen_ids == ids(tok, pair.chosen) + [0] and t.rejected_ids == ids(tok, pair.rejected) + [0]


def test_truncation_keeps_the_prompt_end_and_cuts_responses(tok):
    prompt = "\n\nHuman: " + "one two three four five six seven eight nine ten " * 3 + A
    chosen, rejected = " " + "yes " * 20, " no"
    full_p, full_c = ids(tok, prompt), ids(tok, chosen) + [0]
    (t,) = tokenize_pairs([PreferencePair(prompt, chosen, rejected)], tok, max_length=20, max_prompt_length=8)
    assert t.prompt_ids == full_p[-8:] and tok.decode(t.prompt_ids) == " eight nine ten " + A
    assert t.chosen_ids == full_c[:12] and 0 not in t.chosen_ids  # cut at its end: no EOS
    assert t.rejected_ids == ids(tok, rejected) + [0]  # fits: untouched
    sft = tokenize_sft([PreferencePair(prompt, chosen, rejected), PreferencePair("P", " a", " b")], tok,
                       max_length=20, max_prompt_length=8)
    assert sft.truncated == 1 and len(sft[0].prompt_ids) + len(sft[0].response_ids) == 20
    real = tokenize_pairs(load_preference_pairs("demo", limit=50), tok, max_length=24, max_prompt_length=12)
    assert real.truncated > 0
    for t in real:
        assert len(t.prompt_ids) <= 12 and len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids)) <= 24


def test_eos_stays_a_target_when_pad_is_eos():
    short = TokenizedExample([5, 6, 7], [8, 9, 0])
    shorter = TokenizedExample([3], [4, 0])
    batch = collate_sft([short, shorter], pad_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [3, 4, 0, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 0, 0, 0, 0, 0]]
    assert batch["targets"].tolist() == [
        [-100, -100, 8, 9, 0, -100, -100, -100],
        [4, 0, -100, -100, -100, -100, -100, -100],
    ]
    assert batch["n_targets"] == 5 == int((batch["targets"] != -100).sum())


def test_dpo_collate_chosen_rows_first(tok):
    pairs = tokenize_pairs(load_preference_pairs("demo", limit=3), tok, max_length=128, max_prompt_length=64)
    batch = collate_pairs(pairs, pad_id=0, index=[10, 11, 12])
    assert batch["input_ids"].shape[0] == 6 and batch["n_pairs"] == 3 and batch["index"].tolist() == [10, 11, 12]
    for b, p in enumerate(pairs):
        n = len(p.prompt_ids)
        for row, response in ((b, p.chosen_ids), (b + 3, p.rejected_ids)):
            assert batch["input_ids"][row, : n + len(response)].tolist() == p.prompt_ids + response
            assert batch["targets"][row, n - 1 : n - 1 + len(response)].tolist() == response
            assert (batch["targets"][row, : n - 1] == -100).all()
            assert (batch["targets"][row, n - 1 + len(response) :] == -100).all()
    assert batch["n_targets"] == sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    assert collate_pairs(pairs, pad_id=0)["index"].tolist() == [0, 1, 2]


def test_bad_limits_and_missing_eos(tok):
    pairs = [PreferencePair("p", " a", " b")]
    with pytest.raises(UserError, match="max_prompt_length=64 must be .* smaller than max_length=64"):
        tokenize_pairs(pairs, tok, max_length=64, max_prompt_length=64)

    class NoEos:
        eos_token_id = None

    with pytest.raises(UserError, match="no EOS token"):
        tokenize_sft(pairs, NoEos(), max_length=64, max_prompt_length=32)


def test_keep_start_keeps_each_examples_first_tokens_as_trl_does(tok, shared_dir: Path):
    # TRL's SFT default (truncation_mode="keep_start"): input_ids[:max_length] of prompt + response + EOS, and an
    # example whose labels are all masked after that cut is dropped. Recomputed here from the untruncated ids.
    pairs = load_preference_pairs(str(shared_dir / "data/hh-rlhf/harmless-base/test.jsonl.gz"), rows="300:500")
    full = tokenize_sft(pairs, tok, max_length=100_000, max_prompt_length=50_000)
    length = 256
    data = tokenize_sft(pairs, tok, max_length=length, max_prompt_length=128, truncation="keep-start")
    kept = [f for f in full if len(f.prompt_ids) < length]
    assert 0 < data.dropped == len(full) - len(kept) and len(data) == len(kept)
    for want, got in zip(kept, data, strict=True):
        assert got.prompt_ids == want.prompt_ids  # whole, whatever --max-prompt-length says
        assert got.prompt_ids + got.response_ids == (want.prompt_ids + want.response_ids)[:length]
    assert data.truncated == sum(len(f.prompt_ids) + len(f.response_ids) > length for f in kept) > 0
    default = tokenize_sft(pairs, tok, max_length=length, max_prompt_length=128)
    assert default.dropped == 0 and len(default) == len(pairs)


def test_keep_start_refuses_data_it_would_leave_empty(tok):
    pair = PreferencePair("\n\nHuman: " + "word " * 40 + A, " yes", " no")
    with pytest.raises(UserError, match="--truncation keep-start.*1 training examples.*none keeps a response"):
        tokenize_sft([pair], tok, max_length=16, max_prompt_length=8, truncation="keep-start")
    with pytest.raises(UserError, match="1 held-out examples"):
        tokenize_sft([pair], tok, max_length=16, max_prompt_length=8, truncation="keep-start", label="held-out")
    with pytest.raises(UserError, match="truncation is 'keep-end'"):
        tokenize_sft([pair], tok, max_length=16, max_prompt_length=8, truncation="keep-end")


def test_the_sft_command_leaves_out_and_says_so(tmp_path, capsys):
    from minialign import cli

    def run(*flags):
        out = tmp_path / "-".join(flags or ("default",))
        assert cli.main(["sft", "--demo", "--limit", "32", "--eval-limit", "4", "--max-steps", "1", "--max-length", "32",
                         "--max-prompt-length", "16", *flags, "--out", str(out)]) == 0
        return capsys.readouterr().out

    assert "left out" not in run()
    said = run("--truncation", "keep-start")  # 11 of the 32 demo prompts are 32 tokens or longer
    assert "21 train / 4 eval examples" in said and "11 left out (train and eval): no response" in said, said
