"""Next-token choice for the static decoder (``minialign.modeling.decoder``): greedy, or sampled (temperature, top-k, top-p).

Pure tensor functions with fixed shapes and no host syncs, so a decode step that calls them can be recorded as a
CUDA graph. They reproduce transformers' sampler exactly in distribution: the same warpers in the same order
(temperature, then top-k, then top-p: ``GenerationMixin._get_logits_processor``) over float32 logits, then a draw
from the softmax. The draw itself is an inverse-CDF draw from one uniform number per row: the uniforms can be drawn
up front from a seeded CPU generator, so the graph holds no random-number generator at all and the same seed gives
the same answers on every device and batch composition (a row's uniforms belong to the row, not to its slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``do_sample`` False) or sampled; ``top_k`` 0 and ``top_p`` 1 are off."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def warp_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """``[B, V]`` float logits -> the logits transformers samples from, filtered tokens at -inf.

    Same arithmetic as transformers' Temperature-, TopK- and TopPLogitsWarper (min_tokens_to_keep 1): top-k keeps
    the tokens not below the k-th largest logit (ties kept), top-p removes the tokens whose ascending cumulative
    probability stays <= 1 - top_p, always keeping the most likely one.
    """
    scores = logits
    if sampling.temperature != 1.0:
        scores = scores / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - sampling.top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative-probability interval holds ``uniform`` (``[B]`` in (0, 1]): ``[B, V]`` -> ``[B]``.

    Token i is drawn with probability ``probs[i] / sum(probs)``; a token of probability 0 has an empty interval and is
    never drawn (the first index whose cumulative sum reaches the target is taken, and with u > 0 the target is > 0).
    """
    cumulative = probs.cumsum(dim=-1)
    target = uniform[:, None] * cumulative[:, -1:]
    index = (cumulative < target).sum(dim=-1)
    return index.clamp(max=probs.shape[-1] - 1)


def next_tokens(logits: torch.Tensor, sampling: Sampling, uniform: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` logits (any float dtype) and ``[B]`` uniforms -> ``[B]`` long token ids; greedy ignores ``uniform``.

    Greedy takes the first maximal logit, like ``argmax`` over transformers' float32 copy of the logits (casting a
    bf16 logit to float32 is exact, so the choice is the same).
    """
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    probs = warp_logits(logits.float(), sampling).softmax(dim=-1)
    return inverse_cdf(probs, uniform)


def draw_uniforms(generator: torch.Generator, steps: int, rows: int) -> torch.Tensor:
    """``[steps, rows]`` float32 uniforms in (0, 1] from a seeded CPU generator: row r's draw at step s."""
    return 1.0 - torch.rand((steps, rows), generator=generator)
