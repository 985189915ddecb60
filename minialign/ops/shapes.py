"""Batch shapes fixed before training starts, so a real epoch compiles and captures a known number of times.

Padding-free batches are one row of their sequences back to back, so every batch of real data has its own length
and target count. A CUDA graph is captured per shape and a static-shape compile happens per row length: rounded
to a multiple, an HH epoch still meets dozens of shapes (issue 19). But the whole run's batches are known up front
(the order is a pure function of seed and epoch), so their sizes are too: ``plan_shapes`` picks at most
``max_lengths`` row lengths, and for each at most ``max_targets`` target counts, that cover every batch with the
least padding (an exact dynamic programme over the distinct sizes). Every batch is then padded up to its planned
shape, and the number of shapes, hence of captures and compilations, is fixed and printed before the first step.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field


def buckets(values: Sequence[int], k: int, multiple: int = 1, slack: int = 0) -> list[int]:
    """At most ``k`` sizes, multiples of ``multiple``, such that every value + ``slack`` fits one of them and the
    total padding (size chosen - value, summed over values) is least. Ascending; the largest covers the largest value."""
    if not values:
        return []
    if k < 1:
        raise ValueError("k must be >= 1")
    multiple = max(multiple, 1)
    fitted: dict[int, list[int]] = {}
    for v in values:
        size = -(-(v + slack) // multiple) * multiple
        fitted.setdefault(size, []).append(v)
    sizes = sorted(fitted)
    counts = [len(fitted[s]) for s in sizes]
    totals = [sum(fitted[s]) for s in sizes]
    m = len(sizes)
    if m <= k:
        return sizes

    n_upto, sum_upto = [0], [0]  # prefix sums, so a bucket's padding costs O(1)
    for c, t in zip(counts, totals):
        n_upto.append(n_upto[-1] + c)
        sum_upto.append(sum_upto[-1] + t)

    def cost(i: int, j: int) -> int:  # sizes[i..j] all padded up to sizes[j]
        return sizes[j] * (n_upto[j + 1] - n_upto[i]) - (sum_upto[j + 1] - sum_upto[i])

    inf = float("inf")
    # best[b][j]: least padding covering sizes[0..j] with b buckets, the last one being sizes[j]
    best = [[inf] * m for _ in range(k + 1)]
    back = [[-1] * m for _ in range(k + 1)]
    for j in range(m):
        best[1][j] = cost(0, j)
    for b in range(2, k + 1):
        for j in range(m):
            for i in range(j):
                c = best[b - 1][i] + cost(i + 1, j)
                if c < best[b][j]:
                    best[b][j], back[b][j] = c, i
    b = min(range(1, k + 1), key=lambda n: best[n][m - 1])
    chosen, j = [], m - 1
    while j >= 0 and b >= 1:
        chosen.append(sizes[j])
        j, b = back[b][j], b - 1
    return sorted(chosen)


@dataclass(frozen=True)
class Shape:
    length: int  # positions of the row
    targets: int  # target slots (rows of the output projection)


@dataclass
class ShapePlan:
    """Row lengths, target counts per row length, and the longest attention segment any planned batch holds."""

    lengths: list[int]
    targets: dict[int, list[int]]
    max_seqlen: int
    padding: float = 0.0  # share of planned positions that are padding
    unplanned: list[tuple[int, int]] = field(default_factory=list)  # sizes met that the plan did not cover

    def fit(self, tokens: int, targets: int) -> Shape:
        """The smallest planned shape that holds a batch of ``tokens`` positions (and one more: its padding
        segment) and ``targets`` targets. A batch the plan never saw gets its own shape, and is remembered."""
        i = bisect.bisect_left(self.lengths, tokens + 1)
        if i < len(self.lengths):
            counts = self.targets[self.lengths[i]]
            j = bisect.bisect_left(counts, targets)
            if j < len(counts):
                return Shape(self.lengths[i], counts[j])
        self.unplanned.append((tokens, targets))
        return Shape(tokens + 1, targets)

    @property
    def n_shapes(self) -> int:
        return sum(len(t) for t in self.targets.values())

    def describe(self) -> str:
        per = ", ".join(f"{length} ({'/'.join(map(str, self.targets[length]))} targets)" for length in self.lengths)
        return (f"{len(self.lengths)} row length(s) x target counts = {self.n_shapes} shape(s): {per}; "
                f"{self.padding:.1%} of positions are padding")


def plan_shapes(sizes: Sequence[tuple[int, int]], *, max_lengths: int, max_targets: int, length_multiple: int = 64,
                target_multiple: int = 64, longest_sequence: int = 0) -> ShapePlan:
    """Plan the shapes of batches whose (positions, targets) are ``sizes`` (every batch of the run, in any order).

    Each row keeps at least one padding position (its own attention segment, so the segment count, a shape too,
    is the same for every batch of one size), and the longest attention segment is the longer of the longest
    sequence and the most padding any batch gets.
    """
    if not sizes:
        return ShapePlan([], {}, longest_sequence)
    lengths = buckets([t for t, _ in sizes], max_lengths, length_multiple, slack=1)
    by_length: dict[int, list[int]] = {length: [] for length in lengths}
    for tokens, n_targets in sizes:
        by_length[lengths[bisect.bisect_left(lengths, tokens + 1)]].append(n_targets)
    targets = {length: buckets(counts, max_targets, target_multiple) for length, counts in by_length.items() if counts}
    lengths = [length for length in lengths if length in targets]
    plan = ShapePlan(lengths, targets, longest_sequence)
    padded = sum(plan.fit(t, n).length for t, n in sizes)
    plan.padding = 1 - sum(t for t, _ in sizes) / padded
    plan.max_seqlen = max(longest_sequence, max(plan.fit(t, n).length - t for t, n in sizes))
    return plan
