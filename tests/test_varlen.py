"""Varlen attention's segment description against the document masks it replaces, and models trained through it.

The FlashAttention kernels need CUDA (``benchmarks/checks/check_varlen.py`` checks them against ``varlen_reference`` on a
GPU); here ``varlen_reference``, which runs wherever CUDA does not, is checked against ``block_causal_mask`` built
from the same batch, and whole models against their padded batches.
"""

import random

import pytest
import torch
import torch.nn.functional as F

from minialign.data import (
    TokenizedExample,
    TokenizedPair,
    block_causal_mask,
    collate_packed,
    collate_pairs,
    collate_sft,
    pack_sft,
    pad_row,
)
from minialign.modeling import lora
from minialign.modeling.models import load_model
from minialign.modeling.policy import TokenLogps
from minialign.ops.attention import kv_slots, varlen_index, varlen_reference
from minialign.ops.losses import PreferenceLoss
from minialign.training.batches import prepare_batch
from minialign.training.tasks import DPOTask, SFTTask, sequence_sums


def ids(rng, n):
    return [rng.randrange(1, 200) for _ in range(n)]


def batches(rng) -> dict[str, dict]:
    pairs = [TokenizedPair(ids(rng, rng.randint(2, 20)), ids(rng, rng.randint(1, 12)), ids(rng, rng.randint(1, 12)))
             for _ in range(5)]
    docs = [TokenizedExample(ids(rng, rng.randint(0, 10)), ids(rng, rng.randint(1, 12))) for _ in range(7)]
    rows = pack_sft(docs, 40)
    return {
        "sft": pad_row(collate_sft(docs, pad_id=0, flat=True), 128),
        "dpo": pad_row(collate_pairs(pairs, pad_id=0, flat=True), 256),
        "dpo-shared": pad_row(collate_pairs(pairs, pad_id=0, flat=True, share_prompt=True), 160),
        "packed": collate_packed(docs, rows, row_length=40, pad_id=0),  # several rows, each with its padding
    }


@pytest.mark.parametrize("layout", ["sft", "dpo", "dpo-shared", "packed"])
def test_segments_attend_like_the_document_mask(layout):
    """Same outputs as SDPA under the dense document mask (shared prompts included), for grouped-query heads."""
    batch = batches(random.Random(0))[layout]
    rows, length = batch["doc_ids"].shape
    kv = kv_slots(length) if "prefix_ids" in batch else None
    meta = varlen_index(batch["doc_ids"], batch.get("prefix_ids"), kv_length=kv)
    assert meta["cu_seqlens_q"][-1] == rows * length  # every position belongs to a segment
    assert ("kv_index" in meta) == (layout == "dpo-shared")
    g = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 4, length, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(rows, 2, length, 8, generator=g, dtype=torch.float64) for _ in range(2))
    flat = [x.transpose(1, 2).reshape(rows * length, x.shape[1], 8) for x in (q, k, v)]
    out = varlen_reference(*flat, meta["cu_seqlens_q"], meta["cu_seqlens_k"], meta.get("kv_index"))
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=block_causal_mask(batch["doc_ids"], batch.get("prefix_ids")),
                                           enable_gqa=True).transpose(1, 2).reshape(rows * length, 4, 8)
    real = batch["doc_ids"].flatten() >= 0  # padding reads only padding in both, but in other groupings
    torch.testing.assert_close(out[real], dense[real], rtol=1e-10, atol=1e-10)


def test_segment_boundaries_and_bounds():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1]])
    meta = varlen_index(doc_ids)
    assert meta["cu_seqlens_q"].tolist() == [0, 3, 5, 8] and meta["max_seqlen"] == 3
    assert meta["cu_seqlens_q"].dtype == torch.int32 and "kv_index" not in meta
    prefix = torch.tensor([[2, 2, 2, 2, 2, -1, -1, -1]])  # branches 0 and 1 read the shared prompt, doc 2
    shared = varlen_index(torch.tensor([[2, 2, 0, 1, 1, -1, -1, -1]]), prefix, kv_length=20)
    assert shared["cu_seqlens_k"].tolist() == [0, 2, 5, 9, 12]  # prompt, prompt+branch, prompt+branch, padding
    assert shared["kv_index"][:12].tolist() == [0, 1, 0, 1, 2, 0, 1, 3, 4, 5, 6, 7] and len(shared["kv_index"]) == 20
    assert varlen_index(doc_ids, max_seqlen=16)["max_seqlen"] == 16
    with pytest.raises(ValueError):
        varlen_index(doc_ids, max_seqlen=2)
    with pytest.raises(ValueError):
        varlen_index(torch.tensor([[2, 2, 0, 1, 1, -1, -1, -1]]), prefix, kv_length=5)


@pytest.mark.parametrize("model_name", ["tiny", "tiny-llama"])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_models_score_varlen_batches_like_padded_ones(model_name, share_prompt):
    """GPT-NeoX and Llama (grouped-query attention, tied head) through the varlen path: the same DPO sequence
    log-probs, loss and LoRA gradients as the padded batch, with the row padded to a planned length."""
    torch.manual_seed(0)
    model = load_model(model_name).double()
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8), dtype=torch.float64)
    for p in model.parameters():  # B starts at zero: make the adapters matter
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    rng = random.Random(3)
    pairs = [TokenizedPair(ids(rng, rng.randint(3, 15)), ids(rng, rng.randint(1, 9)), ids(rng, rng.randint(1, 9)))
             for _ in range(4)]
    padded = prepare_batch(collate_pairs(pairs, pad_id=0))
    flat = collate_pairs(pairs, pad_id=0, flat=True, share_prompt=share_prompt)
    flat = prepare_batch(pad_row(flat, flat["input_ids"].shape[1] + 9), target_multiple=16, varlen=True)
    assert "cu_seqlens_q" in flat and len(flat["tgt_index"]) % 16 == 0
    policy = TokenLogps(model, attention="varlen")
    task = DPOTask(lambda b: torch.zeros(2 * b["n_pairs"], dtype=torch.float64), PreferenceLoss(beta=0.1))
    results = []
    for batch in (padded, flat):
        model.zero_grad()
        loss, _ = task.loss(policy, batch)
        loss.backward()
        results.append((sequence_sums(policy, batch, False).detach(), loss.detach(),
                        [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (s_pad, l_pad, g_pad), (s_flat, l_flat, g_flat) = results
    torch.testing.assert_close(s_flat, s_pad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(l_flat, l_pad, rtol=1e-9, atol=1e-9)
    for a, b in zip(g_flat, g_pad):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_sft_varlen_loss_matches_padded():
    torch.manual_seed(0)
    model = load_model("tiny-llama").double()
    rng = random.Random(4)
    docs = [TokenizedExample(ids(rng, rng.randint(0, 10)), ids(rng, rng.randint(1, 12))) for _ in range(6)]
    policy = TokenLogps(model, attention="varlen")
    padded = SFTTask().loss(policy, prepare_batch(collate_sft(docs, pad_id=0)))[0]
    flat = SFTTask().loss(policy, prepare_batch(pad_row(collate_sft(docs, pad_id=0, flat=True), 100), varlen=True))[0]
    torch.testing.assert_close(flat, padded, rtol=1e-10, atol=1e-10)
