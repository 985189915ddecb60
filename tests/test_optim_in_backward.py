"""--optim-in-backward (AdamW stepped by per-parameter hooks inside backward) and --loss-chunk-size.

The reference for optim-in-backward is plain AdamW through the same loop with clipping off: the same
parameters after every step, checkpoints interchangeable with it, resume equal to an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from minialign import cli
from minialign.base.dist import launched_world
from minialign.base.errors import UserError
from minialign.config.presets import build, load_yaml, preset
from minialign.config.schema import SFTConfig, TrainConfig
from minialign.data import collate_sft, load_preference_pairs, tokenize_sft
from minialign.modeling.models import load_model, load_tokenizer
from minialign.modeling.policy import TokenLogps
from minialign.ops import logprobs, losses
from minialign.training import train as train_module
from minialign.training.batches import add_target_index
from minialign.training.bench import measure
from minialign.training.health import TrainingDiverged
from minialign.training.optim import InBackwardAdamW, make_optimizer, measure_first
from minialign.training.tasks import SFTTask
from minialign.training.train import train
from tests.conftest import torch_threads


@pytest.fixture(autouse=True)
def _one_thread():  # as tests/cli_runs.py: the tiny model is as fast on one thread, and never stalls
    with torch_threads(1):
        yield


def config(**overrides) -> SFTConfig:
    base = dict(limit=16, batch_size=4, max_steps=4, lr=1e-3, weight_decay=0.01, max_grad_norm=0.0)
    return build(SFTConfig, load_yaml(preset("sft-demo"), SFTConfig), {**base, **overrides})


def sft_pieces(cfg: SFTConfig):
    """The tiny model (full fine-tuning), the first ``cfg.limit`` demo examples and their collate."""
    tokenizer = load_tokenizer("demo")
    raw = load_preference_pairs("demo", split="train", limit=cfg.limit)
    examples = tokenize_sft(raw, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    collate = lambda idx: collate_sft([examples[i] for i in idx], pad_id=tokenizer.pad_token_id)
    return load_model("tiny", seed=cfg.seed), examples, collate


def run(cfg: SFTConfig, run_dir: Path | None = None, resume_from: Path | None = None):
    model, examples, collate = sft_pieces(cfg)
    last = train(TokenLogps(model), SFTTask(), range(len(examples)), collate, cfg, run_dir, resume_from=resume_from)
    return last, {n: p.detach().clone() for n, p in model.named_parameters()}, model


def assert_same_params(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "loss" in r}


# ----------------------------------------------------------------------------- same numbers as plain AdamW


def test_same_parameters_as_plain_adamw_and_no_gradient_is_kept(monkeypatch):
    plain_last, plain, _ = run(config())

    after_backward = []  # for every step: the parameters that still held a gradient when the loop got control back
    real = train_module.grad_norm_step

    def spy(optimizer, params, max_norm):
        assert isinstance(optimizer, InBackwardAdamW)
        after_backward.append([p for p in params if p.grad is not None])
        return real(optimizer, params, max_norm)

    monkeypatch.setattr(train_module, "grad_norm_step", spy)
    fused_last, fused, model = run(config(optim_in_backward=True))

    assert after_backward == [[]] * 4  # every gradient was freed inside backward, at every step
    assert_same_params(fused, plain)
    assert fused_last["loss"] == pytest.approx(plain_last["loss"], abs=1e-6)
    # the norm is summed on the device from each hook's per-parameter norm: the norm of the whole gradient
    assert fused_last["grad_norm"] == pytest.approx(plain_last["grad_norm"], rel=1e-5)
    assert fused_last["grad_norm"] > 0
    # the hooks are gone once training is over: a later backward leaves ordinary gradients and the weights alone
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, examples, collate = sft_pieces(config())
    loss, _ = SFTTask().loss(TokenLogps(model), add_target_index(collate([0, 1])))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert_same_params({n: p.detach() for n, p in model.named_parameters()}, before, atol=0)


def test_one_gradient_at_a_time_and_state_dict_is_adamw():
    """A hook registered before the optimizer's sees how many gradients are alive when each one is complete."""
    model, examples, collate = sft_pieces(config())
    params = list(model.parameters())
    alive = []
    for p in params:
        p.register_post_accumulate_grad_hook(lambda _: alive.append(sum(q.grad is not None for q in params)))
    optimizer = make_optimizer(params, config(optim_in_backward=True), torch.device("cpu"))
    loss, _ = SFTTask().loss(TokenLogps(model), add_target_index(collate([0, 1, 2])))
    loss.backward()
    assert len(alive) == len(params) and max(alive) == 1
    assert all(p.grad is None for p in params)
    state = optimizer.state_dict()  # AdamW's own format: one entry per parameter, the usual keys
    assert len(state["state"]) == len(params) and set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(state["state"][0]["step"]) == 1
    plain = torch.optim.AdamW(params, lr=1e-3)
    plain.load_state_dict(state)  # and back: interchangeable with the plain optimizer
    optimizer.remove_hooks()


@pytest.mark.parametrize("fused", [False, True])  # True: the CUDA path (the fused kernel's grad_scale), on a CPU
def test_clipping_scales_each_step_by_the_previous_steps_norm(fused):
    """Against AdamW stepped after backward over gradients scaled by hand (float64 norms): step 0 by min(1, c / |g_0|)
    (measured first, as clip_grad_norm_ would), step t by min(1, c / |g_(t-1)|). No clipping, or a clip by the step's
    own norm after step 0, moves the weights elsewhere."""
    cfg = config(optim_in_backward=True, max_grad_norm=0.05)
    model, examples, collate = sft_pieces(cfg)
    reference, _, _ = sft_pieces(cfg)  # the same seed: the same initial weights
    batches = [add_target_index(collate([i, i + 1])) for i in range(0, 8, 2)]
    params = list(model.parameters())
    fused_opt = InBackwardAdamW(params, max_norm=0.05, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    plain = torch.optim.AdamW(list(reference.parameters()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    copies = [p.detach().clone().requires_grad_() for p in params]  # a checkpoint of the other kernel, stepped once
    other = torch.optim.AdamW(copies, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=not fused)
    for p in copies:
        p.grad = torch.zeros_like(p)
    other.step()
    fused_opt.load_state_dict(other.state_dict())
    assert fused_opt.param_groups[0]["fused"] is fused  # this device's kernel, not the checkpoint's
    fused_opt.state.clear()  # the moments start empty, as the reference's do
    norms = []
    for batch in batches:
        backward = lambda: SFTTask().loss(TokenLogps(model), batch)[0].backward()  # noqa: E731
        measure_first(fused_opt, backward)
        backward()
        logged = float(fused_opt.take_grad_norm())
        SFTTask().loss(TokenLogps(reference), batch)[0].backward()
        grads = [p.grad for p in reference.parameters()]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))
        assert logged == pytest.approx(norm, rel=1e-5)  # logged before clipping, as clip_grad_norm_ returns it
        for g in grads:
            g.mul_(min(1.0, 0.05 / ((norms or [norm])[-1] + 1e-6)))
        plain.step()
        plain.zero_grad()
        norms.append(norm)
    assert min(norms) > 0.05  # clipping acted on every step
    assert not fused_opt.needs_norm  # measured once, then known
    fused_opt.remove_hooks()
    assert_same_params({n: p.detach() for n, p in model.named_parameters()},
                       {n: p.detach() for n, p in reference.named_parameters()}, atol=1e-6)
    assert float(fused_opt.state_dict()["last_grad_norm"]) == pytest.approx(norms[-1], rel=1e-5)


def test_a_step_without_a_known_norm_is_clipped_exactly_as_clip_grad_norm(monkeypatch):
    """The first step of a run, and the first after resuming from a plain AdamW checkpoint (which holds no norm),
    are measured first: the weights equal plain AdamW with clip_grad_norm_ at that step. Measured once a run, and
    never without clipping (each measurement is one more take_grad_norm than steps)."""
    clip = dict(max_grad_norm=0.05)
    _, plain, _ = run(config(max_steps=1, **clip))
    _, ours, _ = run(config(optim_in_backward=True, max_steps=1, **clip))
    assert_same_params(ours, plain)
    calls, real = [], InBackwardAdamW.take_grad_norm
    monkeypatch.setattr(InBackwardAdamW, "take_grad_norm", lambda self: calls.append(1) or real(self))
    for norm, expected in ((0.05, 4), (0.0, 3)):
        calls.clear()
        run(config(optim_in_backward=True, max_steps=3, max_grad_norm=norm))
        assert len(calls) == expected, norm


def test_the_measuring_pass_draws_the_same_dropout_masks():
    """With dropout, the measured norm is the real pass's only if the random state is restored after measuring."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 1))
    reference = copy.deepcopy(net)
    x = torch.randn(16, 8)
    optimizer = InBackwardAdamW(list(net.parameters()), max_norm=0.01, lr=1e-2)
    plain = torch.optim.AdamW(list(reference.parameters()), lr=1e-2)
    torch.manual_seed(1)
    backward = lambda: net(x).square().mean().backward()  # noqa: E731
    measure_first(optimizer, backward)
    backward()
    measured = float(optimizer.take_grad_norm())
    torch.manual_seed(1)
    reference(x).square().mean().backward()
    norm = float(torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.01))
    plain.step()
    optimizer.remove_hooks()
    assert measured == pytest.approx(norm, rel=1e-6) and norm > 0.01
    assert_same_params(dict(net.named_parameters()), dict(reference.named_parameters()))


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_resume_from_a_plain_checkpoint_measures_its_first_step(tmp_path, clip):
    cfg = dict(max_steps=4, save_every=3, keep_last=2, max_grad_norm=clip)
    for folder in ("plain", "resumed"):
        (tmp_path / folder).mkdir()
    _, straight, _ = run(config(**cfg), tmp_path / "plain")
    point = tmp_path / "plain" / "checkpoints" / "step-000003"
    _, resumed, _ = run(config(optim_in_backward=True, **cfg), tmp_path / "resumed", resume_from=point)
    assert_same_params(resumed, straight)  # step 4 clipped by its own norm, as the plain run clipped it


# ----------------------------------------------------------------------------- checkpoints and resume


@pytest.mark.parametrize("first,clip", [("optim_in_backward", 0.0), ("plain", 0.0), ("optim_in_backward", 0.05)])
def test_resume_matches_an_uninterrupted_run(tmp_path, first, clip):
    """6 steps straight vs resumed from the step-3 checkpoint (written by either optimizer: one format; with
    clipping, the coefficient the next step needs travels in the checkpoint)."""
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight_dir.mkdir()
    resumed_dir.mkdir()
    cfg = dict(max_steps=6, save_every=3, keep_last=2, warmup_ratio=0.3, max_grad_norm=clip)  # the LR changes
    _, straight, _ = run(config(optim_in_backward=first == "optim_in_backward", **cfg), straight_dir)
    point = straight_dir / "checkpoints" / "step-000003"
    assert point.is_dir()
    _, resumed, _ = run(config(optim_in_backward=True, **cfg), resumed_dir, resume_from=point)
    assert_same_params(resumed, straight)
    a, b = metrics(straight_dir), metrics(resumed_dir)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6), step
        assert b[step]["lr"] == pytest.approx(a[step]["lr"], rel=1e-12), step
    if clip:
        assert min(r["grad_norm"] for r in a.values()) > clip  # every step's gradient was clipped (the norm travels)


# ----------------------------------------------------------------------------- divergence is still caught


@pytest.mark.parametrize("what,make_bad", [
    ("loss", lambda loss: loss * float("nan")),
    ("gradient norm", lambda loss: loss + torch.sqrt(loss * 0)),  # finite loss, NaN gradient
])
def test_nan_stops_the_run(monkeypatch, what, make_bad):
    good, calls = losses.sft_loss, {"n": 0}

    def sft_loss(logps):
        calls["n"] += 1
        return make_bad(good(logps)) if calls["n"] >= 2 else good(logps)

    monkeypatch.setattr(losses, "sft_loss", sft_loss)
    with pytest.raises(TrainingDiverged, match=f"The {what} became nan at step 2"):
        run(config(optim_in_backward=True, max_steps=4))


# ----------------------------------------------------------------------------- the CLI and bad input


def test_cli_run_with_optim_in_backward_and_a_loss_chunk_size(tmp_path, monkeypatch):
    chunk_sizes = set()
    real = logprobs.token_logps

    def spy(hidden, weight, targets, chunk_size=None, fused=False):
        chunk_sizes.add(chunk_size)
        return real(hidden, weight, targets, chunk_size, fused)

    monkeypatch.setattr(logprobs, "token_logps", spy)
    out = tmp_path / "run"
    assert cli.main(["sft", "--demo", "--batch-size", "4", "--limit", "16", "--eval-limit", "4", "--max-steps", "2",
                     "--optim-in-backward", "--max-grad-norm", "0", "--loss-chunk-size", "16", "--out", str(out)]) == 0
    assert chunk_sizes == {16}
    rows = metrics(out)
    assert sorted(rows) == [1, 2] and all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows.values())
    assert (out / "final" / "model").is_dir()


@pytest.mark.parametrize("flags,match", [
    (["--optim-in-backward", "--max-grad-norm", "0", "--grad-accum", "2"], "optim_in_backward needs grad_accum 1"),
    (["--max-grad-norm=-1"], "max_grad_norm must be >= 0"),
    (["--loss-chunk-size=-1"], "loss_chunk_size must be >= 0"),
])
def test_bad_combinations_are_refused(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    status = cli.main(["sft", "--demo", *flags, "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and match in err and "Traceback" not in err, err
    assert not out.exists()  # refused before anything was written


def test_several_processes_are_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(UserError, match="optim_in_backward runs in one process only"):
        config(optim_in_backward=True).validate(launched_world())
    monkeypatch.setattr(train_module.dist, "world_size", lambda: 2)  # a process group already joined
    with pytest.raises(UserError, match="optim_in_backward runs in one process only"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], config(optim_in_backward=True), torch.device("cpu"))


def test_the_loop_refuses_accumulation_too():
    with pytest.raises(UserError, match="grad_accum 1"):
        run(config(optim_in_backward=True, grad_accum=2))


# ----------------------------------------------------------------------------- the benchmark's own loop


@pytest.mark.parametrize("task", ["sft", "dpo"])
def test_bench_measure_with_optim_in_backward(task, monkeypatch):
    from minialign.data import collate_pairs, tokenize_pairs

    chunk_sizes = set()
    real = logprobs.token_logps
    monkeypatch.setattr(logprobs, "token_logps",
                        lambda h, w, t, c=None, fused=False: chunk_sizes.add(c) or real(h, w, t, c, fused))
    tokenizer = load_tokenizer("demo")
    raw = load_preference_pairs("demo", split="train", limit=6)
    if task == "sft":
        items = tokenize_sft(raw, tokenizer, max_length=128, max_prompt_length=64)
        batches = [collate_sft(items[i : i + 2], pad_id=tokenizer.pad_token_id) for i in range(0, 6, 2)]
    else:
        items = tokenize_pairs(raw, tokenizer, max_length=128, max_prompt_length=64)
        batches = [collate_pairs(items[i : i + 2], pad_id=tokenizer.pad_token_id, index=list(range(i, i + 2)))
                   for i in range(0, 6, 2)]
    model = load_model("tiny")
    m = measure(model, batches, task=task, full=True, steps=2, warmup=1, optim_in_backward=True, chunk_size=8)
    assert m.tokens_per_s > 0 and math.isfinite(m.final_loss)
    assert chunk_sizes == {8}
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # hooks removed at the end


def test_train_config_defaults_are_off():
    cfg = TrainConfig()
    assert cfg.optim_in_backward is False and cfg.loss_chunk_size == 0
