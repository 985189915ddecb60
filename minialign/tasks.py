"""SFT and DPO as *tasks*: how to turn (model, batch) into a summed loss and summed metrics.

The training loop only sees this interface::

    units(batch) -> int                       # what the loss is a sum over (tokens or pairs), known on the host
    loss(policy, batch) -> (loss_sum, sums)   # device tensors; the loop divides both by the total units

so one loop serves every objective, with any gradient accumulation and any number of ranks.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
from torch import nn

from minialign import losses, lora, models
from minialign.attention import POSITIONS_KWARG, VARLEN_KWARG, enable_flex_documents, kv_slots, varlen_index
from minialign.data.batching import block_causal_mask, pad_row
from minialign.errors import UserError
from minialign.shapes import ShapePlan

ATTENTION = ("auto", "sdpa", "flex", "varlen")  # how packed rows mask attention: see TokenLogps
COMPILE_SCOPES = ("blocks", "model")  # what --compile compiles: see TokenLogps.compile_body


class TokenLogps(nn.Module):
    """Wraps a causal LM so that its forward returns target-token log-probs instead of logits.

    Only positions that have a target reach the output head, and through ``losses.token_logps`` in chunks,
    so the [tokens x vocab] float32 logits of a batch never exist. Wrapping (rather than calling
    sub-modules from outside) keeps DDP, FSDP and ``torch.compile`` working on one module.

    Packed rows (``doc_ids`` given) attend within each document only. A batch that carries segment boundaries
    (``prepare_batch(varlen=True)``: ``cu_seqlens_q`` ...) runs varlen attention (``minialign.attention``): any
    row length, nothing to compile. Otherwise ``attention`` says how: ``auto`` uses a FlexAttention ``BlockMask`` on
    CUDA (block-sparse, no [L, L] mask; compiled per row length) and the dense ``block_causal_mask`` through SDPA
    elsewhere; ``sdpa`` always the dense mask; ``flex`` always the BlockMask (on a CPU: forward only, slow).
    Unpacked batches run SDPA with the padding mask, as they always did, whatever ``attention`` says.

    Sliding-window layers keep their window on every path (``attention.window_mask`` bounds the dense document mask
    by position distance; varlen segments use the kernel's window); with one, ``auto`` uses the dense mask rather
    than a BlockMask, which holds no window. A model that soft-caps its final logits (Gemma2) gets its log-probs
    from the capped logits of its target positions, through plain autograd: the chunked op has no cap.
    """

    def __init__(self, model: nn.Module, chunk_size: int | None = None, *, attention: str = "auto"):
        super().__init__()
        if attention not in ATTENTION:
            raise UserError(f"attention must be one of {', '.join(ATTENTION)} (got '{attention}').")
        self.model = model
        self.chunk_size = chunk_size
        self.attention = attention
        self.window = models.sliding_window(model)
        # Sliding windows reach a document mask only through minialign's attention function, even for "sdpa".
        switched = (attention != "sdpa" or self.window is not None) and enable_flex_documents(model)
        self.flex = attention != "sdpa" and switched
        self.windowed_documents = self.window is None or switched
        self.compiled_body, self.compiled_blocks, self.fused = None, [], False  # see compile_body
        self.final_softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
        if attention == "flex" and self.window is not None:
            raise UserError(f"attention 'flex' cannot apply {type(model).__name__}'s sliding window ({self.window} "
                            "tokens): its BlockMask holds none. Use --attention auto, varlen or sdpa.")
        if attention in ("flex", "varlen") and not self.flex:
            raise UserError(f"attention '{attention}' needs a model running SDPA attention and a torch with "
                            "FlexAttention (>= 2.5); use --attention auto or sdpa.")

    def forward(self, input_ids, attention_mask, position_ids, tgt_index, tgt_ids, doc_ids=None, prefix_ids=None,
                varlen: tuple | None = None):
        body = functools.partial(self.compiled_body, self) if self.compiled_body else self.body
        hidden = body(input_ids, attention_mask, position_ids, doc_ids, prefix_ids, varlen)
        hidden = hidden.flatten(0, 1).index_select(0, tgt_index)
        head = self.model.get_output_embeddings()
        if self.final_softcap is not None:
            logps = capped_token_logps(head(hidden), tgt_ids.clamp(min=0), self.final_softcap)
        else:
            logps = losses.token_logps(hidden, head.weight, tgt_ids.clamp(min=0), self.chunk_size, fused=self.fused)
        return logps.masked_fill(tgt_ids < 0, 0.0)  # slots that only round the count up (see add_target_index)

    def body(self, input_ids, attention_mask, position_ids, doc_ids=None, prefix_ids=None, varlen=None) -> torch.Tensor:
        """``[R, L, H]`` final hidden states: everything whose shapes depend on the rows alone."""
        extra = {}
        if varlen is not None:
            # A ready-made 4-D mask makes transformers skip building one; the segments replace it.
            mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
            extra[VARLEN_KWARG] = varlen
        else:
            mask = attention_mask if doc_ids is None else self.document_mask(doc_ids, prefix_ids)
            if doc_ids is not None and not self.windowed_documents:
                raise UserError(f"{type(self.model).__name__} (attention '{self.model.config._attn_implementation}') "
                                "cannot bound packed rows' attention by its sliding window; see "
                                "models.fast_path_support.")
            if doc_ids is not None and self.window is not None:
                extra[POSITIONS_KWARG] = position_ids  # the attention function bounds the mask by the window
        with models.running_compiled(self.compiled_blocks):
            out = self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                        use_cache=False, **extra)
        return out.last_hidden_state

    def compile_body(self, fuse_loss: bool = True, scope: str = "blocks", **options) -> None:
        """``torch.compile`` the transformer (``body``) and, with ``fuse_loss``, the loss's softmax math.

        ``scope`` "blocks" compiles one transformer block's forward and runs every block through it (regional
        compilation: the blocks are identical, so one graph serves them all and compiling costs about one block's
        time); "model" compiles the whole transformer as one graph (kernels may fuse across blocks; compiling is
        slower by about the number of blocks). Either way the target count stays outside the compiled code, so
        static shapes (``dynamic=False``, what FlexAttention needs) cost one compilation per row length and grad
        mode, not per target count: target counts can then be rounded finely. Parameter names do not change, and
        the compiled blocks run only inside ``body`` (generation with the same model stays eager).
        """
        if scope not in COMPILE_SCOPES:
            raise UserError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)} (got '{scope}').")
        if scope == "blocks":
            self.compiled_blocks = models.compile_blocks(self.model, **options)
        else:
            self.compiled_body = torch.compile(TokenLogps.body, **options)  # unbound: a deep copy runs its own
        self.fused = fuse_loss

    def document_mask(self, doc_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None):
        """The attention mask of packed rows ``doc_ids`` [R, L], built on their device (see ``attention``)."""
        if self.flex and self.window is None and (self.attention == "flex" or doc_ids.device.type == "cuda"):
            return document_block_mask(doc_ids, prefix_ids)
        return block_causal_mask(doc_ids, prefix_ids)


def capped_token_logps(logits: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """Log-probs of ``targets`` under ``cap * tanh(logits / cap)`` (Gemma2's final soft-capping), in float32 or
    wider."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    capped = torch.tanh(logits / cap) * cap
    return torch.log_softmax(capped, dim=-1).gather(1, targets[:, None]).squeeze(1)


def document_block_mask(doc_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None, block_size: int = 128):
    """FlexAttention ``BlockMask`` of packed rows: query i sees key j iff j <= i and doc_ids agree in the row
    (or ``prefix_ids[i]`` names key j's document: a shared prompt, see ``data.batching._collate_shared``).

    The same mask as ``block_causal_mask`` (padding, doc -1, is a document of its own, so no row is empty), kept
    as [R, 1, L/block, L/block] block indices: blocks outside every document are skipped, blocks inside one
    document skip the mask function. On CUDA a compiled kernel builds it from ``doc_ids`` without ever holding an
    [R, L, L] tensor (eager ``create_block_mask`` would, for a moment). No host sync and shapes fixed by [R, L],
    so the step around it can be compiled or CUDA-graphed.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    def document_or_prefix_causal(b, h, q, kv):
        readable = (doc_ids[b, q] == doc_ids[b, kv]) | (prefix_ids[b, q] == doc_ids[b, kv])
        return readable & (q >= kv)

    rows, length = doc_ids.shape
    build = create_block_mask
    if doc_ids.device.type == "cuda" and not torch.compiler.is_compiling():
        build = _compiled_create_block_mask()
    mask_mod = same_document_causal if prefix_ids is None else document_or_prefix_causal
    return build(mask_mod, rows, None, length, length, device=doc_ids.device, BLOCK_SIZE=block_size)


@functools.cache
def _compiled_create_block_mask():
    """One compiled ``create_block_mask`` per process: a new mask function (closure) per batch does not recompile."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def add_target_index(batch: dict, multiple: int = 0, slots: int | None = None) -> dict:
    """Host-side: flat positions, ids and rows of every target, so the device never has to search for them.

    ``multiple`` > 0 rounds the number of target slots up to a multiple of it (``slots``: up to exactly that
    many): the extra slots point at position 0 with id -100 and give log-prob 0 (no loss, no gradient). The
    output-projection matmuls then see a few distinct shapes instead of one per batch, which is what lets cuBLAS,
    the caching allocator and compiled / CUDA-graphed steps reuse their work.
    """
    targets = batch["targets"]
    flat = targets.flatten()
    index = torch.nonzero(flat != -100).squeeze(1)
    if "n_sequences" in batch:  # padding-free: one row of back-to-back sequences, numbered by doc_ids
        rows = batch["doc_ids"].flatten()[index]
    else:
        rows = torch.div(index, targets.shape[1], rounding_mode="floor")
    ids = flat[index]
    extra = -len(index) % multiple if multiple > 0 else 0
    if slots is not None:
        if slots < len(index):
            raise ValueError(f"{len(index)} targets do not fit {slots} slots")
        extra = slots - len(index)
    if extra:
        zeros = torch.zeros(extra, dtype=torch.long)
        index, rows, ids = torch.cat([index, zeros]), torch.cat([rows, zeros]), torch.cat([ids, zeros - 100])
    batch["tgt_index"], batch["tgt_ids"], batch["tgt_rows"] = index, ids, rows
    return batch  # packed rows keep only doc_ids: TokenLogps builds their attention mask on the device


def prepare_batch(batch: dict, *, target_multiple: int = 0, shapes: ShapePlan | None = None,
                  varlen: bool = False) -> dict:
    """A collated host batch made ready for the step: padded to its planned shape (padding-free batches, when a
    plan is given), its targets indexed (``add_target_index``) and, with ``varlen``, its attention segments described
    (``attention.varlen_index``; padding-free and packed batches only, as others have no documents)."""
    batch, slots = dict(batch), None
    if shapes is not None and "n_sequences" in batch:
        shape = shapes.fit(int((batch["doc_ids"] >= 0).sum()), batch["n_targets"])
        batch, slots = pad_row(batch, shape.length, pad_id=0), shape.targets
    add_target_index(batch, target_multiple, slots)
    if varlen and "doc_ids" in batch:
        length = batch["input_ids"].shape[1]
        shared = "prefix_ids" in batch
        max_seqlen = shapes.max_seqlen if shapes is not None and "n_sequences" in batch else None
        batch.update(varlen_index(batch["doc_ids"], batch.get("prefix_ids"), kv_length=kv_slots(length) if shared
                                  else None, max_seqlen=max_seqlen))
    return batch


def varlen_args(batch: dict) -> tuple | None:
    """The ``varlen`` argument of ``TokenLogps.body``: a prepared batch's segment bounds, or None without them."""
    if "cu_seqlens_q" not in batch:
        return None
    return batch["cu_seqlens_q"], batch["cu_seqlens_k"], batch.get("kv_index"), batch["max_seqlen"]


def run_logps(policy: nn.Module, batch: dict) -> torch.Tensor:
    return policy(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["tgt_index"], batch["tgt_ids"],
        batch.get("doc_ids"), batch.get("prefix_ids"), varlen_args(batch),
    )


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

    ``rpo_alpha`` > 0 adds ``rpo_alpha`` x each chosen response's mean token NLL to its pair's loss (RPO, TRL's
    ``rpo_alpha``): the chosen answers' likelihood is held up while the margin grows. Per pair, so it is summed and
    normalised by the pair count like the DPO term; TRL averages over the chosen tokens of a micro-batch instead
    (see ``losses.rpo_nll``).
    """

    name = "dpo"

    def __init__(self, reference: Reference | None, *, beta: float, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, gamma: float = 0.5, rpo_alpha: float = 0.0):
        self.reference, self.beta, self.loss_type = reference, beta, loss_type
        self.label_smoothing, self.gamma, self.rpo_alpha = label_smoothing, gamma, rpo_alpha

    @property
    def normalise(self) -> bool:
        # IPO and SimPO compare average per-token log-probs, so long answers are not favoured.
        return self.loss_type in ("ipo", "simpo")

    def units(self, batch: dict) -> int:
        return batch["n_pairs"]

    def logps(self, policy: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Policy ``[2B]`` and reference ``[2B]`` log-probs as the loss type wants them, and with ``rpo_alpha`` the
        ``[B]`` mean token NLL of each chosen response (else None)."""
        # The reference first: it keeps nothing once it returns, so its forward never runs on top of the policy's
        # saved activations and kept loss gradients (a lower peak for the same work).
        ref_logps = None if self.loss_type == "simpo" else self.reference(batch)
        if not self.rpo_alpha:
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
        per_pair, chosen_r, rejected_r = losses.dpo_loss(
            policy_logps[:b], policy_logps[b:], ref_c, ref_r, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, gamma=self.gamma,
        )
        if nll is not None:
            per_pair = per_pair + self.rpo_alpha * nll
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


def to_device(batch: dict, device) -> dict:
    """Copy a host batch to the device; through pinned memory on CUDA so the copy does not block the host."""
    device = torch.device(device)
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
