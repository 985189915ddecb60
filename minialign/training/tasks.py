"""SFT and DPO as *tasks*: how to turn (model, batch) into a summed loss and summed metrics.

The training loop only sees this interface::

    units(batch) -> int                       # what the loss is a sum over (tokens or pairs), known on the host
    loss(policy, batch) -> (loss_sum, sums)   # device tensors; the loop divides both by the total units

so one loop serves every objective, with any gradient accumulation and any number of ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from minialign.base.devices import to_device
from minialign.modeling import lora
from minialign.modeling.policy import run_logps
from minialign.ops import losses
from minialign.training.batches import prepare_batch


class SFTTask:
    """Next-token cross-entropy on response tokens, summed; the loop divides by the response-token count."""

    name = "sft"

    def units(self, batch: dict) -> int:
        return batch["n_targets"]

    def loss(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = losses.sft_loss(run_logps(policy, batch))
        return loss, {"loss": loss.detach()}


def target_counts(batch: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[2B]`` target count of each sequence, computed on the batch's device (a step must not read it back);
    the inert slots of ``add_target_index`` (id -100) are not counted."""
    n_rows = batch.get("n_sequences", batch["input_ids"].shape[0])
    return losses.sum_by_row((batch["tgt_ids"] >= 0).to(dtype), batch["tgt_rows"], n_rows)


def sequence_sums(policy: nn.Module, batch: dict, normalise: bool) -> torch.Tensor:
    """``[2B]`` summed (or, for length-normalised losses, averaged) response log-probs of each row."""
    n_rows = batch.get("n_sequences", batch["input_ids"].shape[0])
    sums = losses.sum_by_row(run_logps(policy, batch), batch["tgt_rows"], n_rows)
    if normalise:
        sums = sums / target_counts(batch, sums.dtype).clamp(min=1)
    return sums


Reference = Callable[[dict], torch.Tensor]


def adapter_reference(policy: nn.Module, normalise: bool) -> Reference:
    """The policy with its LoRA adapters switched off: a reference model that costs no memory."""

    def reference(batch: dict) -> torch.Tensor:
        with torch.no_grad(), lora.disabled(policy):
            return sequence_sums(policy, batch, normalise)

    return reference


def frozen_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """A frozen copy of ``model`` for full fine-tuning's reference; bf16 on a GPU, since it is only read."""
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    if device.type == "cuda":
        ref.to(torch.bfloat16)
    return ref.to(device)


def frozen_reference(ref_policy: nn.Module, normalise: bool) -> Reference:
    """A separate frozen copy (full fine-tuning)."""

    def reference(batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return sequence_sums(ref_policy, batch, normalise)

    return reference


def cached_reference(table: torch.Tensor) -> Reference:
    """Reference log-probs computed once before training: ``table[i] = (chosen, rejected)`` of pair ``i``."""

    on_device: dict = {}  # one copy per device, made at first use rather than on every step

    def reference(batch: dict) -> torch.Tensor:
        device = batch["index"].device
        if device not in on_device:
            on_device[device] = table.to(device)
        rows = on_device[device][batch["index"]]
        return torch.cat([rows[:, 0], rows[:, 1]])

    return reference


class DPOTask:
    """Preference optimisation: chosen and rejected rows go through the policy in one forward pass.

    ``objective`` (``losses.PreferenceLoss``, built from the config) owns every knob. Its ``rpo_alpha`` > 0 adds
    ``rpo_alpha`` x each chosen response's mean token NLL to its pair's loss (RPO, TRL's
    ``rpo_alpha``): the chosen answers' likelihood is held up while the margin grows. Per pair, so it is summed and
    normalised by the pair count like the DPO term; TRL averages over the chosen tokens of a micro-batch instead
    (see ``losses.rpo_nll``).
    """

    name = "dpo"

    def __init__(self, reference: Reference | None, objective: losses.PreferenceLoss):
        self.reference, self.objective = reference, objective

    @property
    def normalise(self) -> bool:
        return self.objective.normalise

    def units(self, batch: dict) -> int:
        return batch["n_pairs"]

    def logps(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Policy ``[2B]`` and reference ``[2B]`` log-probs as the loss type wants them, and with ``rpo_alpha`` the
        ``[B]`` mean token NLL of each chosen response (else None)."""
        # The reference first: it keeps nothing once it returns, so its forward never runs on top of the policy's
        # saved activations and kept loss gradients (a lower peak for the same work).
        ref_logps = self.reference(batch) if self.objective.needs_reference else None
        if not self.objective.rpo_alpha:
            return sequence_sums(policy, batch, self.normalise), ref_logps, None
        b = batch["n_pairs"]
        sums = sequence_sums(policy, batch, False)
        counts = target_counts(batch, sums.dtype)
        policy_logps = sums / counts.clamp(min=1) if self.normalise else sums
        return policy_logps, ref_logps, losses.rpo_nll(sums[:b], counts[:b])

    def loss(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch["n_pairs"]
        policy_logps, ref_logps, nll = self.logps(policy, batch)
        ref_c, ref_r = (None, None) if ref_logps is None else (ref_logps[:b], ref_logps[b:])
        per_pair, chosen_r, rejected_r = self.objective(policy_logps[:b], policy_logps[b:], ref_c, ref_r, nll)
        loss = per_pair.sum()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_r.sum(),
            "rewards/rejected": rejected_r.sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
            "logps/chosen": policy_logps[:b].detach().sum(),
            "logps/rejected": policy_logps[b:].detach().sum(),
            # The policy alone prefers chosen (no reference): the held-out "preference accuracy".
            "logps/accuracies": (policy_logps[:b] > policy_logps[b:]).float().sum(),
        }
        if nll is not None:
            metrics["nll"] = nll.detach().sum()  # the loop's division makes it the mean over pairs
        return loss, metrics


@torch.no_grad()
def reference_table(policy: nn.Module, reference: Reference, batches, n_pairs: int, device,
                    target_multiple: int = 0, varlen: bool = False) -> torch.Tensor:
    """Run the reference once over every training pair: ``[n_pairs, 2]`` (chosen, rejected) log-probs.

    ``target_multiple`` rounds target counts as training does, so a compiled policy sees few new shapes.
    """
    table = torch.zeros(n_pairs, 2, dtype=torch.float32)
    for batch in batches:
        batch = to_device(prepare_batch(batch, target_multiple=target_multiple, varlen=varlen), device)
        ref = reference(batch).float().cpu()
        b = batch["n_pairs"]
        table[batch["index"].cpu()] = torch.stack([ref[:b], ref[b:]], dim=1)
    return table


