"""Log-probabilities and losses: small pure functions over tensors.

Everything returns *sums* (or per-example values); normalising by a count is the training loop's job,
because only the loop knows the count across gradient-accumulation steps and ranks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")


def default_chunk_size(vocab_size: int, budget: int = 1 << 25) -> int:
    """Rows per chunk so one float32 logits chunk stays near ``budget`` elements (128 MiB)."""
    return max(16, budget // max(vocab_size, 1))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(target | hidden) through the output projection, one chunk of rows at a time.

    The full [N, V] logits never exist: forward keeps only the [N] answers, backward recomputes each
    chunk's softmax (d logp_t / d logits = onehot(t) - softmax) and feeds it straight into the two matmuls.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        dtype = _compute_dtype(hidden)
        acc = torch.promote_types(dtype, torch.float32)  # float32 softmax math, float64 when checking
        h, w = hidden.to(dtype), weight.to(dtype)
        out = torch.empty(h.shape[0], dtype=acc, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], chunk_size):
                logits = (h[s : s + chunk_size] @ w.T).to(acc)
                t = targets[s : s + chunk_size]
                out[s : s + chunk_size] = logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size, ctx.dtype, ctx.acc = chunk_size, dtype, acc
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets = ctx.saved_tensors
        h, w = hidden.to(ctx.dtype), weight.to(ctx.dtype)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=ctx.acc, device=weight.device) if need_w else None
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], ctx.chunk_size):
                e = s + ctx.chunk_size
                g = torch.softmax((h[s:e] @ w.T).to(ctx.acc), dim=-1)
                go = grad_out[s:e].to(ctx.acc)
                g.mul_(-go[:, None])
                g.scatter_add_(1, targets[s:e, None], go[:, None])
                g = g.to(ctx.dtype)
                if need_h:
                    grad_h[s:e] = g @ w
                if need_w:
                    grad_w.add_((g.T @ h[s:e]).to(ctx.acc))
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Log-probability of each target token.

    Args:
        hidden: ``[N, H]`` final hidden states at the positions that have a target.
        weight: ``[V, H]`` output-embedding (LM head) weight.
        targets: ``[N]`` target token ids (all valid; select positions before calling).
        chunk_size: rows per chunk; bounds the float32 logits held at once to ``[chunk_size, V]``.

    Returns:
        ``[N]`` float32 log-probabilities (float64 for float64 inputs). Differentiable w.r.t. ``hidden`` and ``weight``.
    """
    chunk_size = chunk_size or default_chunk_size(weight.shape[0])
    return _ChunkedTokenLogps.apply(hidden, weight, targets, chunk_size)


def token_logps_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Plain ``log_softmax`` + gather over materialised logits ``[..., V]``; for checks, not training."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of target log-probs per sequence.

    Args:
        logits: ``[B, T, V]`` logits at each position.
        targets: ``[B, T]`` already-shifted targets (the token to predict after each position), ``-100`` = none.

    Returns:
        ``[B]`` float32 sums over the positions whose target is not ``-100``.
    """
    mask = targets != -100
    # masked_fill, not a multiply: a masked position's clamped target may have log-prob -inf, and -inf * 0 is NaN
    return token_logps_reference(logits, targets).masked_fill(~mask, 0.0).sum(-1)


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
    gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[B]`` summed response log-probs under the policy
            (length-normalised by the caller for ``simpo`` and ``ipo``).
        ref_chosen_logps, ref_rejected_logps: ``[B]`` the same under the frozen reference (ignored by ``simpo``).
        beta: inverse temperature of the implicit reward.
        loss_type: ``sigmoid`` (DPO; with ``label_smoothing`` = conservative DPO), ``hinge`` (SLiC),
            ``ipo``, ``robust`` (unbiased under label noise), ``simpo`` (reference-free, margin ``gamma``).
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
        z = beta * margin - gamma
        losses = -F.logsigmoid(z) * (1 - ls) - F.logsigmoid(-z) * ls
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))
