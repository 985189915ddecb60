"""Read preference pairs from the hub, local files or the built-in demo set.

Every source ends up as the same thing: a list of ``PreferencePair(prompt, chosen, rejected)`` where
``chosen`` and ``rejected`` are the two *responses* to one shared prompt. HH-RLHF stores whole
dialogues instead, so we split them at the last "\\n\\nAssistant:" and keep the split lossless
(``prompt + chosen`` is exactly the original text): any drift here silently changes what the model
is trained on, and it is the classic place where preference pipelines go wrong.

Rows that cannot form a clean pair are skipped and counted by reason rather than "fixed", so a
user can see how much of their data was dropped and why.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minialign.base.errors import UserError, kind_of
from minialign.config.fields import parse_rows
from minialign.data.readers import Rows, read_rows, source_items

ASSISTANT = "\n\nAssistant:"
@dataclass(frozen=True)
class PreferencePair:
    """One prompt and two responses to it; ``chosen`` is the one people preferred.

    ``margin``: how strongly (a row's numeric ``margin`` field, TRL's convention; 0 without one). Only reward-model
    training reads it."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0


class PreferenceData(list):
    """A list of PreferencePair that remembers where it came from and what was dropped.

    ``rows`` counts the raw rows examined, so ``rows == len(self) + sum(skipped.values())``.
    """

    def __init__(
        self, pairs: Iterable[PreferencePair] = (), *, source: str = "", rows: int = 0,
        skipped: dict[str, int] | None = None,
    ) -> None:
        super().__init__(pairs)
        self.source = source
        self.rows = rows
        self.skipped: dict[str, int] = dict(skipped or {})


# ----------------------------------------------------------------------------- turning rows into pairs


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """Split two HH dialogues into (prompt, chosen response, rejected response), or a skip reason.

    The prompt runs up to and including the last "\\n\\nAssistant:" of ``chosen``. Each dialogue's own
    prompt is compared, not just a prefix: a rejected dialogue that carries extra turns would
    otherwise smuggle a "Human:" turn into its response.
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return "no_assistant_turn"
    cut += len(ASSISTANT)
    prompt = chosen[:cut]
    rejected_cut = rejected.rfind(ASSISTANT)
    if rejected_cut < 0 or rejected[: rejected_cut + len(ASSISTANT)] != prompt:
        return "prompt_mismatch"
    return prompt, chosen[cut:], rejected[cut:]


def check_responses(chosen: str, rejected: str, *, drop_blank: bool) -> str | None:
    """The reason to skip a pair with these responses, or None to keep it.

    A whitespace-only response (HH writes " ") is kept by default: it is the annotator's "say
    nothing" option, preferred over harmful answers in harmless-base and dispreferred in the helpful
    files, so it carries a real preference. ``drop_blank=True`` treats it as empty.
    """
    for response in (chosen, rejected):
        if response == "" or (drop_blank and not response.strip()):
            return "empty_response"
    if chosen == rejected:
        return "identical_responses"
    return None


def _text_field(row: dict[str, Any], name: str, where: str) -> str:
    """Field ``name`` of a row as a string, or a UserError that shows what the row holds."""
    if name not in row:
        keys = ", ".join(repr(k) for k in row) or "none"
        raise UserError(
            f"{where}: the row has no field {name!r}; its keys are {keys}. Preference rows need "
            "'chosen' and 'rejected' (whole HH dialogues) or 'prompt', 'chosen' and 'rejected' "
            "(a prompt and two responses); rename the columns to match."
        )
    value = row[name]
    if not isinstance(value, str):
        hint = " It looks like a conversational (list of messages) dataset; convert it to text first."
        raise UserError(
            f"{where}: field {name!r} is {kind_of(value)}, but minialign needs text (a string)."
            f"{hint if isinstance(value, list) else ''}"
        )
    return value


def row_to_pair(row: Any, where: str, *, drop_blank: bool = False) -> PreferencePair | str:
    """Turn one raw row (HH or explicit form) into a pair, or return why it is skipped."""
    if not isinstance(row, dict):
        raise UserError(
            f"{where}: expected a JSON object with 'chosen' and 'rejected', got {kind_of(row)}."
        )
    chosen = _text_field(row, "chosen", where)
    rejected = _text_field(row, "rejected", where)
    if "prompt" in row:
        prompt = _text_field(row, "prompt", where)
    else:
        split = split_dialogue(chosen, rejected)
        if isinstance(split, str):
            return split
        prompt, chosen, rejected = split
    reason = check_responses(chosen, rejected, drop_blank=drop_blank)
    return reason if reason else PreferencePair(prompt, chosen, rejected, _margin(row, where))


def _margin(row: dict[str, Any], where: str) -> float:
    """A row's optional numeric ``margin`` (absent or null: 0)."""
    value = row.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise UserError(f"{where}: field 'margin' is {value!r}, but it must be a finite number (how much more the "
                        "chosen response is preferred, as in TRL's reward data); fix the value or drop the field.")
    return float(value)


# ----------------------------------------------------------------------------- selecting and filtering


def select_rows(rows: Rows, span: slice) -> Iterator[tuple[str, Any]]:
    """Apply a row slice, streaming when both ends are non-negative (no need to read the tail)."""
    if (span.start or 0) >= 0 and (span.stop is None or span.stop >= 0):
        return itertools.islice(rows, span.start, span.stop)
    return iter(list(rows)[span])


def load_preference_pairs(
    source: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
    rows: str | None = None,
    drop_blank: bool = False,
) -> PreferenceData:
    """Load preference pairs from a hub id, local file(s)/glob, or "demo".

    ``rows="START:STOP"`` picks raw rows by position before any filtering (the project evaluates on
    harmless-base rows "0:300" and trains on "300:"); ``limit`` caps the pairs kept. ``split`` picks
    the hub split or the demo split; local files are a single split (see ``split_pairs``), and
    ``data_dir`` only matters for hub datasets. Several files can be given as a list or as one
    comma-separated string.
    """
    if limit is not None and limit < 1:
        raise UserError(f"limit={limit} must be at least 1 (or left unset for all pairs).")
    span = parse_rows(rows)
    name = ",".join(str(s) for s in source_items(source))
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    seen = 0
    for where, row in select_rows(read_rows(source, split=split, data_dir=data_dir), span):
        seen += 1
        result = row_to_pair(row, where, drop_blank=drop_blank)
        if isinstance(result, str):
            skipped[result] += 1
        else:
            pairs.append(result)
            if limit is not None and len(pairs) >= limit:
                break
    selection = f" with rows={rows!r}" if rows is not None else ""
    if seen == 0:
        raise UserError(f"the source {name}{selection} has no rows. Check the file(s) and the rows= range.")
    if not pairs:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items()))
        raise UserError(
            f"none of the {seen} rows of {name}{selection} gave a usable preference pair (skipped: "
            f"{reasons}). prompt_mismatch: chosen and rejected do not share everything up to the last "
            "'\\n\\nAssistant:'; no_assistant_turn: the dialogue has no '\\n\\nAssistant:'; "
            "empty_response / identical_responses: nothing to prefer. Check that the rows are HH "
            "dialogues or prompt/chosen/rejected triples."
        )
    return PreferenceData(pairs, source=name, rows=seen, skipped=dict(sorted(skipped.items())))


def split_pairs(
    pairs: Sequence[PreferencePair], eval_size: int | float, seed: int
) -> tuple[PreferenceData, PreferenceData]:
    """Deterministically hold out ``eval_size`` pairs (a count, or a fraction in (0, 1)).

    For sources with a single split. Both parts keep the original order, so a split of sorted data
    stays readable; which pairs go where depends only on (len(pairs), eval_size, seed).
    """
    n = len(pairs)
    if isinstance(eval_size, float):
        if not 0.0 < eval_size < 1.0:
            raise UserError(f"eval_size={eval_size} as a fraction must be between 0 and 1 (exclusive).")
        k = min(max(round(n * eval_size), 1), n - 1)
    else:
        k = int(eval_size)
    if not 0 < k < n:
        raise UserError(
            f"eval_size={eval_size} leaves no pairs on one side of the split ({n} pairs in all); "
            f"choose between 1 and {n - 1} pairs or a fraction."
        )
    order = list(range(n))
    random.Random(f"minialign-split:{seed}").shuffle(order)
    held = set(order[:k])
    source = getattr(pairs, "source", "")
    train = [p for i, p in enumerate(pairs) if i not in held]
    evals = [p for i, p in enumerate(pairs) if i in held]
    return (
        PreferenceData(train, source=f"{source} (train part)", rows=len(train)),
        PreferenceData(evals, source=f"{source} (eval part)", rows=len(evals)),
    )
