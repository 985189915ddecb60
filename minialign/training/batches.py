"""A collated batch made ready for the step: padded to its planned shape, targets indexed, varlen segments
described (see DEVELOPERS.md, Batches)."""

from __future__ import annotations

import torch

from minialign.data.batching import pad_row
from minialign.ops.attention import kv_slots, varlen_index
from minialign.ops.shapes import ShapePlan


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
