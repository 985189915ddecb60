"""minialign.ops.losses against independent references: float64 formulas and TRL's DPO loss."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from minialign.ops import losses

# ----------------------------------------------------------------------------- dpo_loss: float64 formulas


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return -torch.log1p(torch.exp(-x))


def reference_dpo(pc, pr, rc, rr, *, beta, loss_type, ls=0.0, simpo_gamma=0.5):
    """Each loss as written in its paper, in float64 (inputs are already length-normalised where needed)."""
    pc, pr, rc, rr = (x.double() for x in (pc, pr, rc, rr))
    if loss_type == "simpo":  # SimPO: reference-free, target margin simpo_gamma
        z = beta * (pc - pr) - simpo_gamma
        loss = -(1 - ls) * log_sigmoid(z) - ls * log_sigmoid(-z)
        return loss, beta * pc, beta * pr
    h = (pc - rc) - (pr - rr)  # log-ratio margin
    if loss_type == "sigmoid":  # DPO; with ls > 0 conservative DPO
        loss = -(1 - ls) * log_sigmoid(beta * h) - ls * log_sigmoid(-beta * h)
    elif loss_type == "robust":  # rDPO, unbiased estimator under a flip rate ls
        loss = ((1 - ls) * -log_sigmoid(beta * h) - ls * -log_sigmoid(-beta * h)) / (1 - 2 * ls)
    elif loss_type == "hinge":  # SLiC
        loss = torch.clamp(1 - beta * h, min=0)
    elif loss_type == "ipo":  # IPO: squared distance of the margin from 1 / (2 tau)
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise AssertionError(loss_type)
    return loss, beta * (pc - rc), beta * (pr - rr)


def random_logps(n: int = 16, seed: int = 0):
    """Policy/reference log-probs whose margins span both signs and both sides of the hinge."""
    gen = torch.Generator().manual_seed(seed)
    rc = -20 + 4 * torch.randn(n, generator=gen)
    rr = -20 + 4 * torch.randn(n, generator=gen)
    pc = rc + 3 * torch.randn(n, generator=gen)
    pr = rr + 3 * torch.randn(n, generator=gen)
    return pc, pr, rc, rr


CASES = [
    ("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0),
    ("robust", 0.0), ("robust", 0.1), ("robust", 0.3), ("simpo", 0.0), ("simpo", 0.15),
]


@pytest.mark.parametrize("loss_type,ls", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_against_float64_formulas(loss_type, ls, beta):
    pc, pr, rc, rr = random_logps()
    if loss_type in ("ipo", "simpo"):  # these take per-token averages: keep them at that scale
        pc, pr, rc, rr = (x / 10 for x in (pc, pr, rc, rr))
    got = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls, simpo_gamma=0.7)
    want = reference_dpo(pc, pr, rc, rr, beta=beta, loss_type=loss_type, ls=ls, simpo_gamma=0.7)
    for g, w in zip(got, want):
        assert g.shape == pc.shape
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)


def test_dpo_loss_simpo_ignores_reference_and_rewards_are_detached():
    pc, pr, rc, rr = random_logps()
    pc.requires_grad_()
    with_ref = losses.dpo_loss(pc, pr, rc, rr, beta=2.0, loss_type="simpo")
    without = losses.dpo_loss(pc, pr, None, None, beta=2.0, loss_type="simpo")
    for a, b in zip(with_ref, without):
        torch.testing.assert_close(a, b)
    assert with_ref[0].requires_grad and not with_ref[1].requires_grad and not with_ref[2].requires_grad


def test_dpo_loss_gradient_matches_float64_autograd():
    pc, pr, rc, rr = random_logps()
    for loss_type, ls in CASES:
        x = pc.double().requires_grad_()
        y = pr.double().requires_grad_()
        (g_got,) = torch.autograd.grad(
            losses.dpo_loss(x, y, rc.double(), rr.double(), beta=0.3, loss_type=loss_type, label_smoothing=ls)[0].sum(), x)
        x2 = pc.double().requires_grad_()
        (g_want,) = torch.autograd.grad(
            reference_dpo(x2, pr, rc, rr, beta=0.3, loss_type=loss_type, ls=ls)[0].sum(), x2)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12, msg=f"{loss_type} ls={ls}")


def test_dpo_loss_rejects_unknown_type():
    pc, pr, rc, rr = random_logps()
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_sft_loss_is_a_sum():
    logps = torch.tensor([-1.0, -2.5, -0.5])
    assert losses.sft_loss(logps).item() == pytest.approx(4.0)


# ----------------------------------------------------------------------------- dpo_loss against TRL
#
# TRL 1.16 has no standalone ``dpo_loss``: the per-pair losses are computed inline in
# ``DPOTrainer._compute_loss(model, inputs, return_outputs)``, which runs the model itself (with TRL's fused LM
# head, ``model(..., labels=..., fused_lm_head=True).log_probs``), takes the reference log-probs from the batch
# when ``precompute_ref_logps`` is set, and returns the mean loss, logging mean rewards in ``self._metrics``.
# So we build a trainer without ``__init__`` (only the attributes ``_compute_loss`` reads), give it a tiny real
# model, and feed ``minialign.ops.losses.dpo_loss`` the very log-probs TRL's model produces.
#
# Not compared with TRL, and why:
# * ``sigmoid`` with label_smoothing > 0: TRL 1.16's ``sigmoid`` ignores ``label_smoothing`` (conservative DPO
#   was dropped; its docs say label_smoothing is for robust and EXO only), so only label_smoothing = 0 compares.
# * ``simpo``: TRL 1.16's DPOTrainer has no SimPO loss type (it is not in its list of loss types).


@pytest.fixture(scope="module")
def trl_setup():
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from accelerate import Accelerator
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(config).eval()
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    return trl_dpo.DPOTrainer, Accelerator(cpu=True), model


def trl_batch(n_pairs: int = 6, length: int = 12, seed: int = 0) -> dict:
    """[chosen rows; rejected rows], right-padded, with TRL's completion_mask over the response tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * n_pairs
    prompt = torch.randint(2, 5, (n_pairs,), generator=gen).repeat(2)
    total = torch.randint(6, length + 1, (rows,), generator=gen)
    pos = torch.arange(length)[None]
    return {
        "input_ids": torch.randint(1, 64, (rows, length), generator=gen),
        "attention_mask": (pos < total[:, None]).long(),
        "completion_mask": ((pos >= prompt[:, None]) & (pos < total[:, None])).long(),
    }


def trl_dpo_loss(trainer_cls, accelerator, model, batch, ref_c, ref_r, *, beta, loss_type, ls):
    trainer = object.__new__(trainer_cls)
    attrs = {
        "accelerator": accelerator, "model": model, "beta": beta, "loss_types": [loss_type], "loss_weights": [1.0],
        "label_smoothing": ls, "precompute_ref_logps": True, "ld_alpha": None, "f_divergence_type": "reverse_kl",
        "use_weighting": False, "aux_loss_enabled": False, "_tp_size": 1, "_total_train_tokens": 0,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
    }
    for name, value in attrs.items():
        setattr(trainer, name, value)
    with torch.no_grad():
        loss = trainer._compute_loss(model, {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def trl_policy_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed response log-probs and response lengths, exactly as TRL's fused head computes them."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True)
    return out.log_probs.sum(1), batch["completion_mask"].sum(1)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("hinge", 0.0), ("robust", 0.0), ("robust", 0.2),
                                          ("ipo", 0.0)])
def test_dpo_loss_matches_trl(trl_setup, loss_type, ls):
    trainer_cls, accelerator, model = trl_setup
    batch = trl_batch()
    b = batch["input_ids"].shape[0] // 2
    logps, lengths = trl_policy_logps(model, batch)
    pc, pr = logps[:b], logps[b:]
    gen = torch.Generator().manual_seed(7)
    ref_c = pc + 2 * torch.randn(b, generator=gen)  # margins of both signs, some past the hinge
    ref_r = pr + 2 * torch.randn(b, generator=gen)
    beta = 0.5
    trl_loss, trl_metrics = trl_dpo_loss(trainer_cls, accelerator, model, batch, ref_c, ref_r,
                                         beta=beta, loss_type=loss_type, ls=ls)
    if loss_type == "ipo":  # TRL averages IPO's log-ratios per token inside the loss; minialign's caller does
        n_c, n_r = lengths[:b], lengths[b:]
        ours, _, _ = losses.dpo_loss(pc / n_c, pr / n_r, ref_c / n_c, ref_r / n_r, beta=beta, loss_type="ipo")
        _, chosen, rejected = losses.dpo_loss(pc, pr, ref_c, ref_r, beta=beta)  # rewards stay unnormalised in TRL
    else:
        ours, chosen, rejected = losses.dpo_loss(pc, pr, ref_c, ref_r, beta=beta, loss_type=loss_type,
                                                 label_smoothing=ls)
    assert ours.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    assert chosen.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-5, abs=1e-6)
    assert rejected.mean().item() == pytest.approx(trl_metrics["rewards/rejected"], rel=1e-5, abs=1e-6)
    assert (chosen > rejected).float().mean().item() == pytest.approx(trl_metrics["rewards/accuracies"])
    if loss_type == "hinge":  # the comparison covered both sides of the hinge
        margin = beta * ((pc - ref_c) - (pr - ref_r))
        assert (margin > 1).any() and (margin < 1).any()


# ----------------------------------------------------------------------------- rpo_nll (DPO + NLL of the chosen)


def test_rpo_nll_against_float64_per_token_recomputation():
    gen = torch.Generator().manual_seed(3)
    rows = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 0, 0])  # sequence 3 has no targets at all
    token_logps = -3 * torch.rand(len(rows), generator=gen)
    valid = torch.ones(len(rows), dtype=torch.bool)
    valid[-2:] = False  # inert slots (add_target_index's rounding): log-prob 0, not counted
    token_logps = token_logps.masked_fill(~valid, 0.0)
    sums = losses.sum_by_row(token_logps, rows, 4)
    counts = losses.sum_by_row(valid.float(), rows, 4)
    got = losses.rpo_nll(sums, counts)
    want = torch.zeros(4, dtype=torch.float64)
    for seq in range(4):
        picked = [float(token_logps[i]) for i in range(len(rows)) if rows[i] == seq and valid[i]]
        want[seq] = -sum(picked) / len(picked) if picked else 0.0
    assert got.shape == (4,) and got[3] == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    # integer counts work as well (and the gradient is -1 / count per summed log-prob)
    x = sums.double().requires_grad_()
    (grad,) = torch.autograd.grad(losses.rpo_nll(x, counts.long()).sum(), x)
    torch.testing.assert_close(grad, -1 / counts.double().clamp(min=1))


@pytest.mark.parametrize("equal_lengths", [True, False])
def test_dpo_plus_rpo_nll_against_trl_sft_term(trl_setup, equal_lengths):
    """TRL 1.16 spells rpo_alpha as ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, alpha]``; its NLL is the mean
    over every chosen token of the batch, ours the mean over pairs of each chosen response's mean. Equal chosen
    lengths: the same number. Unequal: TRL's equals the token-weighted mean of the same per-token log-probs."""
    trainer_cls, accelerator, model = trl_setup
    batch = trl_batch(n_pairs=5, length=12, seed=2)
    b = batch["input_ids"].shape[0] // 2
    if equal_lengths:  # every chosen row: prompt 3, response 7
        pos = torch.arange(12)[None]
        batch["attention_mask"][:b] = (pos < 10).long()
        batch["completion_mask"][:b] = ((pos >= 3) & (pos < 10)).long()
    logps, lengths = trl_policy_logps(model, batch)
    pc, pr, n_c = logps[:b], logps[b:], lengths[:b]
    assert (n_c == n_c[0]).all() == equal_lengths
    ref_c, ref_r = pc - 1.0, pr + 0.5
    alpha = 0.7
    trainer = object.__new__(trainer_cls)
    attrs = {
        "accelerator": accelerator, "model": model, "beta": 0.2, "loss_types": ["sigmoid", "sft"],
        "loss_weights": [1.0, alpha], "label_smoothing": 0.0, "precompute_ref_logps": True, "ld_alpha": None,
        "f_divergence_type": "reverse_kl", "use_weighting": False, "aux_loss_enabled": False, "_tp_size": 1,
        "_total_train_tokens": 0, "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
    }
    for name, value in attrs.items():
        setattr(trainer, name, value)
    with torch.no_grad():
        trl_loss = trainer._compute_loss(model, {**batch, "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}, False)
    dpo, _, _ = losses.dpo_loss(pc, pr, ref_c, ref_r, beta=0.2)
    ours = (dpo + alpha * losses.rpo_nll(pc, n_c)).mean()
    token_weighted = dpo.mean() + alpha * (-pc.sum() / n_c.sum())
    assert token_weighted.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    if equal_lengths:
        assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    else:
        assert abs(ours.item() - trl_loss.item()) > 1e-3
