"""Held-out evaluation: SFT loss/perplexity, DPO preference and reward accuracy, side-by-side samples.

Every number here comes from summed response log-probabilities, the same quantity DPO optimises, so a
policy/reference comparison is apples to apples. Samples always start with the first held-out pairs in
dataset order, so two runs show the same prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minialign.base.devices import autocast, to_device
from minialign.data import collate_pairs, collate_sft
from minialign.modeling import lora
from minialign.modeling.generate import generate
from minialign.modeling.policy import TokenLogps
from minialign.ops.losses import perplexity
from minialign.training.batches import add_target_index
from minialign.training.tasks import sequence_sums, target_counts


@torch.no_grad()
def heldout_loss(model, examples: Sequence, *, pad_id: int, batch_size: int = 16, device="cpu") -> dict[str, float]:
    """Mean negative log-likelihood per response token over all examples (token-weighted), and its perplexity."""
    return pooled_loss(heldout_nll(model, examples, pad_id=pad_id, batch_size=batch_size, device=device))


@torch.no_grad()
def heldout_nll(model, examples: Sequence, *, pad_id: int, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """``[N, 2]`` float64 on the CPU: each example's summed response negative log-likelihood and its response token
    count, kept per example so that two models scored on the same examples can be compared with a paired interval
    (``loss_difference``); ``pooled_loss`` turns them into ``heldout_loss``'s numbers."""
    policy = TokenLogps(model).to(device).eval()
    out = []
    with autocast(torch.device(device))():
        for i in range(0, len(examples), batch_size):
            batch = to_device(add_target_index(collate_sft(examples[i : i + batch_size], pad_id=pad_id)), device)
            nll = -sequence_sums(policy, batch, normalise=False).double()
            out.append(torch.stack([nll, target_counts(batch, torch.float64)], dim=1))
    return torch.cat(out).cpu() if out else torch.zeros(0, 2, dtype=torch.float64)


def pooled_loss(per: torch.Tensor) -> dict[str, float]:
    """``heldout_nll``'s rows ``[N, 2]`` pooled: summed NLL over summed tokens, and its perplexity."""
    loss = (per[:, 0].sum() / per[:, 1].sum().clamp(min=1)).item()
    return {"loss": loss, "perplexity": perplexity(loss)}


def loss_difference(first: torch.Tensor, second: torch.Tensor, *, confidence: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> dict[str, float]:
    """The second model's held-out loss minus the first's, from ``heldout_nll`` rows ``[N, 2]`` of the same N examples,
    with a percentile bootstrap interval over examples: each draw resamples N examples with replacement and
    recomputes both token-weighted losses on the same draw (paired), so what both models find hard cancels."""
    a, b = torch.as_tensor(first, dtype=torch.float64), torch.as_tensor(second, dtype=torch.float64)
    if a.shape != b.shape or a.dim() != 2 or a.shape[1] != 2 or a.shape[0] == 0:
        raise ValueError(f"per-example rows must be two [N, 2] tensors of one shape, N >= 1; got {list(a.shape)} and "
                         f"{list(b.shape)}")
    if not torch.equal(a[:, 1], b[:, 1]):
        raise ValueError("the two models were scored on different tokens (their per-example token counts differ)")
    picks = torch.randint(0, a.shape[0], (resamples, a.shape[0]), generator=torch.Generator().manual_seed(seed))
    tokens = a[picks, 1].sum(1)
    boots = (b[picks, 0].sum(1) - a[picks, 0].sum(1)) / tokens  # [resamples]
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(boots, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    delta = ((b[:, 0].sum() - a[:, 0].sum()) / a[:, 1].sum()).item()
    return {"delta": delta, "low": low, "high": high, "confidence": confidence, "n_examples": a.shape[0]}


@torch.no_grad()
def pair_logps(model, pairs: Sequence, *, pad_id: int, batch_size: int = 16, device="cpu") -> torch.Tensor:
    """``[N, 2]`` summed log-probs of (chosen, rejected) for each tokenized pair."""
    policy = TokenLogps(model).to(device).eval()
    out = []
    with autocast(torch.device(device))():
        for i in range(0, len(pairs), batch_size):
            batch = to_device(add_target_index(collate_pairs(pairs[i : i + batch_size], pad_id=pad_id)), device)
            sums = sequence_sums(policy, batch, normalise=False).float().cpu()
            b = batch["n_pairs"]
            out.append(torch.stack([sums[:b], sums[b:]], dim=1))
    return torch.cat(out) if out else torch.zeros(0, 2)


def preference_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """Accuracies and margin from ``[N, 2]`` (chosen, rejected) log-probs of policy and reference.

    Preference accuracy: share of pairs whose chosen response gets the higher log-prob. Reward accuracy:
    share whose implicit reward ``beta * (policy - reference)`` is strictly higher for chosen (ties miss).
    """
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "reference_accuracy": (reference[:, 0] > reference[:, 1]).float().mean().item(),
        "policy_accuracy": (policy[:, 0] > policy[:, 1]).float().mean().item(),
        "reward_accuracy": (margin > 0).float().mean().item(),
        "reward_margin": margin.mean().item(),
        "n_pairs": int(policy.shape[0]),
    }


def dpo_eval(model, pairs: Sequence, *, pad_id: int, beta: float, batch_size: int = 16, device="cpu") -> dict[str, float]:
    """Policy = the model with its DPO adapter; reference = the same model with adapters disabled."""
    policy = pair_logps(model, pairs, pad_id=pad_id, batch_size=batch_size, device=device)
    with lora.disabled(model):
        reference = pair_logps(model, pairs, pad_id=pad_id, batch_size=batch_size, device=device)
    return preference_metrics(policy, reference, beta)


def sft_samples(model, tokenizer, pairs: Sequence, *, max_new_tokens: int, device="cpu") -> list[dict[str, str]]:
    outputs = generate(model.to(device), tokenizer, [p.prompt for p in pairs], max_new_tokens=max_new_tokens)
    return [{"prompt": p.prompt, "expected": p.chosen, "model": o} for p, o in zip(pairs, outputs)]


def dpo_samples(model, tokenizer, pairs: Sequence, *, max_new_tokens: int, device="cpu",
                reference=None) -> list[dict[str, str]]:
    """Greedy answers of the policy ``model`` and its reference side by side; ``reference=None`` is the policy
    with its LoRA adapters switched off (the model it started from), as in ``geneval.compare``."""
    prompts = [p.prompt for p in pairs]
    model.to(device)
    policy = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    if reference is None:
        with lora.disabled(model):
            reference_out = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    else:
        reference_out = generate(reference.to(device), tokenizer, prompts, max_new_tokens=max_new_tokens)
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "reference": r, "policy": o}
        for p, r, o in zip(pairs, reference_out, policy)
    ]
