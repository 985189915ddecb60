"""``--rpo-alpha``: DPO plus alpha x each chosen response's mean token NLL, through DPOTask and the CLI.

The reference is a float64 recomputation from the very per-token log-probs the policy produces (``run_logps``):
if the task counted a prompt or padding token, an inert rounding slot, or a rejected response into the NLL, or
normalised per batch instead of per response, these comparisons fail.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from test_flat_batches import lora_policy

from minialign import cli
from minialign.data import TokenizedPair, collate_pairs
from minialign.modeling.policy import TokenLogps, run_logps
from minialign.ops.losses import PreferenceLoss, dpo_loss
from minialign.training.batches import add_target_index
from minialign.training.tasks import DPOTask, sequence_sums


def pairs() -> list[TokenizedPair]:
    rng = random.Random(5)
    ids = lambda n: [rng.randint(1, 999) for _ in range(n)]  # noqa: E731
    return [TokenizedPair(ids(p), ids(c), ids(r)) for p, c, r in [(5, 9, 4), (3, 2, 12), (8, 6, 6)]]


@pytest.fixture(scope="module")
def policy() -> TokenLogps:
    return lora_policy()


def reference(batch: dict) -> torch.Tensor:
    """Fixed reference log-probs, different per sequence, so the DPO term is not trivially log 2."""
    return -torch.arange(1.0, 2 * batch["n_pairs"] + 1) * 3


def float64_loss(token_logps: torch.Tensor, batch: dict, *, alpha: float, beta: float) -> tuple[torch.Tensor, float]:
    """Sigmoid DPO + alpha x mean chosen NLL, summed over pairs, from per-token log-probs in a Python loop."""
    b, x = batch["n_pairs"], token_logps.double()
    sums = [x.new_zeros(()) for _ in range(2 * b)]
    counts = [0] * (2 * b)
    for i, (row, tok) in enumerate(zip(batch["tgt_rows"].tolist(), batch["tgt_ids"].tolist())):
        if tok >= 0:
            sums[row], counts[row] = sums[row] + x[i], counts[row] + 1
    ref = reference(batch).double()
    total, nll_total = x.new_zeros(()), 0.0
    for p in range(b):
        margin = (sums[p] - ref[p]) - (sums[b + p] - ref[b + p])
        nll = -sums[p] / counts[p]
        total = total + torch.log1p(torch.exp(-beta * margin)) + alpha * nll
        nll_total += float(nll.detach())
    return total, nll_total


def grads_of(policy, loss) -> dict[str, torch.Tensor]:
    loss.backward()
    out = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("multiple", [0, 16])  # 16: inert target slots that must not count
def test_rpo_loss_and_gradients_equal_float64_recomputation(policy, multiple):
    batch = add_target_index(collate_pairs(pairs(), pad_id=0, index=[0, 1, 2]), multiple)
    task = DPOTask(reference, PreferenceLoss(beta=0.3, rpo_alpha=1.5))
    loss, metrics = task.loss(policy, batch)
    got = grads_of(policy, loss)
    want_loss, want_nll = float64_loss(run_logps(policy, batch), batch, alpha=1.5, beta=0.3)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert metrics["nll"].item() == pytest.approx(want_nll, rel=1e-5)
    want = grads_of(policy, want_loss.float())
    assert got.keys() == want.keys() and any("lora" in n for n in got)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=name)
    # the NLL term moves the gradient: it is not dropped on the way
    plain = grads_of(policy, DPOTask(reference, PreferenceLoss(beta=0.3)).loss(policy, batch)[0])
    assert any(not torch.allclose(got[n], plain[n]) for n in got)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_alpha_zero_is_exactly_the_old_loss(policy, loss_type):
    batch = add_target_index(collate_pairs(pairs(), pad_id=0, index=[0, 1, 2]))
    task = DPOTask(reference, PreferenceLoss(beta=0.3, loss_type=loss_type, rpo_alpha=0.0))
    with torch.no_grad():
        loss, metrics = task.loss(policy, batch)
        logps = sequence_sums(policy, batch, task.normalise)
        ref = None if loss_type == "simpo" else reference(batch)
        old = dpo_loss(logps[:3], logps[3:], None if ref is None else ref[:3], None if ref is None else ref[3:],
                       beta=0.3, loss_type=loss_type)[0].sum()
        with_rpo = DPOTask(reference, PreferenceLoss(beta=0.3, loss_type=loss_type, rpo_alpha=2.0)).loss(policy, batch)
    assert torch.equal(loss, old) and "nll" not in metrics
    # alpha > 0 leaves the preference term and its rewards alone (length-normalised ones included)
    assert torch.equal(with_rpo[1]["rewards/margins"], metrics["rewards/margins"])
    assert with_rpo[0].item() == pytest.approx(old.item() + 2.0 * with_rpo[1]["nll"].item(), rel=1e-6)


def test_padding_free_rpo_equals_padded(policy):
    ps = pairs()
    padded = add_target_index(collate_pairs(ps, pad_id=0, index=[0, 1, 2]))
    task = DPOTask(reference, PreferenceLoss(beta=0.3, rpo_alpha=1.0))
    with torch.no_grad():
        want = task.loss(policy, padded)
        for share_prompt in (False, True):
            flat = add_target_index(collate_pairs(ps, pad_id=0, index=[0, 1, 2], flat=True, share_prompt=share_prompt))
            got = task.loss(policy, flat)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1]["nll"], want[1]["nll"], rtol=1e-5, atol=1e-5)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_rpo_alpha_padded_and_fast_give_the_same_first_loss(tmp_path):
    runs = {}
    for name, flags in (("padded", ["--fast", "off"]), ("fast", ["--fast", "on"])):
        out = tmp_path / name
        assert cli.main(["dpo", "--demo", "--rpo-alpha", "1", "--max-steps", "2", "--limit", "8", "--eval-limit", "4",
                         "--batch-size", "4", "--out", str(out), *flags]) == 0
        runs[name] = [r for r in _rows(out) if "loss" in r]
    for rows in runs.values():
        assert len(rows) == 2 and all(math.isfinite(r["nll"]) and r["nll"] > 0 for r in rows)
        # at step 1 the policy is the reference: the DPO term is log 2, the rest is the NLL
        assert rows[0]["loss"] == pytest.approx(math.log(2) + rows[0]["nll"], rel=1e-4)
    assert runs["fast"][0]["loss"] == pytest.approx(runs["padded"][0]["loss"], rel=1e-4)
    assert runs["fast"][0]["nll"] == pytest.approx(runs["padded"][0]["nll"], rel=1e-4)


def test_negative_rpo_alpha_is_a_user_error(tmp_path, capsys):
    assert cli.main(["dpo", "--demo", "--rpo-alpha", "-1", "--out", str(tmp_path / "x")]) == 2
    assert "rpo_alpha must be >= 0" in capsys.readouterr().err
