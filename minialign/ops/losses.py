"""Losses: small pure functions over per-token or per-sequence log-probabilities (``minialign.ops.logprobs``).

Everything returns *sums* (or per-example values); normalising by a count is the training loop's job,
because only the loop knows the count across gradient-accumulation steps and ranks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")


def sum_by_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``[N]`` per-token values -> ``[n_rows]`` per-sequence sums (``rows[i]`` is token i's sequence)."""
    return torch.zeros(n_rows, dtype=values.dtype, device=values.device).index_add_(0, rows, values)


def sft_loss(logps: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of response tokens; ``[N]`` -> scalar (divide by the token count)."""
    return -logps.sum()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed response log-probs under the policy
            (length-normalised by the caller for ``simpo`` and ``ipo``).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference (ignored by ``simpo``).
        beta: inverse temperature of the implicit reward.
        loss_type: ``sigmoid`` (DPO; with ``label_smoothing`` = conservative DPO), ``hinge`` (SLiC),
            ``ipo``, ``robust`` (unbiased under label noise), ``simpo`` (reference-free, target margin ``simpo_gamma``).
        label_smoothing: assumed probability that a preference label is flipped.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are
        ``beta * (policy - reference)`` log-ratios (``beta * policy`` for ``simpo``), detached.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type == "simpo":
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    margin = chosen_ratio - rejected_ratio
    ls = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - ls) - F.logsigmoid(-beta * margin) * ls
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * margin) * (1 - ls) + F.logsigmoid(-beta * margin) * ls) / (1 - 2 * ls)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:  # simpo
        z = beta * margin - simpo_gamma
        losses = -F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


@dataclass(frozen=True)
class PreferenceLoss:
    """The DPO-family objective of one run, built once from its config (``from_config``): every knob keeps its flag's
    name from ``--beta`` to the formula. ``__call__`` is ``dpo_loss`` plus, with ``rpo_alpha`` > 0, the RPO term.

    ``normalise``: IPO and SimPO compare average per-token log-probs (long answers are not favoured), so the task
    hands them length-normalised sums.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    rpo_alpha: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> PreferenceLoss:
        """From any config holding these fields (``DPOConfig``, or the online command's)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})

    @property
    def normalise(self) -> bool:
        return self.loss_type in ("ipo", "simpo")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "simpo"

    def __call__(self, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
                 ref_rejected: torch.Tensor | None, chosen_nll: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(per_pair_losses, chosen_rewards, rejected_rewards)``, each ``[B]``; ``chosen_nll`` ``[B]`` (from
        ``rpo_nll``) is added ``rpo_alpha`` times when given."""
        per_pair, chosen_r, rejected_r = dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        if chosen_nll is not None:
            per_pair = per_pair + self.rpo_alpha * chosen_nll
        return per_pair, chosen_r, rejected_r


def rpo_nll(chosen_logp_sums: torch.Tensor, chosen_counts: torch.Tensor) -> torch.Tensor:
    """Per-pair NLL term of RPO (DPO + ``rpo_alpha`` x NLL of the chosen response): each chosen response's mean
    token negative log-likelihood.

    Args:
        chosen_logp_sums: ``[B]`` summed log-probs of each chosen response's target tokens.
        chosen_counts: ``[B]`` how many target tokens each chosen response has (float or int, on the device).

    Returns:
        ``[B]`` ``-sum / count`` (a response without targets contributes 0).

    A per-pair value, so it sums over pairs like ``dpo_loss`` and the loop's division by the pair count of the
    whole step makes it the mean over pairs of per-response mean NLLs, the same under any accumulation or number
    of ranks. TRL (``rpo_alpha``; ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, alpha]`` since 1.x)
    instead averages over all chosen tokens of a device's micro-batch, so its long answers weigh more and its
    value depends on how a batch is split. The two agree when every chosen response has the same length.
    """
    return -chosen_logp_sums / chosen_counts.to(chosen_logp_sums.dtype).clamp(min=1)


def rm_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
            center_rewards_coefficient: float = 0.0) -> torch.Tensor:
    """Bradley-Terry reward-model loss, summed over pairs (the loop divides by the pair count).

    Args:
        chosen, rejected: ``[B]`` scalar rewards of each pair's preferred and dispreferred sequence.
        margin: ``[B]`` or None: how much the chosen reward must exceed the rejected one (TRL's ``margin`` column,
            e.g. a rating gap); the pair's loss is ``-log sigmoid(r_c - r_r - margin)``.
        center_rewards_coefficient: weight of ``(r_c + r_r)^2`` (TRL's ``center_rewards_coefficient``): the loss only sees
            reward differences, so this keeps rewards centred on zero, where a judge's scores compare across runs.

    Returns:
        A scalar: the sum over pairs. TRL's per-batch mean is this divided by ``B``.
    """
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).sum()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * (chosen + rejected).square().sum()
    return loss


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))
