"""`--resume` with flags: safe changes extend or re-tune a run (said on stdout), others are refused field by field;
a finished run is left as it is; and a start refused for a bad setting leaves nothing behind, so the fixed retry
just runs."""

from __future__ import annotations

import math

import pytest
from cli_runs import SMALL, expect_user_error, read_metrics, run_cli, train_losses
from safetensors.torch import load_file
from test_folders import snapshot

from minialign.commands.recipes import load_run_config
from minialign.config.schema import DPOConfig, SFTConfig
from minialign.training import checkpoint


def cosine(step: int, total: int) -> float:
    """The default schedule's factor with no warm-up steps (0.05 x 4 steps rounds down to 0)."""
    return 0.5 * (1 + math.cos(math.pi * step / total))


def test_more_steps_extend_a_run_on_its_recomputed_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("sft", *SMALL, "--max-steps", 2, "--save-every", 2, "--log-every", 1, "--out", out) == 0
    at_2 = load_file(str(checkpoint.latest_checkpoint(out) / "trainable.safetensors"))
    capsys.readouterr()
    assert run_cli("sft", "--resume", out, "--max-steps", 4, "--save-every", 1) == 0
    said = capsys.readouterr().out
    assert "max_steps 2 -> 4: the run now ends at step 4 instead of 2" in said and "recomputed over 4 steps" in said
    assert "resuming" in said and "save_every 2 -> 1" in said
    cfg = load_run_config(out, SFTConfig)
    assert (cfg.max_steps, cfg.save_every) == (4, 1)
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    lr = cfg.lr
    assert [r["lr"] for r in rows] == pytest.approx([lr * cosine(0, 2), lr * cosine(1, 2), lr * cosine(2, 4),
                                                     lr * cosine(3, 4)], rel=1e-9)
    # Step 3 ran at the new schedule's rate: at the old one's (cosine(2, 2) = 0) it would not have moved a weight.
    at_3 = load_file(str(out / "checkpoints" / "step-000003" / "trainable.safetensors"))
    assert any(not at_2[name].equal(at_3[name]) for name in at_2)
    before = snapshot(out)
    expect_user_error(capsys, "sft", "--resume", out, "--max-steps", 3, match="cannot be shortened")
    assert snapshot(out) == before


def test_an_extended_run_trains_as_one_longer_run(tmp_path):
    """With a constant rate the schedule does not change, so the extension must give the longer run's losses."""
    flags = [*SMALL, "--schedule", "constant", "--warmup-ratio", 0, "--log-every", 1]
    whole, extended = tmp_path / "whole", tmp_path / "extended"
    assert run_cli("sft", *flags, "--max-steps", 4, "--out", whole) == 0
    assert run_cli("sft", *flags, "--max-steps", 2, "--save-every", 2, "--out", extended) == 0
    assert run_cli("sft", "--resume", extended, "--max-steps", 4) == 0
    assert train_losses(read_metrics(extended)) == train_losses(read_metrics(whole))


def test_a_finished_run_is_left_as_it_is_and_flags_are_never_dropped(tmp_path, capsys):
    """The repro: `dpo --resume RUN --epochs 3 --lr 5e-3` said "done" and trained nothing."""
    out = tmp_path / "dpo"
    assert run_cli("dpo", *SMALL, "--max-steps", 2, "--out", out) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run_cli("dpo", "--resume", out) == 0
    assert "finished at step 2; nothing left to train" in capsys.readouterr().out
    err = expect_user_error(capsys, "dpo", "--resume", out, "--epochs", 3, "--lr", "5e-3", match="lr 2e-3 -> 5e-3")
    assert "epochs 2 -> 3" in err and "max_steps" in err  # what may change is listed
    expect_user_error(capsys, "dpo", "--resume", out, "--max-steps", 4, match="kept no checkpoint of that step")
    expect_user_error(capsys, "dpo", "--resume", out, "--keep-last", 3, match="keep_last 2 -> 3 would change nothing")
    expect_user_error(capsys, "dpo", "--resume", out, "--demo", match="--resume and --demo are alternatives")
    expect_user_error(capsys, "dpo", "--resume", out, "--overwrite", match="--overwrite starts a new one")
    assert snapshot(out) == before


def test_a_start_refused_for_a_bad_setting_leaves_nothing_so_the_fixed_retry_runs(tmp_path, capsys):
    """The repro: `--lora-r 0` failed after writing the run folder, and the retry with `--lora-r 8` was refused."""
    out = tmp_path / "run"
    expect_user_error(capsys, "dpo", *SMALL, "--lora-r", 0, "--out", out, match="'r' must be a positive integer")
    assert not out.exists()
    # found only once the model is loaded: the folder is written after that
    expect_user_error(capsys, "dpo", *SMALL, "--lora-targets", "nosuch", "--out", out, match="matched no linear layer")
    assert not out.exists()
    expect_user_error(capsys, "dpo", *SMALL, "--model", tmp_path / "missing", "--tokenizer", "demo", "--out", out,
                      match="was not found")
    assert not out.exists()
    assert run_cli("dpo", *SMALL, "--lora-r", 8, "--max-steps", 1, "--out", out) == 0
    assert load_run_config(out, DPOConfig).lora_r == 8 and (out / "final" / "adapter").is_dir()
