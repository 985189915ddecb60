"""The training loop end to end on the demo data: learning, LoRA reference, resume, divergence, checkpoints, errors."""

from __future__ import annotations

import copy
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from cli_runs import (
    SMALL,
    THREADS,
    _one_thread,  # noqa: F401 (autouse fixture)
    demo_config,
    demo_pairs,
    evals,
    expect_user_error,
    launched,
    n_logged,
    read_metrics,
    run_cli,
    step_of,
    train_losses,
    wait_for,
)
from safetensors.torch import load_file

from minialign import cli
from minialign.commands import folders
from minialign.config.presets import load_run_config
from minialign.config.schema import DPOConfig, SFTConfig
from minialign.data import (
    batch_indices,
    collate_pairs,
    collate_sft,
    tokenize_pairs,
    tokenize_sft,
)
from minialign.modeling import lora
from minialign.modeling.models import load_model
from minialign.modeling.policy import TokenLogps
from minialign.ops import losses
from minialign.ops.losses import PreferenceLoss
from minialign.training import checkpoint
from minialign.training.batches import add_target_index
from minialign.training.optim import make_optimizer, make_scheduler
from minialign.training.tasks import DPOTask, SFTTask, adapter_reference, sequence_sums
from minialign.training.trackers import MetricsLog
from minialign.training.train import train

# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A brief full fine-tune of the tiny model (the demo preset's SFT), evaluated twice."""
    out = tmp_path_factory.mktemp("sft") / "run"
    torch.set_num_threads(THREADS)  # module fixtures run before the per-test thread setting
    assert run_cli("sft", "--demo", "--out", out, "--max-steps", 20, "--batch-size", 8, "--eval-every", 10,
                   "--eval-limit", 32) == 0
    return out


def test_sft_loss_falls(sft_run):
    rows = read_metrics(sft_run)
    losses_by_step = train_losses(rows)
    assert sorted(losses_by_step) == list(range(1, 21))
    values = [losses_by_step[s] for s in sorted(losses_by_step)]
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert last < first - 1.0, (first, last)
    held_out = evals(rows, "eval/loss")
    assert len(held_out) == 2 and held_out[-1] < held_out[0], held_out
    assert (sft_run / "final" / "model").is_dir()


def test_dpo_raises_held_out_reward_accuracy(sft_run, tmp_path):
    out = tmp_path / "dpo"
    assert run_cli("dpo", "--demo", "--sft", sft_run, "--out", out, "--max-steps", 16, "--batch-size", 8,
                   "--eval-every", 1, "--eval-limit", 48) == 0
    rows = read_metrics(out)
    accuracy = evals(rows, "eval/rewards/accuracies")
    margins = evals(rows, "eval/rewards/margins")
    assert len(accuracy) == 16
    assert accuracy[-1] > 0.5 and accuracy[-1] > accuracy[0], accuracy
    assert margins[-1] > margins[0] > 0, margins
    assert evals(rows, "eval/loss")[-1] < math.log(2)  # better than the untrained policy (loss = log 2)
    assert (out / "final" / "adapter" / "adapter_config.json").is_file()


def test_lora_reference_is_the_model_before_dpo():
    cfg = demo_config(DPOConfig, "dpo", limit=16, batch_size=4, max_steps=3, lr=1e-2)
    tokenizer, limits, raw = demo_pairs(cfg)
    pad = tokenizer.pad_token_id
    pairs = tokenize_pairs(raw, tokenizer, **limits)
    model = load_model("tiny", seed=cfg.seed)  # from scratch
    probe = add_target_index(collate_pairs(pairs[:6], pad_id=pad))
    with torch.no_grad():
        before = sequence_sums(TokenLogps(model), probe, normalise=False)
    base_weights = copy.deepcopy(model.state_dict())

    lora.apply_lora(model, lora.LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha))
    policy = TokenLogps(model)
    reference = adapter_reference(policy, normalise=False)
    task = DPOTask(reference, PreferenceLoss(beta=cfg.beta))
    collate = lambda idx: collate_pairs([pairs[i] for i in idx], pad_id=pad, index=idx)
    train(policy, task, range(len(pairs)), collate, cfg, None)

    with torch.no_grad():
        after_policy = sequence_sums(policy, probe, normalise=False)
        with lora.disabled(policy):
            after_disabled = sequence_sums(policy, probe, normalise=False)
    torch.testing.assert_close(reference(probe), before, rtol=0, atol=1e-5)
    torch.testing.assert_close(after_disabled, before, rtol=0, atol=1e-5)
    assert (after_policy - before).abs().max() > 1e-2  # the adapters did learn something
    after_weights = model.state_dict()
    for name, value in base_weights.items():  # and the base weights never moved
        torch.testing.assert_close(after_weights[name], value, rtol=0, atol=0)


# ----------------------------------------------------------------------------- resume after a kill / SIGTERM


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    steps = 24  # 8 steps an epoch: the resumed part crosses epoch boundaries
    args = ["sft", *SMALL, "--max-steps", steps, "--save-every", 1, "--keep-last", 2]
    killed = tmp_path / "killed"
    with launched([*args, "--out", killed], tmp_path / "killed.log") as proc:
        wait_for(lambda: step_of(checkpoint.latest_checkpoint(killed)) >= 4, proc, tmp_path / "killed.log",
                 "step 4 was checkpointed")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    stopped_at = step_of(checkpoint.latest_checkpoint(killed))
    assert 4 <= stopped_at < steps and not (killed / "final").exists(), "the run was not killed mid-way"

    assert run_cli("sft", "--resume", killed) == 0
    straight = tmp_path / "straight"
    assert run_cli(*args, "--out", straight) == 0

    resumed, reference = train_losses(read_metrics(killed)), train_losses(read_metrics(straight))
    assert sorted(reference) == list(range(1, steps + 1)) and sorted(resumed) == sorted(reference)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), f"step {step}"
    assert step_of(checkpoint.latest_checkpoint(killed)) == steps


def test_sigterm_saves_a_checkpoint_and_exits_nonzero(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    with launched(["sft", *SMALL, "--max-steps", 500, "--out", out], log) as proc:  # --save-every 0: only at the end
        wait_for(lambda: n_logged(out) >= 2, proc, log, "two steps were logged")
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    output = log.read_text()
    assert status == 130, output[-2000:]  # handled (not killed by the signal), then the CLI's "interrupted" status
    assert "checkpoint saved" in output
    saved = checkpoint.latest_checkpoint(out)
    assert saved is not None and not (out / "final").exists()
    last_step = max(train_losses(read_metrics(out)))
    assert step_of(saved) == last_step < 500  # the step that was running when the signal came
    progress = load_into_fresh_policy(out, saved)
    assert progress["step"] == last_step


def load_into_fresh_policy(run_dir: Path, path: Path) -> dict:
    """``checkpoint.load_checkpoint`` into a freshly built policy, optimizer and scheduler of the run's config."""
    cfg = load_run_config(run_dir, SFTConfig)
    policy = TokenLogps(load_model(cfg.model, seed=cfg.seed + 1))  # other weights than the run started from
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg, torch.device("cpu"))
    progress = checkpoint.load_checkpoint(path, policy, optimizer, make_scheduler(optimizer, 10, cfg))
    weights = checkpoint.trainable_state(policy)
    saved = load_file(str(path / "trainable.safetensors"))
    assert weights.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(weights[name], tensor), name
    assert optimizer.state  # Adam moments restored
    return progress


# ----------------------------------------------------------------------------- divergence


def nan_from_call(k: int, make_bad):
    """A replacement for ``losses.sft_loss`` that turns bad from its k-th call (= training step k) on."""
    calls = {"n": 0}
    good = losses.sft_loss

    def sft_loss(logps):
        calls["n"] += 1
        loss = good(logps)
        return make_bad(loss) if calls["n"] >= k else loss

    return sft_loss


@pytest.mark.parametrize("what,make_bad", [
    ("loss", lambda loss: loss * float("nan")),
    # a finite loss whose gradient is NaN: d sqrt(u)/du = inf at u = 0, times du/dloss = 0
    ("gradient norm", lambda loss: loss + torch.sqrt(loss * 0)),
])
def test_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, what, make_bad):
    monkeypatch.setattr(losses, "sft_loss", nan_from_call(4, make_bad))
    out = tmp_path / "run"
    status = run_cli("sft", *SMALL, "--max-steps", 10, "--save-every", 1, "--out", out)
    err = capsys.readouterr().err
    assert status == 2
    assert f"The {what} became nan at step 4" in err and "step-000003" in err and "Traceback" not in err
    last = checkpoint.latest_checkpoint(out)
    assert step_of(last) == 3 and not (out / "final").exists()
    assert load_into_fresh_policy(out, last)["step"] == 3


def test_training_diverged_is_raised_by_the_loop(monkeypatch):
    from minialign.training.health import TrainingDiverged

    monkeypatch.setattr(losses, "sft_loss", nan_from_call(2, lambda loss: loss * float("nan")))
    cfg = demo_config(SFTConfig, "sft", limit=16, batch_size=4, max_steps=5)
    model, examples, collate = sft_pieces(cfg)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 2"):
        train(TokenLogps(model), SFTTask(), range(len(examples)), collate, cfg, None)


# ----------------------------------------------------------------------------- checkpoints and metrics files


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        checkpoint.save_checkpoint(tmp_path, step, model, optimizer, scheduler, {"step": step}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-000004", "step-000005"]

    half = tmp_path / "checkpoints" / "step-000009.tmp"  # a save that was killed half-way
    half.mkdir()
    (half / "progress.json").write_text('{"step": 9}')
    (half / "trainable.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-000005"

    with torch.no_grad():
        model.weight.zero_()
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), model, optimizer, scheduler) == {"step": 5}
    assert torch.all(model.weight == 5)

    checkpoint.save_checkpoint(tmp_path, 6, model, optimizer, scheduler, {"step": 6}, keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step-000005", "step-000006"]


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.pt", "progress.json"])
@pytest.mark.parametrize("content", [b"\x00" * 10, b""])
def test_damaged_checkpoint_is_a_user_error(tmp_path, damaged, content):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = checkpoint.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"step": 1}, keep_last=1)
    (path / damaged).write_bytes(content)
    with pytest.raises(checkpoint.UserError, match="damaged or incomplete"):
        checkpoint.load_checkpoint(path, model, optimizer, scheduler)


def test_metrics_rows_after_a_torn_line_start_on_a_new_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # killed in the middle of a write
    MetricsLog(path).write([{"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}])
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines[2:]] == [{"step": 2, "loss": 1.5}, {"step": 3, "loss": 1.25}]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("flags,match", [
    (["dpo", "--beta", "0"], "beta must be > 0"),
    (["dpo", "--beta", "-0.1"], "beta must be > 0"),
    (["sft", "--lr", "0"], "lr must be > 0"),
    (["dpo", "--lr=-1e-4"], "lr must be > 0"),
    (["dpo", "--label-smoothing", "0.5"], "label_smoothing must be in [0, 0.5)"),
    (["dpo", "--label-smoothing", "-0.1"], "label_smoothing must be in [0, 0.5)"),
])
def test_invalid_hyperparameters_are_refused(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    expect_user_error(capsys, flags[0], "--demo", *flags[1:], "--out", out, match=match)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_batch_larger_than_the_data_is_refused(tmp_path, capsys, kind):
    expect_user_error(capsys, kind, "--demo", "--limit", 4, "--batch-size", 8, "--out", tmp_path / "run",
                      match="only 4")


def test_accumulation_larger_than_the_data_is_refused(tmp_path, capsys):
    # 8 examples make one batch of 8, but a step of 2 x 8 needs two: this used to crash with an IndexError
    expect_user_error(capsys, "sft", "--demo", "--limit", 8, "--batch-size", 8, "--grad-accum", 2,
                      "--out", tmp_path / "run", match="needs 16 training examples")


def test_existing_run_folder_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    folders.prepare_run_dir(demo_config(SFTConfig, "sft", out=str(out)), "sft", overwrite=False)
    expect_user_error(capsys, "sft", "--demo", "--out", out, "--lr", "1e-3", match="different config")
    err = expect_user_error(capsys, "sft", "--demo", "--out", out, match="run with this config")
    assert "--resume" in err and "--overwrite" in err
    assert run_cli("sft", *SMALL, "--max-steps", 1, "--out", out, "--overwrite") == 0
    assert load_run_config(out, SFTConfig).max_steps == 1


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    expect_user_error(capsys, "sft", "--resume", tmp_path / "stuff", match="not a minialign run folder")
    expect_user_error(capsys, "dpo", "--resume", tmp_path / "missing", match="not a minialign run folder")


# ----------------------------------------------------------------------------- gradient accumulation


def sft_pieces(cfg: SFTConfig):
    tokenizer, limits, raw = demo_pairs(cfg)
    examples = tokenize_sft(raw, tokenizer, **limits)
    model = load_model("tiny", seed=cfg.seed)
    collate = lambda idx: collate_sft([examples[i] for i in idx], pad_id=tokenizer.pad_token_id)
    return model, examples, collate


def one_step(batch_size: int, grad_accum: int):
    cfg = demo_config(SFTConfig, "sft", limit=32, batch_size=batch_size, grad_accum=grad_accum, max_steps=1, lr=1e-3)
    model, examples, collate = sft_pieces(cfg)
    last = train(TokenLogps(model), SFTTask(), range(len(examples)), collate, cfg, None)
    return last, {n: p.detach().clone() for n, p in model.named_parameters()}, collate


def test_gradient_accumulation_normalises_by_the_tokens_of_the_whole_step():
    whole, whole_params, collate = one_step(8, 1)
    split, split_params, _ = one_step(4, 2)
    # the two micro-batches hold different numbers of target tokens, so a per-micro-batch mean would differ
    first_two = batch_indices(32, 4, seed=0, epoch=0)[:2]
    assert collate(first_two[0])["n_targets"] != collate(first_two[1])["n_targets"]
    assert split["loss"] == pytest.approx(whole["loss"], abs=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert whole_params.keys() == split_params.keys()
    for name in whole_params:
        torch.testing.assert_close(split_params[name], whole_params[name], rtol=0, atol=1e-5, msg=name)


def test_precomputed_reference_gives_the_same_losses_and_held_out_metrics(tmp_path):
    """--precompute-ref caches training *and* held-out pairs: every logged number equals the live reference's."""
    rows = {}
    for name, extra in (("live", []), ("cached", ["--precompute-ref"])):
        out = tmp_path / name
        assert cli.main(["dpo", "--demo", "--out", str(out), "--max-steps", "4", "--eval-every", "2", *extra]) == 0
        rows[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "cached" / "ref_logps.safetensors").is_file()
    for live, cached in zip(rows["live"], rows["cached"], strict=True):
        for key in ("loss", "eval/loss", "eval/rewards/margins"):
            if key in live:
                assert abs(live[key] - cached[key]) < 1e-5, (key, live, cached)
