"""What a data source holds, before spending compute on it: `minialign data SOURCE [--json]`.

Answers the questions that decide a run's settings: how many rows survive filtering (and why the
rest were dropped), how long prompts and responses are in tokens, and how many examples the chosen
``max_length`` / ``max_prompt_length`` would cut.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from minialign.data.sources import load_preference_pairs
from minialign.data.tokenize import check_limits, encode, truncate

STATS = ("min", "median", "mean", "p95", "max")


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min / median / mean / p95 / max of a list of lengths (p95 by the nearest-rank rule)."""
    ordered = sorted(lengths)
    p95 = ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 1),
        "p95": p95,
        "max": ordered[-1],
    }


def summarize_source(
    source: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    data_dir: str | None = None,
    rows: str | None = None,
    tokenizer: Any = None,
    max_length: int = 512,
    max_prompt_length: int = 256,
) -> dict[str, Any]:
    """Counts, skip reasons, character lengths and (with a tokenizer) token lengths and truncation.

    Token lengths are of the untruncated texts; response lengths include the appended EOS.
    ``truncated.sft`` counts examples (prompt + chosen) that would be cut, ``truncated.dpo`` pairs in
    which the prompt or either response would be cut, exactly as ``tokenize_sft``/``tokenize_pairs`` do.
    """
    pairs = load_preference_pairs(source, split=split, data_dir=data_dir, rows=rows)
    fields = ("prompt", "chosen", "rejected")
    texts = {f: [getattr(p, f) for p in pairs] for f in fields}
    out: dict[str, Any] = {
        "source": pairs.source,
        "split": split,
        "rows": pairs.rows,
        "pairs": len(pairs),
        "skipped": dict(pairs.skipped),
        "chars": {f: length_stats([len(t) for t in texts[f]]) for f in fields},
    }
    if tokenizer is None:
        return out
    eos = check_limits(tokenizer, max_length, max_prompt_length)
    ids = {f: encode(texts[f], tokenizer) for f in fields}
    for f in ("chosen", "rejected"):
        ids[f] = [r + [eos] for r in ids[f]]
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    sft = sum(truncate(p, [c], **limits)[2] for p, c in zip(ids["prompt"], ids["chosen"]))
    triples = zip(ids["prompt"], ids["chosen"], ids["rejected"])
    dpo = sum(truncate(p, [c, r], **limits)[2] for p, c, r in triples)
    out["tokens"] = {f: length_stats([len(x) for x in ids[f]]) for f in fields}
    out["truncated"] = {"sft": sft, "dpo": dpo, **limits}
    return out


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few aligned lines of text for the terminal."""
    lines = [
        f"source     {summary['source']} ({summary['split']})",
        f"rows       {summary['rows']}",
        f"pairs      {summary['pairs']}",
    ]
    skipped = summary["skipped"]
    lines.append("skipped    " + (", ".join(f"{k} {v}" for k, v in skipped.items()) if skipped else "none"))
    for unit in ("chars", "tokens"):
        if unit not in summary:
            continue
        lines.append(f"{unit:<11}" + "".join(f"{k:>8}" for k in STATS))
        for field, s in summary[unit].items():
            lines.append(f"  {field:<9}" + "".join(f"{s[k]:>8g}" for k in STATS))
    if "truncated" in summary:
        t = summary["truncated"]
        lines.append(
            f"truncated at max_length={t['max_length']}, max_prompt_length={t['max_prompt_length']}: "
            f"sft {t['sft']}, dpo {t['dpo']}"
        )
    return "\n".join(lines)
