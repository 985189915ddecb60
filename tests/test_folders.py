"""Never train on nothing, never mix runs: a model folder's tokenizer, data that tokenizes to nothing, a zero
gradient, folder kinds (a command never writes into, or resumes, another command's folder) and `--overwrite`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cli_runs import SMALL, expect_user_error, read_metrics, run_cli
from tokenizers import Tokenizer, models, pre_tokenizers

from minialign.base.errors import UserError
from minialign.data import load_preference_pairs
from minialign.data.tokenize import TokenizedExample, TokenizedPair, check_tokenized
from minialign.modeling.models import has_tokenizer, load_tokenizer
from minialign.ops import losses


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder``, by relative path: equal snapshots mean nothing was written, moved or deleted."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """One step of the demo SFT (full fine-tuning: final/model, and the run's tokenizer in final/tokenizer)."""
    out = tmp_path_factory.mktemp("kinds") / "sft"
    assert run_cli("sft", *SMALL, "--max-steps", 1, "--out", out) == 0
    return out


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kinds") / "dpo"
    assert run_cli("dpo", *SMALL, "--max-steps", 1, "--out", out) == 0
    return out


# ----------------------------------------------------------------------------- a model folder's tokenizer


def test_a_run_model_folder_trains_with_the_tokenizer_beside_it(sft_run, tmp_path, capsys):
    """The issue's repro: `dpo --model RUN/final/model` read an empty tokenizer from the model folder (one token
    per example, grad norm 0, loss log 2). Now it reads RUN/final/tokenizer and trains on the real tokens."""
    model, saved = sft_run / "final" / "model", sft_run / "final" / "tokenizer"
    assert not has_tokenizer(model) and has_tokenizer(saved)  # save_pretrained wrote no tokenizer with the weights
    reference = load_tokenizer(str(saved))
    assert load_tokenizer(str(model)).get_vocab() == reference.get_vocab()
    out = tmp_path / "dpo"
    assert run_cli("dpo", "--model", model, "--dataset", "demo", "--limit", 32, "--eval-limit", 8, "--batch-size", 4,
                   "--max-steps", 2, "--log-every", 1, "--out", out) == 0
    assert "using the one saved beside it" in capsys.readouterr().err
    rows = [r for r in read_metrics(out) if "loss" in r]
    # every sequence of step 1 is at least as long as the shortest demo sequence under the run's tokenizer
    pairs = load_preference_pairs("demo", split="train", limit=32)
    shortest = min(len(reference(p.prompt + side).input_ids) for p in pairs for side in (p.chosen, p.rejected))
    assert rows[0]["tokens"] >= 4 * 2 * shortest > 4 * 2 * 2
    assert all(r["grad_norm"] > 0 for r in rows) and rows[-1]["rewards/chosen"] != 0.0
    assert load_tokenizer(str(out / "final" / "tokenizer")).get_vocab() == reference.get_vocab()
    assert run_cli("generate", "--model", model, "--prompt", "Hello", "--max-new-tokens", 2) == 0


def test_a_model_folder_without_any_tokenizer_is_refused(sft_run, tmp_path, capsys):
    bare = tmp_path / "weights"
    shutil.copytree(sft_run / "final" / "model", bare)
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(str(bare))
    out = tmp_path / "dpo"
    err = expect_user_error(capsys, "dpo", "--model", bare, "--dataset", "demo", "--out", out, match="no tokenizer")
    assert "--tokenizer" in err and not out.exists()


# ----------------------------------------------------------------------------- data that tokenizes to nothing


@pytest.fixture(scope="module")
def empty_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE that knows only EOS: every text tokenizes to no tokens, as with the empty tokenizer."""
    tok = Tokenizer(models.BPE(vocab={"<|endoftext|>": 0}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("kind", ["sft", "dpo", "rm"])
def test_data_that_tokenizes_to_nothing_is_refused_before_anything_is_written(kind, empty_tokenizer, tmp_path,
                                                                              capsys):
    assert load_tokenizer(str(empty_tokenizer))("Human: hello there").input_ids == []
    out = tmp_path / "run"
    err = expect_user_error(capsys, kind, *SMALL, "--tokenizer", empty_tokenizer, "--out", out,
                            match="tokenizes to almost nothing")
    assert f"tokenizer '{empty_tokenizer}'" in err and "vocabulary of 1" in err
    assert "median example has 1 target token(s)" in err and "0 prompt token(s)" in err  # EOS alone
    assert not out.exists()


def test_the_target_token_threshold():
    sft = lambda *n: [TokenizedExample([5], [1] * k) for k in n]
    check_tokenized(sft(1, 2, 2), None, "t")  # median 2: enough
    with pytest.raises(UserError, match="median example has 1 target"):
        check_tokenized(sft(1, 1, 2), type("T", (), {"__len__": lambda self: 7})(), "t")
    pair = lambda c, r: TokenizedPair([5], [1] * c, [1] * r)
    check_tokenized([pair(2, 3), pair(4, 2), pair(1, 1)], None, "t")
    with pytest.raises(UserError, match="vocabulary of 7"):  # a pair counts its shorter response
        check_tokenized([pair(1, 3), pair(4, 1), pair(2, 2)], type("T", (), {"__len__": lambda self: 7})(), "t")


def test_a_zero_gradient_on_the_first_steps_stops_the_run(tmp_path, monkeypatch, capsys):
    real = losses.sft_loss
    monkeypatch.setattr(losses, "sft_loss", lambda logps: real(logps) * 0)  # no gradient reaches any weight
    out = tmp_path / "run"
    expect_user_error(capsys, "sft", *SMALL, "--max-steps", 4, "--log-every", 2, "--out", out,
                      match="gradient norm was exactly 0 on each of the first 2 steps")
    assert [r["grad_norm"] for r in read_metrics(out) if "loss" in r] == [0.0, 0.0]
    assert not (out / "final").exists()


# ----------------------------------------------------------------------------- folder kinds


def test_resuming_a_run_with_another_command_is_refused(sft_run, dpo_run, capsys):
    """The repro: `dpo --resume SFT_RUN` trained DPO inside the SFT run and replaced its results."""
    before = snapshot(sft_run), snapshot(dpo_run)
    err = expect_user_error(capsys, "dpo", "--resume", sft_run, match="holds a `minialign sft` run")
    assert f"`minialign sft --resume {sft_run}`" in err
    err = expect_user_error(capsys, "rm", "--resume", dpo_run, match="holds a `minialign dpo` run")
    assert f"`minialign dpo --resume {dpo_run}`" in err
    assert (snapshot(sft_run), snapshot(dpo_run)) == before


def test_writing_into_another_commands_folder_is_refused(sft_run, dpo_run, tmp_path, capsys):
    before = snapshot(sft_run), snapshot(dpo_run)
    for argv, folder, kind in [(["dpo", *SMALL], sft_run, "sft"), (["rm", *SMALL], sft_run, "sft"),
                               (["run", "--demo"], dpo_run, "dpo"), (["sft", *SMALL], dpo_run, "dpo"),
                               (["eval", "--policy", dpo_run, "--n", 2], sft_run, "sft")]:
        err = expect_user_error(capsys, *argv, "--out", folder, match=f"--out {folder} holds a `minialign {kind}` run")
        assert "--overwrite" in err
    assert (snapshot(sft_run), snapshot(dpo_run)) == before


def test_overwrite_replaces_a_run_of_another_kind_whole(tmp_path):
    out = tmp_path / "x"
    assert run_cli("sft", *SMALL, "--max-steps", 2, "--save-every", 1, "--out", out) == 0
    assert (out / "checkpoints").is_dir() and (out / "final" / "model").is_dir()
    assert run_cli("rm", *SMALL, "--max-steps", 1, "--out", out, "--overwrite") == 0
    assert (out / "kind").read_text() == "rm" and not (out / "checkpoints").exists()
    config = json.loads((out / "final" / "model" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1]  # the SFT rows went with it


def test_a_new_experiment_does_not_adopt_runs_in_its_stage_folders(tmp_path, capsys):
    out = tmp_path / "exp"
    assert run_cli("sft", *SMALL, "--max-steps", 1, "--out", out / "sft") == 0
    before = snapshot(out)
    err = expect_user_error(capsys, "run", "--demo", "--out", out, match=f"{out / 'sft'} holds a `minialign sft` run")
    assert "take it as its sft stage" in err and "--overwrite" in err
    assert snapshot(out) == before

