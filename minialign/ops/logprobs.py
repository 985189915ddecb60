"""Per-token log-probabilities of the targets, gathered from the output head in chunks.

The full ``[N, V]`` logits never exist at once (nor in float32): each chunk of rows is projected, turned into
log-probs of its targets and dropped, and the backward recomputes or keeps only what the memory budget allows.
Losses (``minialign.ops.losses``) consume the ``[N]`` values these functions return.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


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
