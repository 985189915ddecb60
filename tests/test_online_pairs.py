"""`minialign online`'s pure rules against hand computation: prompts per round, score combination (z-scoring,
weights, raw sum), the loop penalty, best-vs-worst pairs (min-gap, ties, repeated answers), answer statistics."""

import math

import pytest
import torch

from minialign.commands.online_pairs import (
    Pair,
    answer_stats,
    combine_scores,
    form_pairs,
    in_scope,
    penalise,
    round_prompts,
)
from minialign.config.online import OnlineConfig
from minialign.evaluation.evasion import evades
from minialign.evaluation.textmetrics import loops


def test_zsum_standardises_each_model_then_weights():
    # model A: scores 1, 2, 3 -> mean 2, population std sqrt(2/3); model B: 10, 10, 40 -> mean 20, std sqrt(200)
    scores = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]])
    za = [(x - 2) / math.sqrt(2 / 3) for x in (1, 2, 3)]
    zb = [(x - 20) / math.sqrt(200) for x in (10, 10, 40)]
    got = combine_scores(scores, [0.7, 0.3], "zsum")
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx([0.7 * a + 0.3 * b for a, b in zip(za, zb)], abs=1e-12)
    assert got.mean().item() == pytest.approx(0.0, abs=1e-12)  # z-scores average to 0 over the round


def test_zsum_is_scale_free_and_a_constant_model_adds_nothing():
    scores = torch.tensor([[1.0, 2.0, 4.0], [5.0, 5.0, 5.0]])
    scaled = torch.tensor([[100.0, 200.0, 400.0], [5.0, 5.0, 5.0]]) - 7
    a, b = combine_scores(scores, [1, 1], "zsum"), combine_scores(scaled, [1, 1], "zsum")
    assert a.tolist() == pytest.approx(b.tolist(), abs=1e-12)
    only_first = combine_scores(scores[:1], [1], "zsum")
    assert a.tolist() == pytest.approx(only_first.tolist(), abs=1e-12)


def test_sum_is_the_weighted_raw_sum():
    scores = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert combine_scores(scores, [2.0, -1.0], "sum").tolist() == [2 * 1 - 3, 2 * -2 - 0.5]


def test_route_standardises_each_model_over_its_own_answers_only():
    # answers 0, 2, 3 routed to model 0 (scores 1, 3, 8: mean 4, population std sqrt(26/3)); 1 and 4 to model 1
    # (scores 20, 50: mean 35, std 15); each answer's other-model score is ignored
    scores = torch.tensor([[1.0, 900.0, 3.0, 8.0, -900.0], [-5.0, 20.0, 99.0, -99.0, 50.0]])
    routes = torch.tensor([0, 1, 0, 0, 1])
    s0 = math.sqrt(((1 - 4) ** 2 + (3 - 4) ** 2 + (8 - 4) ** 2) / 3)
    want = [(1 - 4) / s0, (20 - 35) / 15, (3 - 4) / s0, (8 - 4) / s0, (50 - 35) / 15]
    got = combine_scores(scores, [0.9, 0.1], "route", routes)  # weights do not apply
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, abs=1e-12)
    alone = combine_scores(scores, [0.5, 0.5], "route", torch.tensor([1, 1, 1, 1, 1]))  # one model: its z-scores
    assert alone.tolist() == pytest.approx(combine_scores(scores[1:], [1], "zsum").tolist(), abs=1e-12)


@pytest.mark.parametrize("routes", [None, torch.tensor([0, 1]), torch.tensor([0, 1, 2])])
def test_route_needs_one_model_index_per_answer(routes):
    with pytest.raises(ValueError, match="route needs routes"):
        combine_scores(torch.zeros(2, 3), [0.5, 0.5], "route", routes)


def test_combine_rejects_a_weight_count_that_does_not_match():
    with pytest.raises(ValueError):
        combine_scores(torch.zeros(2, 3), [1.0], "zsum")


def test_pairs_take_best_and_worst_and_skip_below_the_gap():
    combined = torch.tensor([[0.5, 2.0, -1.0], [0.1, 0.3, 0.2], [1.0, 1.0, 1.0]])
    texts = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    out = form_pairs(combined, texts, min_gap=0.25)
    assert out.pairs == [Pair(0, 1, 2, 3.0)]
    assert (out.below_gap, out.no_contrast) == (1, 1)  # prompt 1: gap 0.2 < 0.25; prompt 2: all equal
    kept = form_pairs(combined, texts, min_gap=0.0)
    assert [(p.prompt, p.chosen, p.rejected) for p in kept.pairs] == [(0, 1, 2), (1, 1, 0)]
    assert kept.pairs[1].gap == pytest.approx(0.2)
    assert (kept.below_gap, kept.no_contrast) == (0, 1)


def test_a_gap_equal_to_min_gap_is_kept():
    out = form_pairs(torch.tensor([[0.0, 0.5]]), [["x", "y"]], min_gap=0.5)
    assert out.pairs == [Pair(0, 1, 0, 0.5)]


def test_ties_go_to_the_earlier_sample_and_repeated_texts_count_once():
    # best tie between samples 1 and 3 -> 1; worst tie between 0 and 2 -> 0
    out = form_pairs(torch.tensor([[-1.0, 2.0, -1.0, 2.0]]), [["a", "b", "c", "d"]], 0.0)
    assert out.pairs == [Pair(0, 1, 0, 3.0)]
    # sample 2 repeats sample 0's text: only sample 0 counts, so the worst is sample 1
    out = form_pairs(torch.tensor([[0.0, 1.0, -5.0, 3.0]]), [["same", "b", "same", "c"]], 0.0)
    assert out.pairs == [Pair(0, 3, 0, 3.0)]
    # every answer the same text: nothing to prefer
    out = form_pairs(torch.tensor([[0.0, 1.0]]), [["same", "same"]], 0.0)
    assert (out.pairs, out.no_contrast) == ([], 1)


def test_round_prompts_walk_one_shuffle_and_are_reproducible():
    n, per = 10, 4
    rounds = [round_prompts(n, per, k, seed=3) for k in (1, 2, 3)]
    assert all(r == sorted(r) and len(r) == per for r in rounds)
    assert not set(rounds[0]) & set(rounds[1])  # fresh prompts while they last
    assert set(rounds[0]) | set(rounds[1]) | set(rounds[2]) == set(range(n))  # 12 picks wrap around all 10
    assert rounds[0] == round_prompts(n, per, 1, seed=3)
    assert rounds[0] != round_prompts(n, per, 1, seed=4) or rounds[1] != round_prompts(n, per, 2, seed=4)
    assert round_prompts(n, 0, 5, seed=0) == list(range(n)) == round_prompts(n, 99, 1, seed=0)


def test_answer_stats_by_hand():
    texts = ["a b c d a b c d a b c d", "hello there", "x"]
    stats = answer_stats(texts, [12, 2, 1], ["length", "eos", "stop"])
    assert stats["loop_share"] == pytest.approx(1 / 3)
    assert stats["eos_share"] == pytest.approx(1 / 3)
    assert stats["finished_share"] == pytest.approx(2 / 3)
    assert stats["mean_tokens"] == pytest.approx(5.0)


LOOPING = "I can help. I can help you with that. I can help you with that. I can help you with that."


def test_the_loop_penalty_lowers_exactly_the_answers_that_loop():
    texts = ["Preheat the oven, then bake the pie for an hour.", LOOPING, "Sure.", LOOPING + " Anything else?"]
    combined = torch.tensor([0.5, 2.0, -1.0, 1.5], dtype=torch.float64)
    flags = [loops(t) for t in texts]
    got = penalise(combined, flags, 4.0)
    assert sum(flags) == 2 and got.tolist() == [0.5, -2.0, -1.0, -2.5]
    assert penalise(combined, flags, 0.0).tolist() == combined.tolist()  # 0: off
    assert answer_stats(texts, [1] * 4, ["eos"] * 4, flags)["loop_share"] == answer_stats(texts, [1] * 4, ["eos"] * 4)[
        "loop_share"] == 0.5  # the caller's flags count as the recomputed ones
    with pytest.raises(ValueError):
        penalise(combined, flags[:3], 1.0)


def test_in_scope_keeps_the_flags_of_the_named_routes_only():
    flags, routes = [True, True, False, True], [0, 1, 1, 2]
    assert in_scope(flags, routes, None) == flags  # no scope: every flag
    assert in_scope(flags, routes, [1]) == [False, True, False, False]
    assert in_scope(flags, ["harmless-base", "helpful-base", "helpful-base", "x"], ("helpful-base", "x")) == \
        [False, True, False, True]
    with pytest.raises(ValueError, match="3 flags for 4 routes"):
        in_scope(flags[:3], routes, [1])


def test_with_the_evasion_penalty_a_refusal_loses_its_pair():
    """The harmless reward model liked the refusal best on a benign prompt; penalised, the answer that engages wins."""
    refusal = "I'm sorry for your loss, but as a chatbot, I'm not equipped to provide advice or support."
    texts = [["Bake the pie at 425F for 15 minutes, then at 350F.", refusal, "Pumpkin pie needs eggs."]]
    combined = torch.tensor([[0.3, 1.2, -0.4]], dtype=torch.float64)
    flags = [evades(t) for t in texts[0]]
    assert flags == [False, True, False]
    assert form_pairs(combined, texts, 0.0).pairs[0].chosen == 1
    penalised = penalise(combined.flatten(), flags, 2.0)
    assert form_pairs(penalised.reshape(1, 3), texts, 0.0).pairs == [Pair(0, 0, 1, pytest.approx(0.3 - (1.2 - 2.0)))]


def test_with_the_penalty_a_loop_is_rejected_instead_of_chosen():
    """The reward model liked the looping answer best; penalised, it becomes the rejected one."""
    texts = [["A short, clear answer.", LOOPING, "Another answer here."]]
    combined = torch.tensor([[0.3, 1.2, -0.4]], dtype=torch.float64)
    assert form_pairs(combined, texts, 0.0).pairs == [Pair(0, 1, 2, pytest.approx(1.6))]
    penalised = penalise(combined.flatten(), [loops(t) for t in texts[0]], 4.0)
    assert form_pairs(penalised.reshape(1, 3), texts, 0.0).pairs == [Pair(0, 0, 1, pytest.approx(0.3 - (1.2 - 4.0)))]


def test_a_round_decodes_256_rows_at_once_on_a_gpu_unless_told():
    from minialign.commands.online import gen_batch_size

    def on(device: str):
        return torch.device(device)

    cfg = OnlineConfig(reward_models="rm")
    assert gen_batch_size(cfg, on("cuda")) == 256 and gen_batch_size(cfg, on("cpu")) is None  # generate's own: 8
    assert gen_batch_size(OnlineConfig(reward_models="rm", gen_batch_size=64), on("cuda")) == 64


def test_evasion_routes_name_reward_models_by_their_route_value_not_their_place():
    routed = dict(reward_models="rm1,rm2", combine="route", rm_routes="b,a", evasion_penalty=2.0)
    assert OnlineConfig(**routed, evasion_routes="a").evasion_route_ids() == [1]  # "a" is the second reward model
    assert OnlineConfig(**routed, evasion_routes=" a , b, a").evasion_route_ids() == [0, 1]
    assert OnlineConfig(**routed).evasion_route_ids() is None  # empty: every prompt
