"""What `minialign online` reads before its first round: the prompts (with each one's reward-model route) and the
reward models, every one checked so that a bad input stops the command before its run folder is written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from minialign.base.errors import UserError
from minialign.commands import recipes
from minialign.config.fields import split_list
from minialign.config.online import OnlineConfig
from minialign.config.schema import RMConfig
from minialign.data.chat import to_chat_format
from minialign.data.sources import row_to_pair
from minialign.evaluation import evalrows


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A training prompt: ``text`` as the policy reads it (chat template applied with --chat-template), ``raw`` as
    the dataset holds it (what the reward models read: ``Judge.score`` applies their own format), ``row`` its raw row."""

    text: str
    raw: str
    row: int
    route: int = 0  # with --combine route: the index of the reward model that scores its answers



def check_reward_models(cfg: OnlineConfig, tokenizer, tokenizer_label: str) -> list[dict]:
    """Each --reward-models folder checked (a finished `minialign rm` run, the policy's vocabulary, no training row
    shared with the policy's prompts) and described: resolved folder, weight, base model, the rows it trained on."""
    from minialign.commands.evalsides import check_judge

    policy_rows = evalrows.train_rows(cfg)
    models = []
    paths = [str(Path(p).resolve()) for p in split_list(cfg.reward_models)]
    repeated = sorted({p for p in paths if paths.count(p) > 1})
    if repeated:
        raise UserError(f"--reward-models names {', '.join(repeated)} more than once; name each reward model once "
                        "(give it more weight with --rm-weights instead).")
    routes = cfg.routes() or [None] * len(paths)
    for path, weight, route in zip(paths, cfg.weights(), routes, strict=True):
        if not Path(path).is_dir():
            raise UserError(f"--reward-models {path} does not exist. Give the --out folder of a finished `minialign "
                            "rm` run (train one with `minialign rm --out DIR ...`).")
        check_judge(path, "--reward-models", tokenizer, tokenizer_label)  # kind rm, finished, same vocabulary
        rm_cfg = recipes.load_run_config(Path(path), RMConfig)
        rows = evalrows.train_rows(rm_cfg)
        if rows.overlaps(policy_rows):
            raise UserError(
                f"--reward-models {path} was trained on {rows.label()}, which shares rows with the policy's prompts "
                f"({policy_rows.label()}): it would score answers to prompts whose preferences it has learned, and "
                "the policy would be rewarded for fitting the reward model's memory. Give the policy other rows "
                "(--train-rows) or train the reward model on rows the policy does not use (`minialign rm "
                "--train-rows ...`).")
        models.append({"run_dir": path, "weight": None if route else weight, "route": route,
                       "model": rm_cfg.model,
                       "train_rows": rows.to_dict(), "train_rows_label": rows.label(),
                       "heldout_accuracy": _heldout_accuracy(Path(path))})
    return models


def _heldout_accuracy(run_dir: Path) -> float | None:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("eval", {}).get("eval/accuracy")
    except (OSError, ValueError):
        return None


def load_prompts(cfg: OnlineConfig, tokenizer) -> list[Prompt]:
    """The prompts of the training pairs (--dataset / --train-rows / --limit, as `minialign dpo` reads them; their
    answers unused), each once, with its raw row; chat-formatted for the policy with --chat-template."""
    rows = evalrows.train_rows(cfg)
    # (raw row index, pair, where, raw row): one pass gives the pairs and, for --combine route, the rows' fields
    indexed = [(i, pair, where, row) for i, where, row in evalrows.indexed_rows(cfg.dataset, cfg.train_split,
                                                                               cfg.data_dir, cfg.train_rows)
               if not isinstance(pair := row_to_pair(row, where), str)]
    if rows.only is not None:  # a local source split 90/10 by training: its train part
        indexed = [x for x in indexed if x[0] in rows.only]
    elif cfg.limit:
        indexed = indexed[: cfg.limit]
    seen: set[str] = set()
    indexed = [x for x in indexed if not (x[1].prompt in seen or seen.add(x[1].prompt))]
    if not indexed:
        raise UserError(f"--dataset {cfg.dataset} --train-rows {cfg.train_rows or 'all'} ({rows.label()}) holds no "
                        "usable prompt. Widen --train-rows or choose another --dataset.")
    texts = [x[1].prompt for x in indexed]
    if cfg.chat_template:
        texts = [p.prompt for p in to_chat_format([x[1] for x in indexed], tokenizer)]
    routes = prompt_routes(cfg, [(where, row) for _, _, where, row in indexed])
    return [Prompt(t, p.prompt, i, r) for t, (i, p, _, _), r in zip(texts, indexed, routes, strict=True)]


def prompt_routes(cfg: OnlineConfig, rows: list[tuple[str, dict]]) -> list[int]:
    """With --combine route, the reward model of each (where, raw row) by its --route-field value; else all 0."""
    routes = cfg.routes()
    if not routes:
        return [0] * len(rows)
    missing = object()
    out = []
    for where, row in rows:
        value = row.get(cfg.route_field, missing)
        text = None if value is missing or value is None else str(value).strip()
        if text not in routes:
            found = ("has no such field" if value is missing else
                     f"holds {value!r}" + (" (compared as text)" if text is not None else ""))
            raise UserError(f"{where}: --combine route picks each prompt's reward model by its row's "
                            f"{cfg.route_field!r} field, and this row {found}, none of --rm-routes "
                            f"{','.join(routes)}. Add its value to --rm-routes (with a reward model for it), name "
                            "another field with --route-field, or leave this row out with --train-rows.")
        out.append(routes.index(text))
    return out
