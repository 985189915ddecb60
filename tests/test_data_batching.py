"""Batch order across epochs and ranks, packing, and packed-batch masks."""

import random
from collections import Counter

import pytest
import torch

from minialign.base.errors import UserError
from minialign.data import (
    TokenizedExample,
    batch_indices,
    block_causal_mask,
    collate_packed,
    collate_sft,
    pack_sft,
    sequence_lengths,
)


def random_examples(n: int, seed: int, max_len: int = 40) -> list[TokenizedExample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = rng.randint(1, max_len // 2), rng.randint(1, max_len // 2)
        prompt, response = [rng.randint(1, 99) for _ in range(p)], [rng.randint(0, 99) for _ in range(r - 1)]
        out.append(TokenizedExample(prompt, response + [0]))
    return out


# ----------------------------------------------------------------------------- batch_indices


def test_batch_indices_deterministic_and_per_epoch():
    a = batch_indices(103, 8, seed=1, epoch=0)
    assert a == batch_indices(103, 8, seed=1, epoch=0)
    assert a != batch_indices(103, 8, seed=1, epoch=1) and a != batch_indices(103, 8, seed=2, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert [len(b) for b in a] == [8] * 12 + [7]
    assert [len(b) for b in batch_indices(103, 8, seed=1, epoch=0, drop_last=True)] == [8] * 12
    assert batch_indices(5, 2, seed=0, epoch=0, shuffle=False) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("group", [False, True])
def test_two_ranks_see_the_global_batches_of_one(group):
    lengths = [random.Random(i).randint(1, 500) for i in range(1001)]
    kw = dict(seed=7, epoch=3, lengths=lengths, group_by_length=group)
    single = batch_indices(1001, 4, **kw)
    ranks = [batch_indices(1001, 2, rank=r, world_size=2, **kw) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, global_batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == global_batch
    assert ranks[0][:-1] == [b[:2] for b in single[:-1]]  # contiguous slice of every full batch
    assert sorted(i for b in ranks[0] + ranks[1] for i in b) == list(range(1001))


def test_length_grouping_reduces_padding():
    lengths = [random.Random(i).randint(1, 500) for i in range(2000)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = batch_indices(2000, 8, seed=0, epoch=0)
    grouped = batch_indices(2000, 8, seed=0, epoch=0, lengths=lengths, group_by_length=True)
    assert sorted(i for b in grouped for i in b) == list(range(2000))
    assert padding(grouped) < padding(plain) / 5
    firsts = [lengths[b[0]] for b in grouped]
    assert firsts != sorted(firsts, reverse=True)  # batch order is shuffled, not sorted by length
    assert sequence_lengths([TokenizedExample([1, 2], [3, 0])]) == [4]


def test_batch_indices_bad_arguments():
    with pytest.raises(UserError, match="batch_size=0"):
        batch_indices(10, 0, seed=0, epoch=0)
    with pytest.raises(ValueError):
        batch_indices(10, 2, seed=0, epoch=0, group_by_length=True)


# ----------------------------------------------------------------------------- packing


def test_packing_keeps_every_token_once_and_masks_within_documents():
    examples = random_examples(300, seed=0)
    rows = pack_sft(examples, row_length=64)
    assert sorted(i for r in rows for i in r) == list(range(300))
    batch = collate_packed(examples, rows, row_length=64, pad_id=0)
    ids, docs, pos, tgt = batch["input_ids"], batch["doc_ids"], batch["position_ids"], batch["targets"]
    assert ids.shape == (len(rows), 64) and batch["attention_mask"].tolist() == (docs >= 0).long().tolist()
    seen = Counter()
    for r, members in enumerate(rows):
        assert batch["doc_lengths"][r] == [len(examples[i].prompt_ids) + len(examples[i].response_ids) for i in members]
        for d, i in enumerate(members):
            where = docs[r] == d
            seq = examples[i].prompt_ids + examples[i].response_ids
            assert ids[r][where].tolist() == seq and pos[r][where].tolist() == list(range(len(seq)))
            # the targets of a document are exactly those of the same example collated alone
            alone = collate_sft([examples[i]], pad_id=0)["targets"][0, : len(seq)]
            assert tgt[r][where].tolist() == alone.tolist() and alone[-1] == -100
            seen.update((i, t) for t in seq)
    assert seen == Counter((i, t) for i, ex in enumerate(examples) for t in ex.prompt_ids + ex.response_ids)
    # no target crosses a document boundary: a target at t is always the next token of the same document
    t_idx = (tgt != -100).nonzero()
    assert (docs[t_idx[:, 0], t_idx[:, 1] + 1] == docs[t_idx[:, 0], t_idx[:, 1]]).all()
    assert (tgt[t_idx[:, 0], t_idx[:, 1]] == ids[t_idx[:, 0], t_idx[:, 1] + 1]).all()
    assert batch["n_targets"] == len(t_idx) == sum(len(ex.response_ids) for ex in examples)
    assert (pos[docs < 0] == 0).all() and (tgt[docs < 0] == -100).all()
    used = sum(len(ex.prompt_ids) + len(ex.response_ids) for ex in examples)
    assert used / (64 * len(rows)) > 0.9  # best fit packs densely


def test_packed_hand_checked_row_and_mask():
    examples = [TokenizedExample([5], [6, 0]), TokenizedExample([7, 8], [0])]
    rows = pack_sft(examples, row_length=6)
    assert rows == [[0, 1]]
    b = collate_packed(examples, rows, row_length=6, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 0, 7, 8, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2]]
    assert b["doc_ids"].tolist() == [[0, 0, 0, 1, 1, 1]]
    assert b["targets"].tolist() == [[6, 0, -100, -100, 0, -100]]
    assert b["n_targets"] == 3 and b["doc_lengths"] == [[3, 3]]
    mask = block_causal_mask(torch.tensor([[0, 0, 1, -1]]))[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_packing_rejects_an_example_longer_than_a_row():
    with pytest.raises(UserError, match="example 1 has 7 tokens, more than the packing row length 6"):
        pack_sft([TokenizedExample([1], [0]), TokenizedExample([1, 2, 3], [4, 5, 6, 0])], row_length=6)
