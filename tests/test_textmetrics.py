"""minialign.evaluation.textmetrics against hand-computed values."""

import math

import pytest

from minialign.evaluation.textmetrics import distinct_n, loops, mean, share, win_rate


def test_clear_loops_are_flagged():
    assert loops("I am sorry. I am sorry. I am sorry. I am sorry.")  # period-3 loop: "i am sorry. i" x3
    assert loops("the the the the the the")  # 6 words: 4-gram "the the the the" at 0, 1, 2
    assert loops("You can ask a friend, you can ask a friend, you can ask a friend for help")
    assert loops([5, 6, 7, 8] * 3)  # token ids
    assert loops(["a", "b", "c", "d"] * 3)  # words


def test_natural_text_with_one_repeated_phrase_does_not_loop():
    text = ("I don't know how to do that. If you want, I can look it up, but I don't know how to do that "
            "myself and I would not recommend it.")
    assert not loops(text)  # "i don't know how" occurs twice, no 4-gram three times
    assert not loops("a b c d a b c d")  # two copies only


def test_short_answers_do_not_loop():
    assert not loops("")
    assert not loops("No.")
    assert not loops("the the the the the")  # 5 words: the 4-gram occurs only twice
    assert not loops([1, 1, 1])


def test_loop_is_case_insensitive_and_counts_overlaps():
    assert loops("Yes yes YES yes yes yes")


def test_distinct_n_by_hand():
    # "a b a b" -> bigrams ab, ba, ab ; "a b c" -> ab, bc ; 5 bigrams, distinct {ab, ba, bc} = 3
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    # n-grams never span two texts: "x" + "y" gives no bigram at all
    assert distinct_n(["x", "y"], 2) == 0.0
    assert distinct_n([], 2) == 0.0
    assert distinct_n(["a a a"], 1) == pytest.approx(1 / 3)


def test_share_and_mean():
    assert share([True, False, True, True]) == 0.75
    assert share([]) == 0.0
    assert mean([2, 4, 9]) == 5.0
    assert mean([]) == 0.0


def test_win_rate_by_hand_with_ties_counting_half():
    policy = [3.0, 1.0, 2.0, 0.5, 5.0]
    reference = [1.0, 2.0, 2.0, 0.0, 4.0]
    w = win_rate(policy, reference)
    assert (w.wins, w.ties, w.losses, w.n_prompts) == (3, 1, 1, 5)
    assert w.rate == pytest.approx((3 + 0.5) / 5)
    assert w.low <= w.rate <= w.high
    assert 0.0 <= w.low and w.high <= 1.0


def test_win_rate_with_samples_averages_per_prompt():
    # prompt 0: win, win -> 1 ; prompt 1: win, loss -> 0.5 ; prompt 2: tie, loss -> 0.25
    policy = [[2.0, 2.0], [2.0, 0.0], [1.0, 0.0]]
    reference = [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    w = win_rate(policy, reference)
    assert w.rate == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert (w.wins, w.ties, w.losses) == (3, 1, 2)


def test_win_rate_interval_is_seeded_covers_the_estimate_and_shrinks_with_n():
    import random

    rng = random.Random(0)

    def scores(n):
        ref = [rng.random() for _ in range(n)]
        return [r + rng.gauss(0.1, 0.5) for r in ref], ref

    small, large = scores(40), scores(1000)
    a, b = win_rate(*small, seed=3), win_rate(*small, seed=3)
    assert (a.low, a.high) == (b.low, b.high)  # fixed seed: same interval
    w_small, w_large = win_rate(*small), win_rate(*large)
    for w in (w_small, w_large):
        assert w.low <= w.rate <= w.high
    assert (w_large.high - w_large.low) < (w_small.high - w_small.low) / 2  # ~1/sqrt(N): 5x narrower
    # the bootstrap width matches the normal approximation 2 * 1.96 * sd/sqrt(N) within 20%
    n = 1000
    p = w_large.rate
    outcomes = [1.0 if x > y else 0.0 for x, y in zip(*large)]
    sd = math.sqrt(sum((o - p) ** 2 for o in outcomes) / n)
    assert (w_large.high - w_large.low) == pytest.approx(2 * 1.96 * sd / math.sqrt(n), rel=0.2)


def test_win_rate_rejects_unpaired_scores():
    with pytest.raises(ValueError):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        win_rate([], [])
