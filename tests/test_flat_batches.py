"""Padding-free ("flat") batches: every sequence back to back in one row gives the padded batch's numbers.

The SFT loss, the DPO per-sequence sums (chosen and rejected rows in one row) and the gradients of both must
equal those of the ordinary padded batch, which is the reference: if a document could see its neighbour, or a
target were attributed to the wrong sequence, these comparisons fail.
"""

import json
import random

import pytest
import torch

from minialign.data import TokenizedExample, TokenizedPair, collate_pairs, collate_sft
from minialign.modeling import lora
from minialign.modeling.models import load_model
from minialign.modeling.policy import TokenLogps
from minialign.ops.losses import PreferenceLoss
from minialign.training.batches import add_target_index
from minialign.training.tasks import DPOTask, SFTTask, sequence_sums


def _ids(rng, n):
    return [rng.randint(1, 999) for _ in range(n)]


def sft_examples() -> list[TokenizedExample]:
    rng = random.Random(0)
    return [TokenizedExample(_ids(rng, p), _ids(rng, r - 1) + [0]) for p, r in [(5, 9), (3, 14), (7, 6), (1, 11), (6, 5)]]


def pairs() -> list[TokenizedPair]:
    rng = random.Random(1)
    return [TokenizedPair(_ids(rng, p), _ids(rng, c), _ids(rng, r)) for p, c, r in [(5, 9, 4), (3, 2, 12), (8, 6, 6)]]


def lora_policy(chunk_size=None) -> TokenLogps:
    """The tiny model with LoRA, non-zero B so that adapters matter in the gradients; dense-mask attention."""
    torch.manual_seed(0)
    model = load_model("tiny", seed=0)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return TokenLogps(model, chunk_size, attention="sdpa")


@pytest.fixture
def policy():
    return lora_policy()


def loss_and_grads(policy, task, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """The task's loss on ``batch``, every parameter's gradient (then cleared) and the task's metrics."""
    loss, metrics = task.loss(policy, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    return loss.detach(), grads, metrics


def assert_same(a, b, loss_atol=1e-5):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=loss_atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_flat_sft_batch_layout():
    exs = sft_examples()
    flat = collate_sft(exs, pad_id=0, flat=True, pad_to_multiple_of=16)
    total = sum(len(e.prompt_ids) + len(e.response_ids) for e in exs)
    assert total == 67 and flat["input_ids"].shape == (1, 80) and flat["attention_mask"].sum() == total
    assert flat["n_sequences"] == 5 and flat["n_targets"] == collate_sft(exs, pad_id=0)["n_targets"]
    assert flat["doc_ids"][0, :total].unique().tolist() == [0, 1, 2, 3, 4]
    assert (flat["doc_ids"][0, total:] == -1).all()
    starts = (flat["position_ids"][0, :total] == 0).nonzero().squeeze(1).tolist()
    assert starts == [0, 14, 31, 44, 56]


def test_flat_sft_loss_and_grads_equal_padded(policy):
    exs = sft_examples()
    task = SFTTask()
    padded = add_target_index(collate_sft(exs, pad_id=0))
    flat = add_target_index(collate_sft(exs, pad_id=0, flat=True, pad_to_multiple_of=8))
    assert_same(loss_and_grads(policy, task, flat), loss_and_grads(policy, task, padded))


def test_flat_dpo_sequence_sums_and_loss_equal_padded(policy):
    ps = pairs()
    padded = add_target_index(collate_pairs(ps, pad_id=0, index=[7, 8, 9]))
    flat = add_target_index(collate_pairs(ps, pad_id=0, index=[7, 8, 9], flat=True))
    assert flat["input_ids"].shape[0] == 1 and flat["n_sequences"] == 6 and flat["n_pairs"] == 3
    for normalise in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(sequence_sums(policy, flat, normalise), sequence_sums(policy, padded, normalise),
                                       rtol=1e-5, atol=1e-5)
    reference = lambda batch: torch.zeros(2 * batch["n_pairs"])  # noqa: E731
    task = DPOTask(reference, PreferenceLoss(beta=0.1))
    padded_run, flat_run = loss_and_grads(policy, task, padded), loss_and_grads(policy, task, flat)
    assert_same(flat_run, padded_run, loss_atol=1e-6)
    torch.testing.assert_close(flat_run[2]["rewards/margins"], padded_run[2]["rewards/margins"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- through the CLI


def _losses(run_dir) -> list[float]:
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_padding_free_run_trains_like_the_padded_run(tmp_path, monkeypatch, command):
    """Same seed, same batches: the layout (padded rows, one flat row, one flat row of a planned shape with varlen
    attention segments) changes not a single logged loss."""
    from minialign import cli
    from minialign.training import train as train_module

    rows_seen = []
    real = train_module.prepare_batch
    monkeypatch.setattr(train_module, "prepare_batch",
                        lambda batch, **kw: rows_seen.append(batch["input_ids"].shape[0]) or real(batch, **kw))
    runs = {}
    for name, flags in (("padded", ["--fast", "off"]), ("flat", ["--padding-free", "--shape-buckets", "0"]),
                        ("fast", ["--fast", "on", "--attention", "varlen"])):
        out = tmp_path / name
        assert cli.main([command, "--demo", "--batch-size", "4", "--limit", "16", "--eval-limit", "4",
                         "--max-steps", "3", "--out", str(out), *flags]) == 0
        runs[name] = _losses(out)
    rows = 4 if command == "sft" else 8
    # 3 training steps then the held-out batch: padded rows, then one flat row a batch (twice)
    assert rows_seen == [rows] * 4 + [1] * 4 + [1] * 4
    assert len(runs["padded"]) == 3
    assert runs["flat"] == pytest.approx(runs["padded"], rel=1e-4)
    assert runs["fast"] == pytest.approx(runs["padded"], rel=1e-4)
    summary = json.loads((tmp_path / "fast" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["unplanned_shapes"] == 0 and "row length" in summary["shape_plan"]
    assert "eval/loss" in summary["eval"]


def test_padding_free_with_packing_is_refused(tmp_path, capsys):
    from minialign import cli

    out = tmp_path / "run"
    assert cli.main(["sft", "--demo", "--padding-free", "--packing", "--out", str(out)]) == 2
    assert "padding_free and packing exclude each other" in capsys.readouterr().err
    assert not out.exists()
