"""Generation-level metrics: pure functions over answers and judge scores (no models here).

Definitions (each function's docstring repeats the one it computes):

- *loop*: an answer loops when some word 4-gram occurs at least 3 times in it. Words are the
  whitespace-separated pieces of the lower-cased text (or the token ids, when given ids). Three
  occurrences, not two, so an answer that restates one phrase ("I don't know. ... I don't know.")
  is not counted; any span of 4 to about a third of the answer's words that repeats back to back
  three times is. This is the degenerate repetition greedy decoding of small models falls into.
- *distinct-n* (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural Conversation
  Models"): corpus-level number of distinct word n-grams divided by the number of n-grams, over all
  answers together.
- *finished share*: answers that ended by themselves (EOS or a stop string) over all answers.
- *win rate*: share of prompts where the policy's answer scores higher than the reference's by the
  judge, ties counting one half; with several samples a prompt, the per-prompt value is the mean
  over paired samples. Its 95% confidence interval is a percentile bootstrap over prompts (fixed
  seed, 2000 resamples): prompts are the independent units, samples of one prompt are not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

LOOP_N = 4
LOOP_MIN_COUNT = 3


def words(text: str) -> list[str]:
    """Lower-cased whitespace-separated words: the unit of every text metric here."""
    return text.lower().split()


def ngrams(items: Sequence, n: int) -> list[tuple]:
    """The ``len(items) - n + 1`` consecutive n-grams of ``items`` (none when it is shorter than n)."""
    return [tuple(items[i : i + n]) for i in range(len(items) - n + 1)]


def loops(answer: str | Sequence[int] | Sequence[str], n: int = LOOP_N, min_count: int = LOOP_MIN_COUNT) -> bool:
    """True when some n-gram (default: 4 words) occurs ``min_count`` (default 3) or more times in ``answer``.

    ``answer`` is a text (split into lower-cased words), or a sequence of token ids or words. Answers
    shorter than ``n + min_count - 1`` items cannot loop by this definition (three overlapping copies
    of one 4-gram need at least 6 items: "a a a a a a").
    """
    items = words(answer) if isinstance(answer, str) else list(answer)
    counts = Counter(ngrams(items, n))
    return any(c >= min_count for c in counts.values())


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Corpus-level distinct-n: |set of word n-grams over all texts| / number of word n-grams.

    N-grams never span two answers. 0.0 when the answers hold no n-gram at all (every answer shorter
    than n words), so an empty corpus reads as "no diversity" rather than failing.
    """
    grams = [g for text in texts for g in ngrams(words(text), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def share(flags: Sequence[bool]) -> float:
    """Fraction of True values (e.g. answers that finished, or loop); 0.0 for no answers."""
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean; 0.0 for no values."""
    return float(sum(values)) / len(values) if values else 0.0


@dataclass(frozen=True)
class WinRate:
    """The policy's win rate over the reference: ``rate`` in [0, 1] with its ``confidence`` interval
    [``low``, ``high``]; ``wins``/``ties``/``losses`` count paired answers, ``n_prompts`` the units
    the interval resamples."""

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n_prompts: int
    confidence: float = 0.95
    method: str = "percentile bootstrap over prompts"

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(
    policy: torch.Tensor | Sequence,
    reference: torch.Tensor | Sequence,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> WinRate:
    """Win rate of the policy over the reference from paired judge scores, ties counting 1/2.

    ``policy`` and ``reference`` are ``[N]`` (one answer per prompt) or ``[N, S]`` (S paired samples
    per prompt: policy sample j against reference sample j). Per prompt, the outcome is the mean over
    its samples of 1 (policy higher), 1/2 (equal), 0 (lower); the rate is the mean over prompts. The
    interval takes the (1 - confidence)/2 and (1 + confidence)/2 quantiles of that mean over
    ``resamples`` bootstrap draws of N prompts with replacement, from a generator seeded with ``seed``
    (same scores, same interval).
    """
    p = torch.as_tensor(policy, dtype=torch.float64)
    r = torch.as_tensor(reference, dtype=torch.float64)
    if p.shape != r.shape or p.dim() not in (1, 2) or p.numel() == 0:
        raise ValueError(f"paired scores must have one shape [N] or [N, S] with N >= 1; got {list(p.shape)} "
                         f"and {list(r.shape)}")
    if p.dim() == 1:
        p, r = p[:, None], r[:, None]
    outcome = (p > r).double() + 0.5 * (p == r).double()  # [N, S]
    per_prompt = outcome.mean(dim=1)  # [N]
    n = per_prompt.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (resamples, n), generator=generator)
    boots = per_prompt[picks].mean(dim=1)  # [resamples]
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(boots, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    rate = per_prompt.mean().item()
    return WinRate(
        rate=rate, low=low, high=high,
        wins=int((p > r).sum()), ties=int((p == r).sum()), losses=int((p < r).sum()),
        n_prompts=n, confidence=confidence,
    )
