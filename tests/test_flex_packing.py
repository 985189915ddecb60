"""Packed SFT rows under a FlexAttention document mask: the same log-probs and gradients as the dense block mask
and as each document run alone, and unpacked batches untouched.

On a CPU FlexAttention runs eagerly (an unfused math path that applies the mask function, not the block lists a
GPU kernel walks), so the block lists are checked separately against the dense mask. Its backward is refused on a
CPU by a device check only; the gradient test lifts that check to run the same math path backwards.
"""

import random

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_mask
from transformers import LlamaConfig, LlamaForCausalLM

from minialign.data import TokenizedExample, block_causal_mask, collate_packed, collate_sft
from minialign.modeling import lora
from minialign.modeling.models import load_model
from minialign.modeling.policy import TokenLogps, document_block_mask, run_logps
from minialign.ops.attention import FLEX_DOCUMENTS
from minialign.training.batches import add_target_index

ROW = 48  # not a multiple of the block sizes below: the last block of every row is ragged


def examples(seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    lengths = [(5, 9), (3, 14), (7, 6), (4, 11), (6, 5), (2, 20), (9, 8), (3, 6)]  # 14, 17, 13, 15, 11, 22, 17, 9 tokens
    return [TokenizedExample([rng.randint(1, 999) for _ in range(p)], [rng.randint(1, 999) for _ in range(r - 1)] + [0])
            for p, r in lengths]


# Rows of example indices: several documents per row, padding at the end of rows 0 and 1, row 2 full.
ROWS = [[0, 1, 2], [3, 4], [5, 6, 7]]


def packed_batch(exs) -> dict:
    return add_target_index(collate_packed(exs, ROWS, row_length=ROW, pad_id=0))


def tiny_llama() -> torch.nn.Module:
    """A second architecture with grouped-query attention (4 query heads over 2 key/value heads)."""
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float()


MODELS = {"gpt-neox tiny": lambda: load_model("tiny"), "llama gqa": tiny_llama}


# ----------------------------------------------------------------------------- the mask itself


@pytest.mark.parametrize("block", [8, 16, 128])
def test_block_mask_is_the_dense_document_mask(block):
    doc_ids = packed_batch(examples(0))["doc_ids"]
    assert (doc_ids[1] == -1).any() and (doc_ids[2] != -1).all()  # padding in one row, none in another
    dense = block_causal_mask(doc_ids)
    bm = document_block_mask(doc_ids, block_size=block)
    assert isinstance(bm, BlockMask)
    rows, length = doc_ids.shape
    assert torch.equal(create_mask(bm.mask_mod, rows, 1, length, length, device="cpu"), dense)

    # Block lists, which a GPU kernel trusts: a listed "full" block skips the mask function, an unlisted one is
    # never visited. Blocks past the row end count as masked.
    n = -(-length // block)
    padded = torch.zeros(rows, 1, n * block, n * block, dtype=torch.bool)
    padded[..., :length, :length] = dense
    tiles = padded.view(rows, 1, n, block, n, block)
    any_true, all_true = tiles.any(dim=(3, 5)), tiles.all(dim=(3, 5))
    assert torch.equal(bm.to_dense().bool(), any_true)
    full = BlockMask.from_kv_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=block,
                                    seq_lengths=(length, length)).to_dense().bool()
    assert torch.equal(full, all_true)
    if block == 8:
        assert not any_true.all() and all_true.any()  # the test sees skipped and full blocks, not just partial ones


def test_cpu_default_keeps_the_dense_mask():
    doc_ids = packed_batch(examples(0))["doc_ids"]
    assert isinstance(TokenLogps(load_model("tiny")).document_mask(doc_ids), torch.Tensor)  # auto on a CPU
    assert isinstance(TokenLogps(load_model("tiny"), attention="sdpa").document_mask(doc_ids), torch.Tensor)
    assert isinstance(TokenLogps(load_model("tiny"), attention="flex").document_mask(doc_ids), BlockMask)
    assert "attn_bias" not in packed_batch(examples(0))  # no [R, L, L] mask is built on the host any more


# ----------------------------------------------------------------------------- log-probs


def per_document_logps(policy, exs) -> torch.Tensor:
    """Each document alone, unpadded, in the packed batch's target order."""
    out = []
    for row in ROWS:
        for i in row:
            out.append(run_logps(policy, add_target_index(collate_sft([exs[i]], pad_id=0))))
    return torch.cat(out)


@pytest.mark.parametrize("name", list(MODELS))
def test_flex_logps_match_dense_and_per_document(name):
    exs = examples(1)
    model = MODELS[name]().eval()
    flex, dense = TokenLogps(model, attention="flex"), TokenLogps(model, attention="sdpa")
    assert model.config._attn_implementation == FLEX_DOCUMENTS
    batch = packed_batch(exs)
    with torch.no_grad():
        got = run_logps(flex, batch)
        want_dense = run_logps(dense, batch)
        want_alone = per_document_logps(dense, exs)
        # Teeth: attention across documents (a plain causal mask) changes every later document's log-probs.
        leaky = run_logps(dense, {**batch, "doc_ids": torch.zeros_like(batch["doc_ids"])})
    assert got.shape == want_alone.shape == (batch["n_targets"],)
    torch.testing.assert_close(got, want_dense, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, want_alone, rtol=0, atol=1e-5)
    assert (leaky - want_alone).abs().max() > 1e-3


def test_unpacked_batches_are_untouched():
    """A model switched to SDPA-or-Flex gives bit-identical results on ordinary padded batches."""
    exs = examples(2)
    batch = add_target_index(collate_sft(exs, pad_id=0, pad_to_multiple_of=8))
    with torch.no_grad():
        plain = load_model("tiny")
        assert plain.config._attn_implementation == "sdpa"
        before = run_logps(TokenLogps(plain, attention="sdpa"), batch)
        switched = load_model("tiny")
        after = run_logps(TokenLogps(switched, attention="flex"), batch)
    assert switched.config._attn_implementation == FLEX_DOCUMENTS
    assert torch.equal(before, after)


# ----------------------------------------------------------------------------- gradients


def lora_grads(policy, batches) -> dict[str, torch.Tensor]:
    policy.zero_grad(set_to_none=True)
    for batch in batches:
        run_logps(policy, batch).sum().backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_flex_gradients_match_dense_and_per_document(monkeypatch):
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda q, k, v: None)  # the CPU refusal of backward, nothing else
    exs = examples(3)
    model = load_model("tiny")
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give B values so every adapter has a gradient
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.normal_(0, 0.05)
    batch = packed_batch(exs)
    flex = lora_grads(TokenLogps(model, attention="flex"), [batch])
    dense = lora_grads(TokenLogps(model, attention="sdpa"), [batch])
    alone = lora_grads(TokenLogps(model, attention="sdpa"),
                       [add_target_index(collate_sft([exs[i]], pad_id=0)) for row in ROWS for i in row])
    leaky = lora_grads(TokenLogps(model, attention="sdpa"), [{**batch, "doc_ids": torch.zeros_like(batch["doc_ids"])}])
    assert flex.keys() == dense.keys() == alone.keys() and len(flex) > 0
    for n in flex:
        scale = alone[n].abs().max().clamp(min=1.0)
        torch.testing.assert_close(flex[n] / scale, dense[n] / scale, rtol=0, atol=2e-5, msg=n)
        torch.testing.assert_close(flex[n] / scale, alone[n] / scale, rtol=0, atol=2e-5, msg=n)
    assert max((leaky[n] - alone[n]).abs().max() for n in flex) > 1e-3
