"""Held-out SFT loss per example and the paired interval between two models (``evaluation.evaluate``): the sums
against a float64 recomputation of each example alone and the pooled loss, and the bootstrap against a
recomputation from the same draws."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from minialign.data import load_preference_pairs
from minialign.data.tokenize import tokenize_sft
from minialign.evaluation.evaluate import heldout_loss, heldout_nll, loss_difference
from minialign.modeling.models import load_model, load_tokenizer
from tests.conftest import HH, load_benchmark


def test_per_example_sums_pool_to_the_heldout_loss_and_score_each_example_alone():
    tok = load_tokenizer("demo")
    items = tokenize_sft(load_preference_pairs("demo", rows="0:11"), tok, max_length=64, max_prompt_length=32)
    model = load_model("tiny", seed=0)
    per = heldout_nll(model, items, pad_id=tok.pad_token_id, batch_size=4)
    assert per.shape == (11, 2) and per.dtype == torch.float64
    assert per[:, 1].tolist() == [float(len(ex.response_ids)) for ex in items]  # every response token is a target
    pooled = heldout_loss(model, items, pad_id=tok.pad_token_id, batch_size=4)["loss"]
    assert (per[:, 0].sum() / per[:, 1].sum()).item() == pytest.approx(pooled, rel=1e-5)
    reference = copy.deepcopy(model).double().eval()  # each example alone, unbatched, in float64
    for row, ex in zip(per.tolist(), items):
        ids = torch.tensor([ex.prompt_ids + ex.response_ids])
        with torch.no_grad():
            logps = reference(ids).logits[0, :-1].log_softmax(-1)
        start = len(ex.prompt_ids) - 1  # the position that predicts the first response token
        want = -logps[start:].gather(1, ids[0, start + 1 :, None]).sum().item()
        assert row[0] == pytest.approx(want, rel=1e-4)
    alone = heldout_loss(model, items[3:4], pad_id=tok.pad_token_id)["loss"]  # batch-mates do not leak into a row
    assert per[3, 0].item() / per[3, 1].item() == pytest.approx(alone, rel=1e-5)


def test_loss_difference_is_paired_and_its_interval_comes_from_the_same_draws():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 80, (50,), generator=g).double()
    a = torch.stack([tokens * (1 + 3 * torch.rand(50, generator=g, dtype=torch.float64)), tokens], 1)
    b = torch.stack([a[:, 0] + tokens * 0.1 * torch.randn(50, generator=g, dtype=torch.float64), tokens], 1)
    got = loss_difference(a, b, resamples=500, seed=7)
    assert got["delta"] == pytest.approx((b[:, 0].sum() - a[:, 0].sum()).item() / tokens.sum().item())
    picks = torch.randint(0, 50, (500, 50), generator=torch.Generator().manual_seed(7))
    draws = sorted(((b[p, 0].sum() - a[p, 0].sum()) / tokens[p].sum()).item() for p in picks)
    assert got["low"] == pytest.approx(draws[12] + 0.475 * (draws[13] - draws[12]))  # quantile 0.025 of 500
    assert got["high"] == pytest.approx(draws[486] + 0.525 * (draws[487] - draws[486]))  # quantile 0.975
    shifted = torch.stack([a[:, 0] + 0.25 * tokens, tokens], 1)  # 0.25 nats worse on every token: no spread at all
    same = loss_difference(a, shifted)
    assert same["delta"] == pytest.approx(0.25) and same["low"] == pytest.approx(0.25) and same["high"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="different tokens"):
        loss_difference(a, torch.stack([b[:, 0], tokens + 1], 1))
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        loss_difference(a[:, :1], b[:, :1])


def test_the_benchmarks_sft_evaluator_keeps_per_example_sums_that_pool_to_its_loss(tmp_path, shared_dir):
    load_model("tiny", seed=0).save_pretrained(tmp_path / "model")  # the "trained" result: the base itself
    out = tmp_path / "heldout.json"
    heldout = load_benchmark("e2e_heldout")
    assert heldout.main(["--task", "sft", "--model", "tiny", "--tokenizer", "demo", "--data", str(shared_dir / HH),
                         "--eval-rows", "0:9", "--model-dir", str(tmp_path / "model"), "--batch-size", "4",
                         "--max-length", "64", "--max-prompt-length", "32", "--out-json", str(out)]) == 0
    got = json.loads(out.read_text())
    per = torch.tensor(got["per_example"], dtype=torch.float64)
    assert per.shape == (got["n_examples"], 2) == (9, 2)
    assert got["loss"] == pytest.approx((per[:, 0].sum() / per[:, 1].sum()).item(), rel=1e-6)
    assert got["loss"] == pytest.approx(got["base_loss"], rel=1e-5)  # the same weights, scored by both paths
