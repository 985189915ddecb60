"""Preference data: sources -> pairs -> token ids -> batches (see DEVELOPERS.md for the batch format)."""

from minialign.data.batching import (
    IGNORE_INDEX,
    batch_indices,
    block_causal_mask,
    collate_packed,
    collate_pairs,
    collate_sft,
    flat_sizes,
    pack_sft,
    pad_row,
    sequence_lengths,
    tokens_in,
)
from minialign.data.demo import build_demo_tokenizer, demo_rows
from minialign.data.sources import (
    PreferenceData,
    PreferencePair,
    load_preference_pairs,
    split_dialogue,
    split_pairs,
)
from minialign.data.summary import format_summary, summarize_source
from minialign.data.tokenize import (
    TokenizedData,
    TokenizedExample,
    TokenizedPair,
    tokenize_pairs,
    tokenize_sft,
    truncate,
)

__all__ = [
    "IGNORE_INDEX",
    "PreferenceData",
    "PreferencePair",
    "TokenizedData",
    "TokenizedExample",
    "TokenizedPair",
    "batch_indices",
    "block_causal_mask",
    "build_demo_tokenizer",
    "collate_packed",
    "collate_pairs",
    "collate_sft",
    "demo_rows",
    "flat_sizes",
    "format_summary",
    "load_preference_pairs",
    "pack_sft",
    "pad_row",
    "sequence_lengths",
    "tokens_in",
    "split_dialogue",
    "split_pairs",
    "summarize_source",
    "tokenize_pairs",
    "tokenize_sft",
    "truncate",
]
