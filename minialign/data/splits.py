"""Which rows train and which evaluate: the 90/10 rule for a single local source, in one place."""

from __future__ import annotations

from pathlib import Path

from minialign.base.dist import rank
from minialign.config.schema import TrainConfig
from minialign.data.chat import to_chat_format
from minialign.data.sources import load_preference_pairs, split_pairs


def load_pairs(cfg: TrainConfig, tokenizer):
    """Training and held-out pairs. A local source without its own eval set or rows is split 90/10."""
    train_pairs = load_preference_pairs(cfg.dataset, split=cfg.train_split, data_dir=cfg.data_dir or None,
                                        rows=cfg.train_rows or None, limit=cfg.limit or None)
    eval_source = cfg.eval_data or cfg.dataset
    if single_split(cfg):
        train_pairs, eval_pairs = split_pairs(train_pairs, 0.1, cfg.seed)
        if rank() == 0:  # nothing on the command line asked for it: say so
            cap = f"; --eval-limit scores {cfg.eval_limit}" if cfg.eval_limit < len(eval_pairs) else ""
            print(f"minialign: {cfg.dataset} is one local source without --eval-data or --eval-rows: 10% of its pairs "
                  f"are held out for evaluation, {len(eval_pairs)} chosen at random (--seed {cfg.seed}{cap}), and "
                  f"{len(train_pairs)} are left to train on.")
        eval_pairs = eval_pairs[: cfg.eval_limit]
    else:
        eval_pairs = load_preference_pairs(eval_source, split=cfg.eval_split, data_dir=cfg.data_dir or None,
                                           rows=cfg.eval_rows or None, limit=cfg.eval_limit or None)
    if cfg.chat_template:
        train_pairs, eval_pairs = to_chat_format(train_pairs, tokenizer), to_chat_format(eval_pairs, tokenizer)
    return train_pairs, eval_pairs



def single_split(cfg: TrainConfig) -> bool:
    """One local source with neither its own eval data nor eval rows: ``load_pairs`` holds 10% of it out."""
    return not cfg.eval_data and not cfg.eval_rows and _is_files(cfg.dataset)



def _is_files(source: str) -> bool:
    return source != "demo" and (Path(source).exists() or any(c in source for c in "*?[") or "," in source)
