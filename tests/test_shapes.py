"""Shapes planned before training: the least padding for a bounded number of shapes, and every batch fits one."""

import itertools
import random

import pytest

from minialign.config.schema import SFTConfig
from minialign.data import TokenizedExample, TokenizedPair, collate_pairs, collate_sft, flat_sizes, pad_row
from minialign.ops.shapes import buckets, plan_shapes


def brute_force(values: list[int], k: int, multiple: int, slack: int) -> int:
    """Least total padding over every choice of at most k sizes (from the rounded values) covering all values."""
    fitted = sorted({-(-(v + slack) // multiple) * multiple for v in values})
    best = None
    for n in range(k):
        for rest in itertools.combinations(fitted[:-1], n):
            chosen = sorted(rest) + [fitted[-1]]
            cost = sum(min(c for c in chosen if c >= v + slack) - v for v in values)
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("k,multiple,slack", [(1, 1, 0), (2, 1, 0), (3, 4, 1), (4, 8, 1)])
def test_buckets_pad_least(k, multiple, slack):
    rng = random.Random(k)
    values = [rng.randint(1, 90) for _ in range(40)]
    chosen = buckets(values, k, multiple, slack)
    assert len(chosen) <= k and all(c % multiple == 0 for c in chosen)
    assert max(chosen) >= max(values) + slack
    padding = sum(min(c for c in chosen if c >= v + slack) - v for v in values)
    assert padding == brute_force(values, k, multiple, slack)


def test_buckets_keep_every_size_when_allowed():
    assert buckets([5, 9, 9, 30], 8) == [5, 9, 30]
    assert buckets([], 3) == []


def test_plan_covers_every_batch_with_room_for_a_padding_segment():
    rng = random.Random(0)
    sizes = [(rng.randint(900, 7000), rng.randint(100, 2000)) for _ in range(300)]
    plan = plan_shapes(sizes, max_lengths=4, max_targets=2, length_multiple=64, target_multiple=64,
                       longest_sequence=512)
    assert len(plan.lengths) <= 4 and plan.n_shapes <= 8
    for tokens, targets in sizes:
        shape = plan.fit(tokens, targets)
        assert shape.length >= tokens + 1 and shape.targets >= targets
        assert shape.length in plan.lengths and shape.targets in plan.targets[shape.length]
        assert shape.length - tokens <= plan.max_seqlen
    assert plan.unplanned == [] and plan.max_seqlen >= 512
    assert 0 < plan.padding < 0.5 and "4 row length(s)" in plan.describe()
    assert plan.fit(10_000, 5) is not None and plan.unplanned == [(10_000, 5)]  # an unseen size is remembered


def ids(rng, n):
    return [rng.randrange(1, 100) for _ in range(n)]


@pytest.mark.parametrize("share_prompt", [False, True])
def test_flat_sizes_match_the_collated_batches(share_prompt):
    """The planner's sizes, summed over a batch's examples, are the collated batch's positions and targets."""
    rng = random.Random(1)
    pairs = [TokenizedPair(ids(rng, rng.randint(1, 30)), ids(rng, rng.randint(1, 20)), ids(rng, rng.randint(1, 20)))
             for _ in range(12)]
    examples = [TokenizedExample(ids(rng, rng.randint(0, 30)), ids(rng, rng.randint(1, 20))) for _ in range(12)]
    for batch, sizes in (
        (collate_pairs(pairs, pad_id=0, flat=True, share_prompt=share_prompt), flat_sizes(pairs, share_prompt=share_prompt)),
        (collate_sft(examples, pad_id=0, flat=True), flat_sizes(examples)),
    ):
        assert batch["input_ids"].shape[1] == sum(t for t, _ in sizes)
        assert batch["n_targets"] == sum(n for _, n in sizes) == int((batch["targets"] != -100).sum())


def test_pad_row_relays_a_flat_batch():
    rng = random.Random(2)
    examples = [TokenizedExample(ids(rng, 5), ids(rng, 4)) for _ in range(3)]
    batch = collate_sft(examples, pad_id=7, flat=True, pad_to_multiple_of=8)  # 27 positions, padded to 32
    for length in (28, 40):  # shorter than the collated row (its padding is dropped) and longer
        padded = pad_row(batch, length, pad_id=0)
        assert padded["input_ids"].shape == (1, length)
        torch_equal = (padded["targets"][0, :27] == batch["targets"][0, :27]).all()
        assert torch_equal and (padded["doc_ids"][0, 27:] == -1).all() and (padded["targets"][0, 27:] == -100).all()
        assert (padded["attention_mask"][0, 27:] == 0).all() and padded["n_targets"] == batch["n_targets"]
    with pytest.raises(ValueError):
        pad_row(batch, 26)


@pytest.mark.parametrize("device,fast,expect", [
    ("cuda", "auto", (True, True)), ("cpu", "auto", (False, False)), ("cpu", "on", (True, False)),
    ("cuda", "off", (False, False)),
])
def test_fast_setting(device, fast, expect):
    cfg = SFTConfig(fast=fast)
    cfg.apply_fast(device, world=1)
    assert (cfg.padding_free, cfg.cuda_graphs) == expect


def test_fast_setting_leaves_out_what_a_run_cannot_graph():
    for changes in (dict(grad_accum=2), dict(optim_in_backward=True, max_grad_norm=0), dict(grad_checkpointing=True)):
        cfg = SFTConfig(fast="on", **changes)
        cfg.apply_fast("cuda", world=1)
        assert cfg.padding_free and not cfg.cuda_graphs
        cfg.validate()
    cfg = SFTConfig(fast="on")
    cfg.apply_fast("cuda", world=2)  # torchrun: no graphs across ranks
    assert cfg.padding_free and not cfg.cuda_graphs
    packed = SFTConfig(fast="on", packing=True)
    packed.apply_fast("cuda", world=1)
    assert not packed.padding_free and packed.cuda_graphs
