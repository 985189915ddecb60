"""Which raw rows a prompt set, a policy and a judge come from, so evaluation never uses training rows.

A ``RowSet`` names a source (hub dataset + data_dir + split, local files, or the demo split) and the raw
rows of it that were used: a ``START:STOP`` span, or an explicit set of row indices (a local source
that training split 90/10 itself). Two row sets overlap only on the same source.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from minialign.base.errors import UserError
from minialign.config.fields import parse_rows
from minialign.config.schema import TrainConfig
from minialign.data.readers import read_rows, resolve_paths
from minialign.data.sources import PreferencePair, row_to_pair, select_rows, split_pairs
from minialign.data.splits import single_split
from minialign.evaluation.geneval import EvalPrompt


def source_key(dataset: str, split: str, data_dir: str) -> tuple:
    """What makes two sources the same rows: files by resolved path, the hub by id, data_dir and split."""
    from minialign.data.readers import is_local

    if dataset == "demo":
        return ("demo", split)
    if is_local(dataset):
        return ("files", tuple(str(p.resolve()) for p in resolve_paths(dataset)))
    return ("hub", dataset, data_dir or "", split)


@dataclass(frozen=True)
class RowSet:
    dataset: str
    split: str
    data_dir: str
    rows: str = ""  # START:STOP over raw rows ("" = all)
    only: frozenset[int] | None = None  # explicit rows (inside ``rows``), when not a plain span

    @property
    def key(self) -> tuple:
        return source_key(self.dataset, self.split, self.data_dir)

    def label(self) -> str:
        where = self.dataset + (f"/{self.data_dir}" if self.data_dir and self.key[0] == "hub" else "")
        span = f"rows {self.rows}" if self.rows else "all rows"
        part = f", {len(self.only)} of them (a random 90/10 split)" if self.only is not None else ""
        return f"{where} ({self.split}) {span}{part}"

    def to_dict(self) -> dict:
        """For eval.json: what ``from_dict`` reads back, so saved answers can be judged again later."""
        return {"dataset": self.dataset, "split": self.split, "data_dir": self.data_dir, "rows": self.rows,
                "only": None if self.only is None else sorted(self.only)}

    @classmethod
    def from_dict(cls, d: dict) -> RowSet:
        only = d.get("only")
        return cls(d["dataset"], d["split"], d["data_dir"], d.get("rows", ""),
                   None if only is None else frozenset(only))

    def _range(self) -> range:
        span = parse_rows(self.rows or None)
        if (span.start or 0) >= 0 and (span.stop is None or span.stop >= 0):
            return range(span.start or 0, span.stop if span.stop is not None else 2**62)
        total = sum(1 for _ in read_rows(self.dataset, split=self.split, data_dir=self.data_dir or None))
        return range(total)[span]

    def members(self, rows: list[int]) -> list[int]:
        """Those of ``rows`` (raw indices of this source) that belong to the set."""
        if self.only is not None:
            return [r for r in rows if r in self.only]
        span = self._range()
        return [r for r in rows if r in span]

    def overlaps(self, other: RowSet) -> bool:
        if self.key != other.key:
            return False
        if self.only is not None or other.only is not None:
            small, big = (self, other) if self.only is not None else (other, self)
            return bool(big.members(sorted(small.only)))
        a, b = self._range(), other._range()
        return max(a.start, b.start) < min(a.stop, b.stop)


def indexed_rows(dataset: str, split: str, data_dir: str, rows: str) -> Iterator[tuple[int, str, Any]]:
    """(raw row index, where, raw row) of a source's row span, lazily, in row order."""
    indexed = enumerate(read_rows(dataset, split=split, data_dir=data_dir or None))
    for index, (where, row) in select_rows(indexed, parse_rows(rows or None)):
        yield index, where, row


def indexed_pairs(dataset: str, split: str, data_dir: str, rows: str) -> Iterator[tuple[int, PreferencePair]]:
    """Usable (raw row index, pair) of a source's row span, lazily, in row order (unusable rows skipped)."""
    for index, where, row in indexed_rows(dataset, split, data_dir, rows):
        pair = row_to_pair(row, where)
        if not isinstance(pair, str):
            yield index, pair


def _split_rows(cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """Raw rows of the (train, held-out) parts of a local source that training split 90/10 itself.

    ``split_pairs`` decides by position only (number of pairs, fraction, seed), so splitting the
    positions of the same pairs reproduces exactly the split training made.
    """
    pairs = list(indexed_pairs(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.train_rows))
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    train, held = split_pairs(list(range(len(pairs))), 0.1, cfg.seed)
    return [pairs[i][0] for i in train], [pairs[i][0] for i in held]


def train_rows(cfg: TrainConfig) -> RowSet:
    """The raw rows a training run learned from."""
    if single_split(cfg):
        train, _ = _split_rows(cfg)
        return RowSet(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.train_rows, frozenset(train))
    return RowSet(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.train_rows)


def heldout_rows(cfg: TrainConfig) -> RowSet:
    """The raw rows a training run held out for evaluation."""
    if single_split(cfg):
        _, held = _split_rows(cfg)
        return RowSet(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.train_rows, frozenset(held))
    return RowSet(cfg.eval_data or cfg.dataset, cfg.eval_split, cfg.data_dir, cfg.eval_rows)


def load_prompts(rows: RowSet, n: int, *, chat_tokenizer=None, flag: str = "--n") -> list[EvalPrompt]:
    """The first ``n`` usable prompts of ``rows`` in row order (never shuffled), each with its raw row index.

    ``chat_tokenizer`` rewrites each HH prompt in that tokenizer's chat template (as a policy trained
    with ``--chat-template`` saw its prompts). ``n`` is a cap, as ``--limit`` is for training pairs: rows holding
    fewer give all they have, and a line on stderr says so (naming ``flag``, the setting that asked for ``n``), the
    same for `minialign eval` and `minialign run`'s eval stage; rows holding none are an error.
    """
    usable = ((i, p) for i, p in indexed_pairs(rows.dataset, rows.split, rows.data_dir, rows.rows)
              if rows.only is None or i in rows.only)
    pairs = list(itertools.islice(usable, n))  # stops reading at n; short means the source ran out
    if not pairs:
        raise UserError(f"{rows.label()} holds no usable prompts, so there is nothing to evaluate. Choose other "
                        "rows or another data source (`minialign data SOURCE --rows START:STOP` shows what a span "
                        "holds).")
    if len(pairs) < n:
        print(f"minialign: {rows.label()} holds {len(pairs)} usable prompts, fewer than {flag} {n}; evaluating on "
              f"those {len(pairs)}.", file=sys.stderr)
    texts = [p.prompt for _, p in pairs]
    if chat_tokenizer is not None:
        from minialign.data.chat import to_chat_format

        texts = [p.prompt for p in to_chat_format([p for _, p in pairs], chat_tokenizer)]
    return [EvalPrompt(text, p.prompt, i) for text, (i, p) in zip(texts, pairs, strict=True)]


def check_not_trained_on(prompts: list[EvalPrompt], prompt_rows: RowSet, trained: list[tuple[str, RowSet]]) -> None:
    """Refuse prompts that are rows a model trained on: its answers there measure memory, not behaviour."""
    for what, rows in trained:
        if rows.key != prompt_rows.key:
            continue
        bad = rows.members([p.row for p in prompts])
        if bad:
            shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
            raise UserError(
                f"The evaluation prompts include {len(bad)} row(s) that {what} trained on ({rows.label()}): "
                f"rows {shown}. Evaluate on held-out rows: leave --dataset/--rows unset to use the run's own "
                "eval rows, or pick --rows outside its training span.")


def judge_rows(cfg: TrainConfig) -> RowSet:
    """The rows a judge (`minialign rm` run, ``Judge.config``) trained on: its source and train span."""
    return RowSet(cfg.dataset, cfg.train_split, cfg.data_dir, cfg.train_rows)


def online_reward_rows(run_dir: Path | None) -> list[tuple[str, RowSet]]:
    """The rows of the reward models a policy trained against online: a run folder whose config.yaml names them
    in ``reward_models`` (comma-separated run folders, as `minialign online` records them), each read from its own
    config.yaml. A policy that maximised a reward model's score has learned from that model's rows as well."""
    from minialign.config.fields import split_list
    from minialign.config.presets import CONFIG_FILE, load_run_config
    from minialign.config.schema import RMConfig

    config = Path(run_dir) / CONFIG_FILE if run_dir is not None else None
    if config is None or not config.is_file():
        return []
    try:
        listed = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("reward_models") or ""
    except yaml.YAMLError as e:
        raise UserError(f"{config} is not valid YAML ({e}); the policy run's config cannot be read.") from e
    found = []
    for path in split_list(",".join(listed) if isinstance(listed, list) else str(listed)):
        if not (Path(path) / CONFIG_FILE).is_file():
            raise UserError(
                f"{config}: field reward_models names {path}, which holds no {CONFIG_FILE}, so the rows that reward "
                "model trained on (and the policy learned from online) cannot be checked against the eval prompts. "
                "Restore that run folder (run from the folder the policy was trained in, so relative paths resolve).")
        found.append((f"reward model {path} (the policy's online reward)", judge_rows(load_run_config(Path(path),
                                                                                                   RMConfig))))
    return found
