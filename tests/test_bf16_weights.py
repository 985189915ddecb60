"""Full fine-tuning in bf16: stochastic rounding, StochasticAdamW against torch's AdamW, and the CLI path.

The reference for the optimizer is ``torch.optim.AdamW`` on float32 copies fed the same gradients: its moments
must be equal, and its weights the expectation of ours.
"""

from __future__ import annotations

import json

import pytest
import torch

from minialign import cli
from minialign.base.dist import launched_world
from minialign.base.errors import UserError
from minialign.config.schema import SFTConfig
from minialign.training.optim import StochasticAdamW, make_optimizer, stochastic_round


def neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each element of ``x`` (float32), by magnitude."""
    down = (x.view(torch.int32) & -65536).view(torch.float32)
    up = ((x.view(torch.int32) & -65536) + 65536).view(torch.float32)
    return down, up


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    torch.manual_seed(0)
    x = torch.tensor([1.0 + 2 ** -10, -3.3, 0.1234, 5e-4, -7e3]).repeat(20000, 1)
    rounded = stochastic_round(x).float()
    down, up = neighbours(x)
    assert bool(((rounded == down) | (rounded == up)).all())
    # E[round(x)] = x: the mean of 20,000 draws is x within a few standard errors of one bf16 spacing
    spacing = (up - down)[0]
    err = (rounded.mean(0) - x[0]).abs() / spacing
    assert bool((err < 0.02).all()), err
    # nearest rounding would be biased here: 1 + 2^-10 always rounds down to 1
    assert x[0, 0].to(torch.bfloat16).item() == 1.0 and rounded[:, 0].float().mean().item() > 1.0


def test_values_bf16_holds_are_kept_exactly():
    x = torch.tensor([0.0, 1.0, -2.5, 3.140625, float("inf")])
    for _ in range(5):
        assert torch.equal(stochastic_round(x).float(), x)


def adamw_pair(dtype: torch.dtype, lr=1e-2, weight_decay=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = [torch.randn(n, generator=gen) for n in (300, 1000)] + [torch.randn(40, 25, generator=gen)]
    ours = [torch.nn.Parameter(v.to(dtype)) for v in values]
    reference = [torch.nn.Parameter(p.detach().double()) for p in ours]
    kw = dict(lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))
    return ours, StochasticAdamW(ours, chunk=128, **kw), reference, torch.optim.AdamW(reference, foreach=False, **kw)


def step_both(ours, opt, reference, ref_opt, grads):
    for p, r, g in zip(ours, reference, grads):
        p.grad, r.grad = g.to(p.dtype), g.to(p.dtype).double()
    opt.step()
    ref_opt.step()


def test_float32_weights_follow_torch_adamw():
    ours, opt, reference, ref_opt = adamw_pair(torch.float32)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        step_both(ours, opt, reference, ref_opt, [torch.randn(p.shape, generator=gen) for p in ours])
    for p, r in zip(ours, reference):
        torch.testing.assert_close(p.double(), r.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_weights_keep_float32_moments_and_track_the_exact_update():
    """Moments equal AdamW's (same gradients). Each step rounds by less than one bf16 spacing, up or down at
    random: after 5 steps every weight is within 5 spacings of the float64 trajectory, and on average on it
    (within 4 standard errors)."""
    torch.manual_seed(0)
    ours, opt, reference, ref_opt = adamw_pair(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    largest = [r.detach().abs() for r in reference]  # bf16 spacings along the way are at most 2^-7 of these
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        step_both(ours, opt, reference, ref_opt, grads)
        largest = [torch.maximum(a, r.detach().abs()) for a, r in zip(largest, reference)]
    for p, r, big in zip(ours, reference, largest):
        assert p.dtype == torch.bfloat16
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].dtype == torch.float32
            torch.testing.assert_close(opt.state[p][key].double(), ref_opt.state[r][key], rtol=1e-5, atol=1e-7)
        spacing = big * 2 ** -7 * 1.1
        error = p.double() - r.detach()
        assert bool((error.abs() <= 5 * spacing).all())
        standard_error = error.std() / error.numel() ** 0.5
        assert error.mean().abs() < 4 * standard_error, (error.mean(), standard_error)  # unbiased


def test_small_updates_survive_where_round_to_nearest_loses_them():
    """lr 1e-4 on weights of 1.0: each update is 1/78 of a bf16 spacing. After 100 steps the exact weights are
    0.99; torch's AdamW on bf16 weights has not moved, ours are 0.99 on average."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    nearest = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt, plain = StochasticAdamW([ours], lr=1e-4), torch.optim.AdamW([nearest], lr=1e-4, weight_decay=0)
    for _ in range(100):
        ours.grad = torch.ones_like(ours)
        nearest.grad = torch.ones_like(nearest)
        opt.step()
        plain.step()
    assert bool((nearest == 1).all())
    assert ours.float().mean().item() == pytest.approx(0.99, abs=2e-4)


def test_state_dict_round_trip_keeps_float32_moments():
    ours, opt, *_ = adamw_pair(torch.bfloat16)
    for p in ours:
        p.grad = torch.ones_like(p)
    opt.step()
    saved = opt.state_dict()
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fresh = StochasticAdamW(fresh_params, lr=1e-2, weight_decay=0.1, chunk=128)
    fresh.load_state_dict(saved)
    for p, q in zip(ours, fresh_params):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert fresh.state[q][key].dtype == torch.float32
            assert torch.equal(fresh.state[q][key], opt.state[p][key])
    # and the next step from either is the same, given the same rounding noise
    for p, q in zip(ours, fresh_params):
        p.grad = q.grad = torch.full_like(p, 0.5)
    torch.manual_seed(3)
    opt.step()
    torch.manual_seed(3)
    fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(ours, fresh_params))


def test_make_optimizer_picks_by_weight_dtype():
    cfg, cpu = SFTConfig(), torch.device("cpu")
    assert type(make_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg, cpu)) is torch.optim.AdamW
    bf16 = [torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))]
    assert isinstance(make_optimizer(bf16, cfg, cpu), StochasticAdamW)
    assert not make_optimizer(bf16, cfg, cpu).compiled  # no compilation on a CPU


def test_the_update_is_compiled_only_when_the_run_repays_it(monkeypatch):
    """On CUDA: compiled from COMPILE_UPDATE_FROM parameter-steps (1B parameters: ~140 steps), op by op below."""
    from minialign.training import optim

    monkeypatch.setattr(optim.torch, "compile", lambda fn, **kw: fn)  # what is compiled is not under test here
    p = torch.nn.Parameter(torch.zeros(1_000_000, dtype=torch.bfloat16))
    cfg, cuda = SFTConfig(), torch.device("cuda")
    steps = int(optim.COMPILE_UPDATE_FROM / 1_000_000)
    assert not make_optimizer([p], cfg, cuda, steps=steps - 1).compiled
    assert make_optimizer([p], cfg, cuda, steps=steps).compiled
    assert make_optimizer([p], cfg, cuda).compiled  # an open-ended run (the step benchmark)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_full_sft_and_dpo_in_bf16_learn_and_resume(tmp_path):
    """--full --base-dtype bfloat16 trains bf16 weights (saved as such), the loss falls like float32's, and a
    resumed run continues from its checkpoint."""
    common = ["--demo", "--batch-size", "4", "--limit", "48", "--eval-limit", "8",
              "--full", "--lr", "3e-3", "--log-every", "1"]
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        assert cli.main(["sft", *common, "--max-steps", "12", "--base-dtype", dtype, "--save-every", "6",
                         "--out", str(out)]) == 0
        runs[dtype] = [r["loss"] for r in metrics(out) if "loss" in r]
    bf16, fp32 = runs["bfloat16"], runs["float32"]
    assert bf16[-1] < bf16[0] - 0.3 and abs(bf16[-1] - fp32[-1]) < 0.25 * (fp32[0] - fp32[-1]), (bf16, fp32)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "bfloat16" / "final" / "model" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # --resume takes its run's own config: --demo would start another run, so it is refused with --resume
    assert cli.main(["sft", *common[1:], "--max-steps", "14", "--base-dtype", "bfloat16", "--resume",
                     str(tmp_path / "bfloat16")]) == 0
    out = tmp_path / "dpo"
    assert cli.main(["dpo", *common, "--max-steps", "3", "--base-dtype", "bfloat16", "--out", str(out)]) == 0
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in metrics(out) if "loss" in r)


def test_bf16_full_fine_tuning_refuses_what_it_was_not_built_for(tmp_path, capsys, monkeypatch):
    status = cli.main(["sft", "--demo", "--full", "--base-dtype", "bfloat16", "--optim-in-backward",
                       "--max-grad-norm", "0", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert status == 2 and "does not run inside backward" in err and not (tmp_path / "a").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="runs in one process only"):
        SFTConfig(full=True, base_dtype="bfloat16").validate(launched_world())


def test_compiled_update_is_the_same_update():
    """The fused (torch.compile) update against the op-by-op one: float32 weights to rounding, bf16 weights on a
    neighbour of the same float32 result, moments equal; two sizes, one compilation (dynamic shapes)."""
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(2)
        values = [torch.randn(n, generator=gen) for n in (300, 1000)]
        pairs = []
        for compiled in (False, True):
            params = [torch.nn.Parameter(v.to(dtype)) for v in values]
            pairs.append((params, StochasticAdamW(params, lr=1e-2, weight_decay=0.1, compiled=compiled)))
        for _ in range(3):
            grads = [torch.randn(v.shape, generator=gen) for v in values]
            for params, opt in pairs:
                for p, g in zip(params, grads):
                    p.grad = g.to(dtype)
                opt.step()
        (eager, eager_opt), (fused, fused_opt) = pairs
        for a, b, start in zip(eager, fused, values):
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(eager_opt.state[a][key], fused_opt.state[b][key], rtol=1e-5, atol=1e-7)
            if dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                # each within 3 roundings of the exact weights, with spacings no wider than around these values
                big = torch.maximum(torch.maximum(a.detach().abs(), b.detach().abs()).float(), start.abs()) + 0.1
                assert bool(((a.float() - b.float()).abs() <= 6 * 2 ** -7 * big).all())
