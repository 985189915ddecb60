"""Log-probabilities and losses: small pure functions over tensors.

Everything returns *sums* (or per-example values); normalising by a count is the training loop's job,
because only the loop knows the count across gradient-accumulation steps and ranks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo")


def default_chunk_size(vocab_size: int, element_size: int = 4, budget: int = 1 << 27) -> int:
    """Rows per chunk so the chunk's largest temporary of ``element_size`` bytes a logit stays near ``budget`` bytes
    (128 MiB): the float32 copy of the logits when eager, the logits themselves when the softmax math is fused."""
    return max(16, budget // (element_size * max(vocab_size, 1)))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


# The chunked log-prob is a custom operator with its own backward: opaque to torch.compile, which calls it as one
# op inside the compiled (and CUDA-graphed) step whatever the number of targets, symbolic or not, instead of
# unrolling its loop over chunks. Inputs arrive already in the compute dtype (autocast's, outside the op).
# ``fused`` runs the per-chunk softmax math through torch.compile (one kernel that reads the bf16 logits and writes
# the bf16 gradient, instead of a float32 copy of the chunk that five eager kernels read and write again; with
# per-batch target counts it took full SFT on an H200 from 489k to 678k tokens/s, benchmarks/NOTES.md entry 13).


def _chunk_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[n, V]`` logits -> ``[n]`` log p(target), reduced in float32 (float64 for float64 logits)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


def _chunk_grad(logits: torch.Tensor, targets: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``grad_out * (onehot(target) - softmax(logits))``, the gradient of ``sum(grad_out * logp)`` w.r.t. the
    ``[n, V]`` logits, in their dtype. In place over one float32 copy: the lean form for eager mode."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    go = grad_out.to(acc)[:, None]
    g = torch.softmax(logits.to(acc), dim=-1).mul_(-go)
    return g.scatter_add_(1, targets[:, None], go).to(logits.dtype)


def _chunk_grad_pointwise(logits: torch.Tensor, targets: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``_chunk_grad`` as one pointwise expression after the softmax, which torch.compile fuses into one kernel
    (an in-place scatter would make it write the float32 chunk out first)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    hit = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    return (grad_out.to(acc)[:, None] * (hit.to(acc) - torch.softmax(logits.to(acc), dim=-1))).to(logits.dtype)


def _chunk_logps_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, V]`` logits -> ``[n]`` log p(target) in float32 and ``[n, V]`` d log p(target) / d logits
    (``onehot(target) - softmax``) in the logits' dtype. In place over one float32 copy (which may be ``logits``
    itself: it is consumed)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    logp = (x.gather(1, targets[:, None]) - lse).squeeze(1)
    grad = x.sub_(lse).exp_().neg_().scatter_add_(1, targets[:, None], torch.ones_like(logp)[:, None])
    return logp, grad.to(logits.dtype)


def _chunk_logps_and_grad_pointwise(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chunk_logps_and_grad`` as pointwise expressions, which torch.compile fuses into one kernel."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, dim=-1)
    hit = torch.arange(logits.shape[1], device=logits.device) == targets[:, None]
    grad = (hit.to(x.dtype) - torch.exp(x - lse[:, None])).to(logits.dtype)
    return x.gather(1, targets[:, None]).squeeze(1) - lse, grad


@functools.cache
def _compiled_chunk_math() -> tuple[Callable, Callable, Callable]:
    return tuple(torch.compile(f, dynamic=True) for f in (_chunk_logps, _chunk_grad_pointwise,
                                                          _chunk_logps_and_grad_pointwise))


def _chunk_math(fused: bool) -> tuple[Callable, Callable, Callable]:
    """(log-probs, scaled gradient, log-probs and unscaled gradient) of one chunk of logits."""
    return _compiled_chunk_math() if fused else (_chunk_logps, _chunk_grad, _chunk_logps_and_grad)


@torch.library.custom_op("minialign::chunked_token_logps", mutates_args=())
def _chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                         fused: bool) -> torch.Tensor:
    """log p(target | hidden) through the output projection, one chunk of rows at a time.

    The full [N, V] logits never exist: forward keeps only the [N] answers, backward recomputes each
    chunk's logits (d logp_t / d logits = onehot(t) - softmax) and feeds the gradient straight into the two matmuls.
    """
    logps = _chunk_math(fused)[0]
    out = torch.empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, hidden.shape[0], chunk_size):
            out[s : s + chunk_size] = logps(hidden[s : s + chunk_size] @ weight.T, targets[s : s + chunk_size])
    return out


@_chunked_token_logps.register_fake
def _(hidden, weight, targets, chunk_size, fused):
    return hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))


@torch.library.custom_op("minialign::chunked_token_logps_backward", mutates_args=())
def _chunked_token_logps_backward(grad_out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  targets: torch.Tensor, chunk_size: int, fused: bool, need_hidden: bool,
                                  need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. ``hidden`` and ``weight`` (an empty tensor for one that is not needed)."""
    logits_grad = _chunk_math(fused)[1]
    n = hidden.shape[0]
    grad_h = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    several = n > chunk_size  # one chunk writes its weight gradient directly; several sum theirs in float32
    acc = torch.promote_types(hidden.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight and several else weight.new_empty(0)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, n, chunk_size):
            e = s + chunk_size
            g = logits_grad(hidden[s:e] @ weight.T, targets[s:e], grad_out[s:e])
            if need_hidden:
                torch.mm(g, weight, out=grad_h[s:e])
            if need_weight:
                grad_w = grad_w.add_(g.T @ hidden[s:e]) if several else g.T @ hidden[s:e]
    return grad_h, grad_w.to(weight.dtype)


@_chunked_token_logps_backward.register_fake
def _(grad_out, hidden, weight, targets, chunk_size, fused, need_hidden, need_weight):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0))


def _save_inputs(ctx, inputs, output):
    hidden, weight, targets, chunk_size, fused = inputs
    ctx.save_for_backward(hidden, weight, targets)
    ctx.chunk_size, ctx.fused = chunk_size, fused


def _token_logps_grad(ctx, grad_out):
    hidden, weight, targets = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h, grad_w = _chunked_token_logps_backward(grad_out, hidden, weight, targets, ctx.chunk_size, ctx.fused,
                                                   need_h, need_w)
    return (grad_h if need_h else None), (grad_w if need_w else None), None, None, None


_chunked_token_logps.register_autograd(_token_logps_grad, setup_context=_save_inputs)


# The same log-probs with their gradient factors computed in the forward pass. The gradient of log p(t_i) w.r.t.
# row i of the logits, onehot(t_i) - softmax_i, does not depend on what the loss does with the log-probs, and the
# loss only scales each row by its grad_out[i]. So forward keeps A = (onehot - softmax) @ W ([N, H]) and, when the
# weight is trained, the [N, V] factor itself; backward is then grad_h = grad_out * A (no matmul) and
# grad_w = factor.T @ (grad_out * hidden) (one matmul over all rows: no float32 sum over chunks). Against the
# recomputing op above this saves, per step, one [N, H] x [H, V] matmul and one pass of softmax over the [N, V]
# logits (and the float32 weight-gradient sums when there are several chunks); with a frozen head (LoRA) the
# whole backward of the output projection becomes one elementwise product.


@torch.library.custom_op("minialign::token_logps_with_grads", mutates_args=())
def _token_logps_with_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                            fused: bool, need_hidden: bool, need_weight: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[N]`` log p(target), ``[N, H]`` d logp / d hidden and ``[N, V]`` d logp / d logits (empty tensors for
    gradients not needed), one chunk of logits at a time."""
    both = _chunk_math(fused)[2]
    n, vocab = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    several = n > chunk_size  # one chunk's gradient is kept as it is; several are written into one [N, V]
    d_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    d_logits = hidden.new_empty((n, vocab) if need_weight and several else 0)
    with torch.autocast(hidden.device.type, enabled=False):
        for s in range(0, n, chunk_size):
            e = s + chunk_size
            out[s:e], grad = both(hidden[s:e] @ weight.T, targets[s:e])
            if need_hidden:
                torch.mm(grad, weight, out=d_hidden[s:e])
            if need_weight and several:
                d_logits[s:e] = grad
            elif need_weight:
                d_logits = grad
    return out, d_hidden, d_logits


@_token_logps_with_grads.register_fake
def _(hidden, weight, targets, chunk_size, fused, need_hidden, need_weight):
    out = hidden.new_empty(hidden.shape[0], dtype=torch.promote_types(hidden.dtype, torch.float32))
    return (out, torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            hidden.new_empty((hidden.shape[0], weight.shape[0]) if need_weight else 0))


def _save_factors(ctx, inputs, output):
    hidden, _, _, _, _, need_hidden, need_weight = inputs
    _, d_hidden, d_logits = output
    ctx.save_for_backward(d_hidden, d_logits, hidden if need_weight else None)
    ctx.need_hidden, ctx.need_weight = need_hidden, need_weight
    ctx.mark_non_differentiable(d_hidden, d_logits)


def _token_logps_with_grads_grad(ctx, grad_out, _d_hidden_grad, _d_logits_grad):
    d_hidden, d_logits, hidden = ctx.saved_tensors
    scale = grad_out[:, None]
    grad_h = (scale * d_hidden).to(d_hidden.dtype) if ctx.need_hidden else None
    grad_w = d_logits.T @ (scale * hidden).to(d_logits.dtype) if ctx.need_weight else None
    return grad_h, grad_w, None, None, None, None, None


_token_logps_with_grads.register_autograd(_token_logps_with_grads_grad, setup_context=_save_factors)


def keeps_logit_grads(n: int, hidden_size: int, chunk_size: int, element_size: int) -> bool:
    """Whether keeping the ``[n, V]`` logit gradient from forward to backward (a trained output head) holds no more
    memory than recomputing it. Both hold one chunk's logits and gradient at their peak (the end of the forward, the
    start of the backward); keeping adds the ``[n, V]`` factor, minus the chunk itself when there is only one, and
    recomputing several chunks adds the float32 ``[V, H]`` sum of the weight gradient."""
    return n <= chunk_size or n * element_size <= 4 * hidden_size


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """Log-probability of each target token.

    Args:
        hidden: ``[N, H]`` final hidden states at the positions that have a target.
        weight: ``[V, H]`` output-embedding (LM head) weight.
        targets: ``[N]`` target token ids (all valid; select positions before calling).
        chunk_size: rows per chunk; bounds the logits held at once to ``[chunk_size, V]`` (default: ``default_chunk_size``).
        fused: compile each chunk's softmax math into one kernel (needs a working ``torch.compile``; what
            ``--compile`` turns on).

    Returns:
        ``[N]`` float32 log-probabilities (float64 for float64 inputs). Differentiable w.r.t. ``hidden`` and ``weight``.

    When a gradient will be needed, its factors are computed in the forward pass (see
    ``_token_logps_with_grads``), unless a trained head would make that hold more memory than recomputing
    (``keeps_logit_grads``): then backward recomputes each chunk.
    """
    dtype = _compute_dtype(hidden)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    size = hidden.element_size()
    chunk_size = chunk_size or default_chunk_size(weight.shape[0], size if fused else max(size, 4))
    need_h = torch.is_grad_enabled() and hidden.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad
    keep = need_w and keeps_logit_grads(hidden.shape[0], hidden.shape[1], chunk_size, size)
    if keep or (need_h and not need_w):
        return _token_logps_with_grads(hidden, weight, targets, chunk_size, fused, need_h, need_w)[0]
    return _chunked_token_logps(hidden, weight, targets, chunk_size, fused)


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
