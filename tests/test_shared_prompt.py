"""Shared-prompt DPO batches: each prompt computed once, both responses branching off it, give the numbers of the
ordinary padded batch (the reference): per-sequence log-prob sums, the DPO loss, its metrics and every gradient.

If a branch could see the other branch, or missed a prompt token, or its positions did not continue the prompt's,
these comparisons fail. The FlexAttention mask is compared with the dense one; both with a brute-force mask built
from the layout's definition.
"""

import random

import pytest
import torch
from test_flat_batches import _ids, assert_same, lora_policy, loss_and_grads
from torch.nn.attention.flex_attention import create_mask

from minialign.data import TokenizedPair, block_causal_mask, collate_pairs, tokens_in
from minialign.modeling.policy import document_block_mask
from minialign.ops.losses import PreferenceLoss
from minialign.training.batches import add_target_index
from minialign.training.graphs import graph_key
from minialign.training.tasks import DPOTask, sequence_sums


def pairs() -> list[TokenizedPair]:
    rng = random.Random(2)
    # prompts of 5, 1 (nothing left to share) and 8 tokens; a one-token response; a prompt-less pair
    return [TokenizedPair(_ids(rng, p), _ids(rng, c), _ids(rng, r))
            for p, c, r in [(5, 9, 4), (1, 2, 12), (8, 1, 6), (0, 3, 5)]]


def shared_batch(ps=None, multiple=None) -> dict:
    return collate_pairs(ps or pairs(), pad_id=0, index=[4, 5, 6, 7], flat=True, share_prompt=True,
                         pad_to_multiple_of=multiple)


def test_layout_holds_each_prompt_once_and_branches_continue_its_positions():
    ps = pairs()
    batch = shared_batch(ps)
    flat = collate_pairs(ps, pad_id=0, flat=True)
    n_prompt = sum(len(p.prompt_ids) for p in ps)
    assert batch["n_tokens"] == tokens_in(flat) == int(flat["attention_mask"].sum())
    assert int(batch["attention_mask"].sum()) == tokens_in(flat) - n_prompt + 3  # 3 pairs repeat their last prompt token
    assert batch["n_targets"] == flat["n_targets"] and batch["n_sequences"] == 8 and batch["n_pairs"] == 4
    ids, pos, doc = batch["input_ids"][0], batch["position_ids"][0], batch["doc_ids"][0]
    p = ps[0]  # pair 0: shared [p0..p3] (doc 8), chosen [p4, c...] (doc 0), rejected [p4, r...] (doc 4)
    assert ids[:4].tolist() == p.prompt_ids[:4] and doc[:4].tolist() == [8] * 4
    chosen = slice(4, 4 + 1 + len(p.chosen_ids))
    assert ids[chosen].tolist() == p.prompt_ids[4:] + p.chosen_ids and pos[chosen].tolist() == list(range(4, 14))
    rejected = slice(chosen.stop, chosen.stop + 1 + len(p.rejected_ids))
    assert ids[rejected].tolist() == p.prompt_ids[4:] + p.rejected_ids and pos[rejected].tolist() == list(range(4, 9))
    assert set(doc[chosen].tolist()) == {0} and set(doc[rejected].tolist()) == {4}
    assert set(batch["prefix_ids"][0, :rejected.stop].tolist()) == {8}
    # the targets of each sequence, in order, are those of the flat batch
    for seq in range(8):
        flat_targets = flat["targets"][0][flat["doc_ids"][0] == seq]
        shared_targets = batch["targets"][0][doc == seq]
        assert flat_targets[flat_targets >= 0].tolist() == shared_targets[shared_targets >= 0].tolist()


def test_padded_share_prompt_is_refused():
    with pytest.raises(ValueError, match="share_prompt needs flat"):
        collate_pairs(pairs(), pad_id=0, share_prompt=True)


@pytest.mark.parametrize("block", [4, 16])
def test_masks_are_the_definition(block):
    """Query i reads key j iff j <= i and j is in i's own sequence or in the shared prompt of i's pair."""
    batch = shared_batch(multiple=16)
    doc, prefix = batch["doc_ids"], batch["prefix_ids"]
    length = doc.shape[1]
    expected = torch.zeros(1, 1, length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(i + 1):
            expected[0, 0, i, j] = bool(doc[0, i] == doc[0, j] or prefix[0, i] == doc[0, j])
    assert (doc == -1).any()  # rounding padding is there, and sees only itself
    dense = block_causal_mask(doc, prefix)
    assert torch.equal(dense, expected)
    flex = document_block_mask(doc, prefix, block_size=block)
    assert torch.equal(create_mask(flex.mask_mod, 1, 1, length, length, device="cpu"), expected)
    n = -(-length // block)  # the block list a GPU kernel walks: exactly the blocks that hold a readable key
    tiles = torch.zeros(1, 1, n * block, n * block, dtype=torch.bool)
    tiles[..., :length, :length] = expected
    assert torch.equal(flex.to_dense().bool(), tiles.view(1, 1, n, block, n, block).any(dim=(3, 5)))
    unshared = collate_pairs(pairs(), pad_id=0, flat=True)
    assert torch.equal(block_causal_mask(unshared["doc_ids"], unshared["doc_ids"]), block_causal_mask(unshared["doc_ids"]))


def test_shared_prompt_gives_the_padded_batch_sums_loss_and_gradients():
    policy = lora_policy()
    ps = pairs()
    padded = add_target_index(collate_pairs(ps, pad_id=0, index=[4, 5, 6, 7]))
    shared = add_target_index(shared_batch(ps, multiple=16), 16)
    for normalise in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(sequence_sums(policy, shared, normalise), sequence_sums(policy, padded, normalise),
                                       rtol=1e-5, atol=1e-5)
    reference = lambda batch: torch.linspace(-3.0, 3.0, 2 * batch["n_pairs"])  # noqa: E731
    task = DPOTask(reference, PreferenceLoss(beta=0.1))
    padded_run, shared_run = loss_and_grads(policy, task, padded), loss_and_grads(policy, task, shared)
    assert_same(shared_run, padded_run, loss_atol=1e-6)
    for key in ("rewards/margins", "rewards/accuracies"):
        torch.testing.assert_close(shared_run[2][key], padded_run[2][key], rtol=1e-5, atol=1e-5)


def test_graph_key_ignores_the_token_count():
    """n_tokens is read by the host only: batches of one shape share one captured step whatever it says."""
    a, b = shared_batch(), shared_batch()
    b["n_tokens"] += 1
    assert graph_key(a) == graph_key(b)


def test_flex_attention_reads_the_shared_prompt():
    """The GPU path (FlexAttention BlockMask from doc_ids and prefix_ids), run by its CPU reference implementation."""
    from minialign.modeling.policy import TokenLogps

    policy = lora_policy()
    flex = TokenLogps(policy.model, attention="flex")
    ps = pairs()
    padded = add_target_index(collate_pairs(ps, pad_id=0))
    with torch.no_grad():
        torch.testing.assert_close(sequence_sums(flex, add_target_index(shared_batch(ps, multiple=16)), False),
                                   sequence_sums(policy, padded, False), rtol=1e-5, atol=1e-5)
