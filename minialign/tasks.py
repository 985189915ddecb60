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

from minialign import losses, lora
from minialign.data.batching import block_causal_mask


class TokenLogps(nn.Module):
    """Wraps a causal LM so that its forward returns target-token log-probs instead of logits.

    Only positions that have a target reach the output head, and through ``losses.token_logps`` in chunks,
    so the [tokens x vocab] float32 logits of a batch never exist. Wrapping (rather than calling
    sub-modules from outside) keeps DDP, FSDP and ``torch.compile`` working on one module.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, position_ids, tgt_index, tgt_ids, attn_bias=None):
        mask = attention_mask if attn_bias is None else attn_bias
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
        hidden = hidden.flatten(0, 1).index_select(0, tgt_index)
        head = self.model.get_output_embeddings()
        return _token_logps(hidden, head.weight, tgt_ids, self.chunk_size)


# The chunked loss has its own backward and a Python loop over chunks: torch.compile leaves it to eager
# (a graph break) and compiles the transformer around it.
_token_logps = torch.compiler.disable(losses.token_logps)


def add_target_index(batch: dict) -> dict:
    """Host-side: flat positions, ids and rows of every target, so the device never has to search for them."""
    targets = batch["targets"]
    flat = targets.flatten()
    index = torch.nonzero(flat != -100).squeeze(1)
    batch["tgt_index"] = index
    batch["tgt_ids"] = flat[index]
    batch["tgt_rows"] = torch.div(index, targets.shape[1], rounding_mode="floor")
    if "doc_ids" in batch:
        batch["attn_bias"] = block_causal_mask(batch["doc_ids"])
    return batch


def run_logps(policy: nn.Module, batch: dict) -> torch.Tensor:
    return policy(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["tgt_index"], batch["tgt_ids"],
        batch.get("attn_bias"),
    )


class SFTTask:
    """Next-token cross-entropy on response tokens, summed; the loop divides by the response-token count."""

    name = "sft"

    def units(self, batch: dict) -> int:
        return batch["n_targets"]

    def loss(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = losses.sft_loss(run_logps(policy, batch))
        return loss, {"loss": loss.detach()}


def sequence_sums(policy: nn.Module, batch: dict, normalise: bool) -> torch.Tensor:
    """``[2B]`` summed (or, for length-normalised losses, averaged) response log-probs of each row."""
    n_rows = batch["input_ids"].shape[0]
    sums = losses.sum_by_row(run_logps(policy, batch), batch["tgt_rows"], n_rows)
    if normalise:
        counts = losses.sum_by_row(torch.ones_like(sums[batch["tgt_rows"]]), batch["tgt_rows"], n_rows)
        sums = sums / counts.clamp(min=1)
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
    """Preference optimisation: chosen and rejected rows go through the policy in one forward pass."""

    name = "dpo"

    def __init__(self, reference: Reference | None, *, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, gamma: float = 0.5):
        self.reference, self.beta, self.loss_type = reference, beta, loss_type
        self.label_smoothing, self.gamma = label_smoothing, gamma

    @property
    def normalise(self) -> bool:
        # IPO and SimPO compare average per-token log-probs, so long answers are not favoured.
        return self.loss_type in ("ipo", "simpo")

    def units(self, batch: dict) -> int:
        return batch["n_pairs"]

    def logps(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        policy_logps = sequence_sums(policy, batch, self.normalise)
        ref_logps = None if self.loss_type == "simpo" else self.reference(batch)
        return policy_logps, ref_logps

    def loss(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch["n_pairs"]
        policy_logps, ref_logps = self.logps(policy, batch)
        ref_c, ref_r = (None, None) if ref_logps is None else (ref_logps[:b], ref_logps[b:])
        per_pair, chosen_r, rejected_r = losses.dpo_loss(
            policy_logps[:b], policy_logps[b:], ref_c, ref_r, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, gamma=self.gamma,
        )
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
        return loss, metrics


@torch.no_grad()
def reference_table(policy: nn.Module, reference: Reference, batches, n_pairs: int, device) -> torch.Tensor:
    """Run the reference once over every training pair: ``[n_pairs, 2]`` (chosen, rejected) log-probs."""
    table = torch.zeros(n_pairs, 2, dtype=torch.float32)
    for batch in batches:
        batch = to_device(add_target_index(batch), device)
        ref = reference(batch).float().cpu()
        b = batch["n_pairs"]
        table[batch["index"].cpu()] = torch.stack([ref[:b], ref[b:]], dim=1)
    return table


def to_device(batch: dict, device) -> dict:
    """Copy a host batch to the device; through pinned memory on CUDA so the copy does not block the host."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
