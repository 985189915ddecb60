"""The pure parts of `minialign online`: which prompts a round samples, how reward-model scores combine, which
answers form a prompt's pair, and the round's answer statistics. No models here (tests check them by hand).

Rules (docs/online.md repeats them):

- *combined score* (``combine_scores``): ``zsum`` standardises each reward model's scores over all the round's
  answers (``(s - mean) / std``, population std; a model whose scores are all equal contributes 0) and sums them
  with the weights; ``sum`` is the weighted sum of the raw scores. z-scoring puts reward models of different scales
  on one footing, so a weight means the same for each; under ``zsum`` the round's mean combined score is 0 by
  construction, so progress shows in each model's raw mean score. ``route`` gives each answer its prompt's one
  reward model's score, standardised over the answers routed to that model (weights unused): a helpful and a
  harmless model summed pull against each other on every prompt (a refusal is harmless and unhelpful), so each
  prompt is judged on its own axis instead, as Llama 2 picks its safety or helpfulness model by the prompt.
- *loop penalty* (``penalise``): ``--loop-penalty L`` subtracts L from the combined score of each answer that
  loops (``textmetrics.loops``, the rule of the loop share every eval reports). A reward model trained on human
  answers has rarely seen a degenerate repetition and may score one well; with L above the combined scores' spread a
  looping answer is rejected against any answer that does not loop, and never chosen over one.
- *evasion penalty* (``penalise``): ``--evasion-penalty E`` subtracts E from each answer that declines or deflects
  (``evasion.evades``, the evasion share's rule). A harmless reward model scores a refusal well on any prompt, and
  rounds learn to refuse benign ones too (74% of a four-round policy's harmless answers and 47% of its helpful ones
  evaded: benchmarks/NOTES.md entry 31); E pulls refusals below the answers that engage, on every prompt, or with
  ``--evasion-routes`` (``in_scope``) only on the prompts routed to the named reward models, so that declining a
  harmful request keeps its score.
- *pair* (``form_pairs``): among a prompt's distinct answer texts (a repeated text counts once, its first sample),
  the highest combined score is chosen and the lowest rejected; ties go to the earlier sample. A prompt is skipped
  when its answers hold no contrast (one distinct text, or every score equal) or when best minus worst is below
  ``min_gap``.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch

from minialign.evaluation.textmetrics import distinct_n, loops, mean, share


def round_prompts(n: int, per_round: int, round_no: int, seed: int) -> list[int]:
    """Positions (sorted) of the prompts round ``round_no`` (1-based) samples, out of ``n``.

    ``per_round`` 0 (or >= n): all of them every round. Otherwise rounds walk one seeded shuffle of the prompts
    ``per_round`` at a time, wrapping around, so prompts are fresh each round until every one has been used; the
    choice depends only on (n, per_round, round_no, seed), so a resumed run samples the same prompts.
    """
    if per_round == 0 or per_round >= n:
        return list(range(n))
    order = list(range(n))
    random.Random(f"minialign-online:{seed}").shuffle(order)
    start = (round_no - 1) * per_round
    return sorted(order[(start + j) % n] for j in range(per_round))


def _standardise(s: torch.Tensor) -> torch.Tensor:
    """``(s - mean) / std`` along the last dim (population std); 0 where a row is constant."""
    std = s.std(dim=-1, unbiased=False, keepdim=True)
    return torch.where(std > 0, (s - s.mean(dim=-1, keepdim=True)) / std.clamp(min=1e-300), torch.zeros_like(s))


def combine_scores(scores: torch.Tensor, weights: Sequence[float], rule: str,
                   routes: torch.Tensor | None = None) -> torch.Tensor:
    """``[K]`` float64 combined score of K answers from ``scores`` ``[M, K]`` (one row per reward model).

    ``rule`` "zsum": sum over models of ``weight * (s - mean) / std`` (statistics over the K answers, population
    std, a constant row giving 0); "sum": sum of ``weight * s``; "route": answer k gets model ``routes[k]``'s score
    standardised over the answers routed to that model (``routes`` ``[K]`` int64 in [0, M); weights unused).
    """
    s = scores.to(torch.float64)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if s.dim() != 2 or s.shape[0] != len(w):
        raise ValueError(f"scores must be [M, K] with M = {len(w)} weights, got {tuple(s.shape)}")
    if rule == "route":
        if routes is None or routes.shape != s.shape[1:] or not bool(((routes >= 0) & (routes < len(w))).all()):
            raise ValueError(f"route needs routes [K] = [{s.shape[1]}] in [0, {len(w)})")
        out = torch.zeros(s.shape[1], dtype=torch.float64)
        for m in range(len(w)):
            mine = routes == m
            if mine.any():
                out[mine] = _standardise(s[m, mine])
        return out
    if rule == "zsum":
        s = _standardise(s)
    elif rule != "sum":
        raise ValueError(f"unknown combine rule {rule!r} (zsum, sum or route)")
    return (w[:, None] * s).sum(0)


def in_scope(flags: Sequence[bool], routes: Sequence, scope: Collection | None) -> list[bool]:
    """Each of the K ``flags`` kept only where its prompt's route (``routes`` ``[K]``, a reward model's index or name)
    is in ``scope``; None keeps every flag. ``--evasion-routes``: declining a harmful request is not penalised."""
    if len(flags) != len(routes):
        raise ValueError(f"{len(flags)} flags for {len(routes)} routes")
    return [bool(f) and (scope is None or r in scope) for f, r in zip(flags, routes)]


def penalise(combined: torch.Tensor, flagged: Sequence[bool], penalty: float) -> torch.Tensor:
    """``combined`` ``[K]`` minus ``penalty`` at each of the K answers whose flag is set (an answer that loops, one
    that evades, or one cut at the token limit)."""
    if len(flagged) != combined.numel():
        raise ValueError(f"{len(flagged)} flags for {combined.numel()} scores")
    return combined - penalty * torch.tensor(list(flagged), dtype=combined.dtype)


@dataclass(frozen=True)
class Pair:
    """A prompt's pair: sample numbers of the chosen (best) and rejected (worst) answer and their score gap."""

    prompt: int
    chosen: int
    rejected: int
    gap: float


@dataclass
class Pairing:
    """The pairs kept, and how many prompts were skipped for each reason."""

    pairs: list[Pair] = field(default_factory=list)
    below_gap: int = 0
    no_contrast: int = 0


def form_pairs(combined: torch.Tensor, texts: Sequence[Sequence[str]], min_gap: float) -> Pairing:
    """Best-vs-worst pair of each prompt from ``combined`` ``[P, S]`` scores of its S answers ``texts[p][s]``.

    Repeated texts count once (their first sample); ties pick the earlier sample; a prompt without two distinct
    scores is skipped (``no_contrast``), and one whose best minus worst is below ``min_gap`` too (``below_gap``).
    """
    out = Pairing()
    values = combined.to(torch.float64).tolist()
    for p, (row, answers) in enumerate(zip(values, texts, strict=True)):
        first: dict[str, int] = {}
        for s, text in enumerate(answers):
            first.setdefault(text, s)
        distinct = sorted(first.values())
        best = max(distinct, key=lambda s: (row[s], -s))
        worst = min(distinct, key=lambda s: (row[s], s))
        gap = row[best] - row[worst]
        if gap <= 0:
            out.no_contrast += 1
        elif gap < min_gap:
            out.below_gap += 1
        else:
            out.pairs.append(Pair(p, best, worst, gap))
    return out


def answer_stats(texts: Sequence[str], n_tokens: Sequence[int], stops: Sequence[str],
                 looped: Sequence[bool] | None = None) -> dict[str, float]:
    """Loop share (``textmetrics.loops``; ``looped``: the flags when the caller has them), EOS share (answers that
    ended on EOS), finished share (EOS or a stop string), mean length in tokens and distinct-2 of a round's answers."""
    return {
        "loop_share": share(list(looped) if looped is not None else [loops(t) for t in texts]),
        "eos_share": share([s == "eos" for s in stops]),
        "finished_share": share([s != "length" for s in stops]),
        "mean_tokens": mean(list(n_tokens)),
        "distinct_2": distinct_n(list(texts), 2),
    }
