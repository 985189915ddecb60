"""Reward-model training's task and batches: pairs collated with each sequence's pooled position, the
Bradley-Terry loss (``losses.rm_loss``) over them."""

from __future__ import annotations

import torch
from torch import nn

from minialign.data.batching import collate_pairs
from minialign.modeling.reward_model import pooled_index, run_rewards
from minialign.ops import losses


def collate_rm(pairs, *, pad_id: int, eos_id: int, pad_to_multiple_of: int | None = None, flat: bool = False,
               share_prompt: bool = False) -> dict:
    """A DPO-layout batch (chosen rows, then rejected rows) with each sequence's ``pool_index`` and each pair's
    ``margin`` ``[B]``, and no targets: a reward model reads one position per sequence, no token log-probs."""
    batch = collate_pairs(pairs, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of, flat=flat,
                          share_prompt=flat and share_prompt)
    batch["targets"].fill_(-100)
    batch["n_targets"] = 0
    batch["pool_index"] = pooled_index(batch, eos_id)
    batch["margin"] = torch.tensor([getattr(p, "margin", 0.0) for p in pairs], dtype=torch.float32)
    return batch



class RMTask:
    """Bradley-Terry: chosen and rejected sequences go through the model in one forward pass; units are pairs."""


    name = "rm"


    def __init__(self, center_rewards_coefficient: float = 0.0):
        self.center_rewards_coefficient = center_rewards_coefficient


    def units(self, batch: dict) -> int:
        return batch["n_pairs"]


    def loss(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch["n_pairs"]
        rewards = run_rewards(policy, batch)
        chosen, rejected = rewards[:b], rewards[b:]
        loss = losses.rm_loss(chosen, rejected, batch.get("margin"), self.center_rewards_coefficient)
        c, r = chosen.detach(), rejected.detach()
        return loss, {"loss": loss.detach(), "accuracy": (c > r).float().sum(), "rewards/chosen": c.sum(),
                      "rewards/rejected": r.sum(), "margin": (c - r).sum()}
