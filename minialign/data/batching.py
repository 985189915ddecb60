"""Batches as dicts of CPU tensors, in the one format the training loop and losses expect.

See DEVELOPERS.md for the keys. Two rules matter most for correctness:

* ``targets`` are already shifted (``targets[b, t]`` is the token to predict after position ``t``),
  so the loss never has to shift and cannot shift twice;
* padding is masked *by position*, never by comparing ids to the pad id: Pythia's pad id equals its
  EOS id, and the EOS that ends a response must stay a target or the model never learns to stop.

Index order (``batch_indices``) depends only on (seed, epoch, sizes), so a resumed run and every
rank of a multi-GPU run agree on which examples form each batch without talking to each other.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import torch

from minialign.base.errors import UserError
from minialign.data.tokenize import TokenizedExample, TokenizedPair

IGNORE_INDEX = -100
LENGTH_GROUP_BATCHES = 50  # length-grouping sorts within chunks of this many global batches


# ----------------------------------------------------------------------------- filling rows


def _empty_batch(rows: int, length: int, pad_id: int) -> dict[str, torch.Tensor]:
    if pad_id is None:  # e.g. tokenizer.pad_token_id of a tokenizer without a pad token
        raise ValueError("pad_id is None; pass the EOS id when the tokenizer has no pad token")
    return {
        "input_ids": torch.full((rows, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((rows, length), dtype=torch.long),
        "position_ids": torch.zeros((rows, length), dtype=torch.long),
        "targets": torch.full((rows, length), IGNORE_INDEX, dtype=torch.long),
    }


def _place(batch: dict[str, torch.Tensor], row: int, offset: int, seq: list[int], prompt_len: int,
           first_position: int = 0) -> int:
    """Write one sequence at ``batch[row, offset:]`` and return how many targets it has.

    Targets live one position to the left of the token they name: position t predicts seq[t+1],
    which is a target only if it is a response token. The last position of the sequence predicts
    nothing inside it, so it stays -100 (in packed rows, the next document is not its business).
    ``first_position``: the position id of ``seq[0]`` (a branch that continues a shared prompt).
    """
    n = len(seq)
    end = offset + n
    ids = torch.tensor(seq, dtype=torch.long)
    batch["input_ids"][row, offset:end] = ids
    batch["attention_mask"][row, offset:end] = 1
    batch["position_ids"][row, offset:end] = torch.arange(first_position, first_position + n)
    first = max(prompt_len, 1)  # index in seq of the first token that is predicted
    if n > first:
        batch["targets"][row, offset + first - 1 : end - 1] = ids[first:]
    return max(n - first, 0)


def _padded_length(longest: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return longest


def _collate(rows: list[tuple[list[int], int]], pad_id: int, pad_to_multiple_of: int | None, flat: bool = False) -> dict:
    """Right-pad (sequence, prompt length) rows to one length and fill every key (``flat``: see ``_collate_flat``)."""
    if not rows:
        raise ValueError("cannot collate an empty batch")
    if flat:
        return _collate_flat(rows, pad_id, pad_to_multiple_of)
    length = _padded_length(max(len(seq) for seq, _ in rows), pad_to_multiple_of)
    batch: dict = _empty_batch(len(rows), length, pad_id)
    batch["n_targets"] = sum(_place(batch, b, 0, seq, p) for b, (seq, p) in enumerate(rows))
    return batch


def _collate_flat(rows: list[tuple[list[int], int]], pad_id: int, pad_to_multiple_of: int | None) -> dict:
    """Padding-free: every sequence back to back in one row [1, T], T = their total (rounded up).

    ``doc_ids`` number the sequences 0..n-1 (-1 on the rounding padding) and ``position_ids`` restart
    for each, so with a document mask each sequence sees only itself: the same numbers as the padded
    batch, without computing a padded position. ``n_sequences`` tells a per-sequence sum how many there are.
    Rounding T to a multiple (``pad_to_multiple_of``) keeps the number of distinct shapes small for
    compiled / CUDA-graphed steps.
    """
    length = _padded_length(sum(len(seq) for seq, _ in rows), pad_to_multiple_of)
    batch: dict = _empty_batch(1, length, pad_id)
    batch["doc_ids"] = torch.full((1, length), -1, dtype=torch.long)
    offset = n_targets = 0
    for i, (seq, prompt_len) in enumerate(rows):
        n_targets += _place(batch, 0, offset, seq, prompt_len)
        batch["doc_ids"][0, offset : offset + len(seq)] = i
        offset += len(seq)
    batch["n_targets"] = n_targets
    batch["n_sequences"] = len(rows)
    return batch


def collate_sft(
    examples: Sequence[TokenizedExample], *, pad_id: int, pad_to_multiple_of: int | None = None, flat: bool = False
) -> dict:
    """An SFT batch [B, T] (``flat``: [1, total] without padding): targets cover the response tokens (EOS included) only."""
    rows = [(ex.prompt_ids + ex.response_ids, len(ex.prompt_ids)) for ex in examples]
    return _collate(rows, pad_id, pad_to_multiple_of, flat)


def collate_pairs(
    pairs: Sequence[TokenizedPair],
    *,
    pad_id: int,
    pad_to_multiple_of: int | None = None,
    index: Sequence[int] | None = None,
    flat: bool = False,
    share_prompt: bool = False,
) -> dict:
    """A DPO batch [2B, T]: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected, same order.

    One common T for both halves lets a single forward pass score them, and ``index`` (each
    pair's position in its dataset) lets cached reference log-probs be looked up per pair.
    ``flat``: the 2B sequences back to back in one row, in the same order, without padding.
    ``share_prompt`` (with ``flat``): each prompt once, its two responses branching off it (see
    ``_collate_shared``); sequence numbering, targets and results are those of the flat batch.
    """
    index = list(range(len(pairs))) if index is None else list(index)
    if len(index) != len(pairs):
        raise ValueError(f"index has {len(index)} entries for {len(pairs)} pairs")
    if share_prompt:
        if not flat:
            raise ValueError("share_prompt needs flat (padding-free) batches: padded rows cannot branch")
        batch = _collate_shared(pairs, pad_id, pad_to_multiple_of)
    else:
        rows = [(p.prompt_ids + p.chosen_ids, len(p.prompt_ids)) for p in pairs]
        rows += [(p.prompt_ids + p.rejected_ids, len(p.prompt_ids)) for p in pairs]
        batch = _collate(rows, pad_id, pad_to_multiple_of, flat)
    batch["n_pairs"] = len(pairs)
    batch["index"] = torch.tensor(index, dtype=torch.long)
    return batch


def _collate_shared(pairs: Sequence[TokenizedPair], pad_id: int, pad_to_multiple_of: int | None) -> dict:
    """Padding-free pairs with each prompt computed once: ``[shared prompt | chosen branch | rejected branch]``.

    The shared part is the prompt without its last token; each branch starts with that token, so its first
    position predicts the branch's first response token, exactly as in the unshared sequence (one target per
    position still holds). Branch positions continue the prompt's, and ``prefix_ids`` gives each token the
    document it may read besides its own: a branch reads its pair's shared prompt, so attention sees the same
    keys as in ``prompt + response``. Documents are numbered as in the flat batch (chosen i, rejected B+i);
    shared prompts take 2B+i and hold no targets. ``n_tokens`` is what the unshared batch holds, the number of
    tokens this batch stands for (HH prompts are long: ~1.5x fewer positions to compute).
    """
    n = len(pairs)
    total = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) + (1 if p.prompt_ids else 0)
                for p in pairs)
    length = _padded_length(total, pad_to_multiple_of)
    batch: dict = _empty_batch(1, length, pad_id)
    batch["doc_ids"] = torch.full((1, length), -1, dtype=torch.long)
    batch["prefix_ids"] = torch.full((1, length), -1, dtype=torch.long)
    offset = n_targets = 0
    for i, p in enumerate(pairs):
        shared, last = p.prompt_ids[:-1], p.prompt_ids[-1:]
        _place(batch, 0, offset, shared, len(shared))
        batch["doc_ids"][0, offset : offset + len(shared)] = 2 * n + i
        batch["prefix_ids"][0, offset : offset + len(shared)] = 2 * n + i
        offset += len(shared)
        for doc, response in ((i, p.chosen_ids), (n + i, p.rejected_ids)):
            branch = last + response
            n_targets += _place(batch, 0, offset, branch, len(last), first_position=len(shared))
            batch["doc_ids"][0, offset : offset + len(branch)] = doc
            batch["prefix_ids"][0, offset : offset + len(branch)] = 2 * n + i
            offset += len(branch)
    batch["n_targets"] = n_targets
    batch["n_sequences"] = 2 * n
    batch["n_tokens"] = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return batch


def tokens_in(batch: dict) -> int:
    """The tokens a batch stands for: its unpadded positions, or what a shared-prompt batch saves computing."""
    return batch["n_tokens"] if "n_tokens" in batch else int(batch["attention_mask"].sum())


def pad_row(batch: dict, length: int, pad_id: int = 0) -> dict:
    """A padding-free batch ``[1, T]`` laid out again as ``[1, length]``: its sequences, then padding exactly as
    ``_collate_flat`` writes it (doc -1, no target, masked out). Padding it already had may be dropped, so any
    planned shape that holds its sequences fits (see ``shapes.plan_shapes``)."""
    current = batch["input_ids"].shape[1]
    content = int((batch["doc_ids"][0] >= 0).sum())
    if length < content:
        raise ValueError(f"cannot fit a row of {content} positions into {length}")
    if length == current:
        return batch
    fill = {"input_ids": pad_id, "attention_mask": 0, "position_ids": 0, "targets": IGNORE_INDEX, "doc_ids": -1,
            "prefix_ids": -1}
    out = dict(batch)
    for key, value in fill.items():
        if key in batch:
            kept = batch[key][:, :content]
            out[key] = torch.cat([kept, torch.full((1, length - content), value, dtype=kept.dtype)], dim=1)
    return out


def _targets_of(n: int, prompt_len: int) -> int:
    return max(n - max(prompt_len, 1), 0)  # as _place counts them


def flat_sizes(items: Sequence[TokenizedExample | TokenizedPair], *, share_prompt: bool = False) -> list[tuple[int, int]]:
    """(positions, targets) each example adds to a padding-free batch, as ``collate_sft`` / ``collate_pairs`` lay it
    out: a batch's sizes are the sums over its examples, known before collating (for ``shapes.plan_shapes``)."""
    out = []
    for it in items:
        if isinstance(it, TokenizedExample):
            n, p = len(it.prompt_ids) + len(it.response_ids), len(it.prompt_ids)
            out.append((n, _targets_of(n, p)))
        elif share_prompt:
            p, c, r = len(it.prompt_ids), len(it.chosen_ids), len(it.rejected_ids)
            last = min(p, 1)
            out.append((max(p - 1, 0) + 2 * last + c + r, _targets_of(last + c, last) + _targets_of(last + r, last)))
        else:
            p, c, r = len(it.prompt_ids), len(it.chosen_ids), len(it.rejected_ids)
            out.append((2 * p + c + r, _targets_of(p + c, p) + _targets_of(p + r, p)))
    return out


def sequence_lengths(items: Sequence[TokenizedExample | TokenizedPair]) -> list[int]:
    """Length of each example's longest row, for length-grouped batching."""
    out = []
    for it in items:
        if isinstance(it, TokenizedPair):
            out.append(len(it.prompt_ids) + max(len(it.chosen_ids), len(it.rejected_ids)))
        else:
            out.append(len(it.prompt_ids) + len(it.response_ids))
    return out


# ----------------------------------------------------------------------------- which examples form a batch


def batch_indices(
    n: int,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
    lengths: Sequence[int] | None = None,
    group_by_length: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """This rank's batches of example indices for one epoch.

    Global batches of ``batch_size * world_size`` are formed exactly as for a single process, and
    rank r takes the r-th contiguous slice of each, so changing the number of GPUs (at a fixed
    global batch) does not change which examples are averaged together. Every rank gets the same
    number of batches; if the last global batch is short (``drop_last=False``) it is shared out as
    evenly as possible and a rank may receive an empty list, which it must still step through.

    ``group_by_length`` sorts examples by ``lengths`` within chunks of 50 global batches (less
    padding) and then shuffles the order of the full batches, so batches are not sorted by length
    over time.
    """
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1.")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    rng = random.Random(f"minialign-batches:{seed}:{epoch}")
    order = list(range(n))
    if shuffle:
        rng.shuffle(order)
    size = batch_size * world_size
    if group_by_length:
        if lengths is None or len(lengths) != n:
            raise ValueError("group_by_length needs one length per example")
        chunk = size * LENGTH_GROUP_BATCHES
        by_length = lambda i: -lengths[i]  # noqa: E731 - longest first within each chunk
        order = [i for s in range(0, n, chunk) for i in sorted(order[s : s + chunk], key=by_length)]
    batches = [order[s : s + size] for s in range(0, n, size)]
    if drop_last and batches and len(batches[-1]) < size:
        batches.pop()
    if group_by_length and shuffle:  # a short last batch stays last, as without grouping
        full = len(batches) - (1 if batches and len(batches[-1]) < size else 0)
        head = batches[:full]
        rng.shuffle(head)
        batches = head + batches[full:]
    return [b[rank * len(b) // world_size : (rank + 1) * len(b) // world_size] for b in batches]


# ----------------------------------------------------------------------------- packing (SFT)


def pack_sft(examples: Sequence[TokenizedExample], row_length: int) -> list[list[int]]:
    """Group example indices into rows of at most ``row_length`` tokens, each example whole.

    Best fit in the given order: each example goes into the open row with the least room that
    still fits it, else a new row. Deterministic, and dense without reordering the data much.
    """
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row number) of rows with space left
    for i, ex in enumerate(examples):
        size = len(ex.prompt_ids) + len(ex.response_ids)
        if size > row_length:
            raise UserError(
                f"example {i} has {size} tokens, more than the packing row length {row_length}; "
                "tokenize with max_length <= the row length (or raise the row length)."
            )
        k = bisect.bisect_left(room, (size, -1))
        if k == len(room):
            rows.append([i])
            free, r = row_length - size, len(rows) - 1
        else:
            free, r = room.pop(k)
            rows[r].append(i)
            free -= size
        if free > 0:
            bisect.insort(room, (free, r))
    return rows


def collate_packed(
    examples: Sequence[TokenizedExample], rows: Sequence[Sequence[int]], *, row_length: int, pad_id: int
) -> dict:
    """Packed SFT batch [R, row_length]: several documents per row, none leaking into another.

    ``position_ids`` restart at 0 for each document and ``doc_ids`` number the documents within a
    row (-1 on padding), so attention can be restricted to one document (see
    ``block_causal_mask``); targets are shifted within each document only. ``doc_lengths`` lists
    each row's document lengths (cu_seqlens-style boundaries for varlen attention kernels).
    """
    batch: dict = _empty_batch(len(rows), row_length, pad_id)
    batch["doc_ids"] = torch.full((len(rows), row_length), -1, dtype=torch.long)
    n_targets, doc_lengths = 0, []
    for r, members in enumerate(rows):
        offset, lengths = 0, []
        for d, i in enumerate(members):
            ex = examples[i]
            seq = ex.prompt_ids + ex.response_ids
            if offset + len(seq) > row_length:
                raise ValueError(f"row {r} holds more than {row_length} tokens")
            n_targets += _place(batch, r, offset, seq, len(ex.prompt_ids))
            batch["doc_ids"][r, offset : offset + len(seq)] = d
            offset += len(seq)
            lengths.append(len(seq))
        doc_lengths.append(lengths)
    batch["n_targets"] = n_targets
    batch["doc_lengths"] = doc_lengths
    return batch


def block_causal_mask(doc_ids: torch.Tensor, prefix_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean attention mask [R, 1, L, L]: True where query i may attend key j.

    Causal and within one document, or within the document ``prefix_ids[i]`` names (a shared prompt,
    see ``_collate_shared``). Padding (doc -1) attends only to padding, which keeps every softmax row
    non-empty (no NaN) without letting real tokens see padding.
    """
    readable = doc_ids[:, :, None] == doc_ids[:, None, :]
    if prefix_ids is not None:
        readable |= prefix_ids[:, :, None] == doc_ids[:, None, :]
    length = doc_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return (readable & causal)[:, None]
